"""The project's own settings: ``ane-build.toml`` at the project root, the environment over it.

Only a machine's or a CI's settings live here, never anything a stage's output depends on: a
recipe says what is built, this file says where its cache is shared. Today that is::

    [cache]
    url = "s3://bucket/ane-build"   # an fsspec URL: file:///..., s3://bucket/prefix, gs://bucket/prefix
    mode = "readwrite"              # or "read": pull, never push (CI of untrusted pull requests)

``ANE_BUILD_CACHE`` and ``ANE_BUILD_CACHE_MODE`` override them (``ANE_BUILD_CACHE=""``: no
remote cache); ``ANE_BUILD_CONFIG`` names another file.
"""

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ane_build.util.errors import UserError, display_path

FILE_NAME = "ane-build.toml"
KNOWN = {"cache": ("url", "mode")}
MODES = ("read", "readwrite")


def default_path(project_dir="."):
    return Path(os.environ.get("ANE_BUILD_CONFIG") or Path(project_dir) / FILE_NAME)


def cache_settings(path, environ=os.environ):
    """(url or None, mode, where the URL was set) for the remote cache; one UserError for a bad file
    or value. ``path``: the config file (None: the environment alone)."""
    cache = read(path).get("cache", {}) if path else {}
    url, url_from = cache.get("url"), f"{display_path(path)}: cache.url"
    if "ANE_BUILD_CACHE" in environ:
        url, url_from = environ["ANE_BUILD_CACHE"] or None, "ANE_BUILD_CACHE"
    mode, mode_from = cache.get("mode", "readwrite"), f"{display_path(path)}: cache.mode"
    if environ.get("ANE_BUILD_CACHE_MODE"):
        mode, mode_from = environ["ANE_BUILD_CACHE_MODE"], "ANE_BUILD_CACHE_MODE"
    if mode not in MODES:
        raise UserError(mode_from, f"expected one of {', '.join(MODES)}; got {mode!r}")
    return url, mode, url_from


def read(path):
    """The file as a dict ({} when there is none), its sections and keys checked against KNOWN."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UserError(display_path(path), f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(display_path(path), f"not valid TOML: {e}") from None
    for section, value in data.items():
        if section not in KNOWN or not isinstance(value, dict):
            raise UserError(display_path(path), f"{section}: unknown setting (expected a [{'] or ['.join(KNOWN)}] table)")
        for key, setting in value.items():
            if key not in KNOWN[section]:
                raise UserError(display_path(path), f"{section}.{key}: unknown key (expected {', '.join(KNOWN[section])})")
            if not isinstance(setting, str):
                raise UserError(display_path(path), f"{section}.{key}: expected a string; got {setting!r}")
    return data
