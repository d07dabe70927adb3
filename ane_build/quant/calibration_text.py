"""The text the calibration reads, cut into windows.

Python's own language reference (``pydoc_data.topics``, shipped with CPython) less the chapters the
quality analysis evaluates on and those quoting them (``analysis.quality.held_out_topics``), so no
program is scored on the text it was tuned on; or a text file the user names. Windows are cut from
it without overlap, spread over the whole text, so the calibration sees every part of it rather
than its first chapters.

Light to import (no torch): stage keys read the text's hash when a build is planned.
"""

import hashlib
import re
from pathlib import Path

from ane_build.util.errors import UserError


def chapters_quoting(texts):
    """The ``pydoc_data.topics`` chapters that share a paragraph with one of ``texts``: Python's reference
    prints some paragraphs in two chapters (``execmodel`` holds all of ``naming``)."""
    from pydoc_data.topics import topics

    quoted = set().union(*map(_paragraphs, texts))
    return {topic for topic, text in topics.items() if _paragraphs(text) & quoted}


def _paragraphs(text, shortest=200):
    """The paragraphs of ``text`` long enough that two chapters sharing one quote each other."""
    return {p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= shortest}


def pydoc_text(exclude):
    """Every ``pydoc_data.topics`` chapter not in ``exclude``, in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[topic] for topic in sorted(topics) if topic not in set(exclude))


def text_file(path):
    """A user's calibration text, read as UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(str(path), "calibration text not found") from None
    except UnicodeDecodeError as e:
        raise UserError(str(path), f"calibration text is not UTF-8 ({e.reason} at byte {e.start})") from None


def calibration_windows(encode, n_windows, window, path=None, exclude=()):
    """(``n_windows`` lists of ``window`` token ids, sha256 of the text) for the text of ``path``,
    else of ``pydoc_text(exclude)``. ``encode``: text -> token ids (e.g. ``Tokenizer.encode``)."""
    text = chosen_text(path, exclude)
    return cut(encode(text), n_windows, window, where=str(path or "calibration text")), sha256(text)


def cut(ids, n_windows, window, where="calibration text"):
    """``n_windows`` non-overlapping slices of ``window`` ids, evenly spaced over ``ids``."""
    if n_windows < 1 or window < 2:
        raise ValueError(f"calibration: {n_windows} windows of {window} tokens; expected >= 1 of >= 2")
    available = len(ids) // window
    if available < n_windows:
        raise UserError(where, f"{len(ids)} tokens make {available} windows of {window}; "
                               f"{n_windows} asked for")
    starts = [k * available // n_windows * window for k in range(n_windows)]
    return [list(ids[start:start + window]) for start in starts]


def chosen_text(path, exclude):
    """The text of ``path``, else ``pydoc_text(exclude)``."""
    return text_file(path) if path is not None else pydoc_text(exclude)


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()
