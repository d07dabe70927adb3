import hashlib
import itertools

import pytest

from ane_build.quant import calibration_text
from ane_build.util.errors import UserError


def by_bytes(text):
    return list(text.encode())


def test_the_pydoc_text_leaves_out_the_chapters_named():
    from pydoc_data.topics import topics

    excluded = {"naming", "customization"}
    text = calibration_text.pydoc_text(excluded)
    for topic in topics:
        assert (topics[topic] in text) == (topic not in excluded), topic


def test_chapters_quoting_a_text_are_found_by_their_shared_paragraphs():
    """Python's reference prints ``naming`` whole inside ``execmodel``; a text nobody quotes has no chapter."""
    from pydoc_data.topics import topics

    assert {"naming", "execmodel"} <= calibration_text.chapters_quoting([topics["naming"]])
    assert calibration_text.chapters_quoting(["a paragraph no chapter of the reference holds " * 10]) == set()


def test_windows_are_even_spaced_non_overlapping_slices_of_the_text():
    windows, digest = calibration_text.calibration_windows(by_bytes, 8, 512, exclude={"naming"})
    text = calibration_text.pydoc_text({"naming"})
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    stream = by_bytes(text)
    starts = [_find(stream, w) for w in windows]
    assert all(len(w) == 512 for w in windows) and starts[0] == 0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 512  # no overlap
    assert max(gaps) - min(gaps) <= 512  # spread over the text, one window's slack for rounding
    assert starts[-1] > len(stream) // 2
    assert calibration_text.calibration_windows(by_bytes, 8, 512, exclude={"naming"}) == (windows, digest)


def _find(stream, window):
    """Where ``window`` starts in ``stream`` at a multiple of its length (the cut's grid)."""
    for start in range(0, len(stream), len(window)):
        if stream[start:start + len(window)] == window:
            return start
    raise AssertionError("window not in the stream")


def test_a_users_text_file_replaces_the_pydoc_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 8, encoding="utf-8")
    windows, digest = calibration_text.calibration_windows(by_bytes, 2, 16, path=path)
    assert windows == [by_bytes("abcdefgh" * 2)] * 2
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="64 tokens make 4 windows of 16; 5 asked for"):
        calibration_text.calibration_windows(by_bytes, 5, 16, path=path)
    with pytest.raises(UserError, match="not found"):
        calibration_text.calibration_windows(by_bytes, 1, 16, path=tmp_path / "missing.txt")
