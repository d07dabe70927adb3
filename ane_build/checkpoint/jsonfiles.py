"""JSON files of a source checkpoint (config.json, params.json, ...), read with one-line errors."""

import json

from ane_build.util.errors import UserError


def read(path, missing="missing"):
    """The object in JSON file ``path``; ``missing`` says why its absence is a problem."""
    if not path.is_file():
        raise UserError(str(path), missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(str(path), f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"expected a JSON object, found {type(data).__name__}")
    return data


def require(data, key, path):
    """``data[key]``, or a UserError naming the file and the key."""
    if data.get(key) is None:
        raise UserError(str(path), f"key {key!r} is missing")
    return data[key]
