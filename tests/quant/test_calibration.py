"""Calibration statistics: the Fisher diagonal and x^T x as other computations give them; the text
they are measured on, which leaves out the evaluation's; and their file."""

import hashlib
import itertools

import pytest
import torch

from ane_build.checkpoint import canonical
from ane_build.model.reference import ReferenceLlama, rms_norm
from ane_build.quant import calibration
from ane_build.util.errors import UserError
from tests.tiny_llama import tiny_params, tiny_weights

PARAMS = tiny_params()
WINDOW, N_WINDOWS = 16, 3
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def reference():
    return ReferenceLlama(PARAMS, tiny_weights(PARAMS))


@pytest.fixture(scope="module")
def windows():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, PARAMS["vocab_size"], (N_WINDOWS, WINDOW), generator=gen).tolist()


@pytest.fixture(scope="module")
def stats(reference, windows):
    return calibration.statistics(reference, windows)


def linear_names():
    return [n.removesuffix(".weight") for n, shape in canonical.expected_shapes(PARAMS).items()
            if len(shape) == 2 and n != "tok_embeddings.weight"]


def test_every_linear_the_lm_head_included_gets_its_statistics(reference, stats):
    assert sorted(stats) == sorted(linear_names())
    for name, s in stats.items():
        out, columns = reference.w[f"{name}.weight"].shape
        assert s["fisher"].shape == (out, columns) and s["xtx"].shape == (columns, columns)
        assert s["fisher"].dtype == s["xtx"].dtype == torch.float32
        assert s["tokens"] == N_WINDOWS * WINDOW
        assert (s["fisher"] >= 0).all() and s["fisher"].sum() > 0


def per_window_gradients(reference, windows):
    """{weight name: [window, out, in]} gradients of each window's mean next-token loss, by
    torch.func over a fresh reference (no hooks, no shared state)."""
    names = [f"{n}.weight" for n in linear_names()]

    def loss(weights, ids):
        logits = ReferenceLlama(reference.params, {**reference.w, **weights}).logits(ids[None])[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[1:])

    weights = {n: reference.w[n] for n in names}
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(weights, torch.tensor(windows))


def test_fisher_is_the_mean_over_windows_of_each_windows_squared_gradient_per_position(reference, windows, stats):
    gradients = per_window_gradients(reference, windows)
    positions = torch.tensor([len(w) - 1 for w in windows], dtype=torch.float32)
    for name, s in stats.items():
        g = gradients[f"{name}.weight"]
        want = (g.square() * positions.reshape(-1, *[1] * (g.dim() - 1))).mean(0)
        # The same fp32 arithmetic in another order (vmap batches the matmuls). A gradient entry
        # goes through ~100 roundings of 2**-24 (two layers, softmax, the loss, back): within ~1e-5
        # of the largest entry, 2e-5 once squared; 1e-4 leaves a factor of 5.
        assert (s["fisher"] - want).abs().max() <= 1e-4 * want.max(), name
        # Not the square of the mean gradient: the windows disagree.
        assert not torch.allclose(want, g.mean(0).square(), rtol=0.1)


def test_xtx_sums_each_linears_input_over_every_position(reference, windows, stats):
    # Layer 0's attention reads the normalised embeddings, which can be computed by hand.
    xs = [rms_norm(reference.w["tok_embeddings.weight"][torch.tensor([ids])],
                   reference.w["layers.0.attention_norm.weight"], PARAMS["norm_eps"])[0] for ids in windows]
    want = sum(x.double().T @ x.double() for x in xs)
    magnitude = sum(x.double().abs().T @ x.double().abs() for x in xs)
    # fp32 products summed over a window's WINDOW positions (error <= WINDOW * eps * sum |x_i x_j|),
    # float64 across windows, then one rounding to fp32.
    bound = WINDOW * EPS * magnitude + EPS * want.abs()
    for linear in ("wq", "wk", "wv"):
        got = stats[f"layers.0.attention.{linear}"]["xtx"].double()
        assert ((got - want).abs() <= bound).all(), linear


def test_the_reference_is_left_as_it_was(reference, windows, stats):
    assert not any(w.requires_grad for w in reference.w.values())
    assert torch.equal(reference.w["output.weight"], tiny_weights(PARAMS)["output.weight"])
    assert not reference(torch.tensor(windows[:1])).requires_grad


def test_windows_that_predict_nothing_are_refused(reference):
    with pytest.raises(ValueError, match="no windows"):
        calibration.statistics(reference, [])
    with pytest.raises(ValueError, match="predicts nothing"):
        calibration.statistics(reference, [[5]])


# --- the text and its windows -------------------------------------------------------------------


def by_bytes(text):
    return list(text.encode())


def test_the_pydoc_text_leaves_out_the_chapters_named():
    from pydoc_data.topics import topics

    excluded = {"naming", "customization"}
    text = calibration.pydoc_text(excluded)
    for topic in topics:
        assert (topics[topic] in text) == (topic not in excluded), topic


def test_chapters_quoting_a_text_are_found_by_their_shared_paragraphs():
    """Python's reference prints ``naming`` whole inside ``execmodel``; a text nobody quotes has no chapter."""
    from pydoc_data.topics import topics

    assert {"naming", "execmodel"} <= calibration.chapters_quoting([topics["naming"]])
    assert calibration.chapters_quoting(["a paragraph no chapter of the reference holds " * 10]) == set()


def test_windows_are_even_spaced_non_overlapping_slices_of_the_text():
    windows, digest = calibration.calibration_windows(by_bytes, 8, 512, exclude={"naming"})
    text = calibration.pydoc_text({"naming"})
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    stream = by_bytes(text)
    starts = [_find(stream, w) for w in windows]
    assert all(len(w) == 512 for w in windows) and starts[0] == 0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 512  # no overlap
    assert max(gaps) - min(gaps) <= 512  # spread over the text, one window's slack for rounding
    assert starts[-1] > len(stream) // 2
    assert calibration.calibration_windows(by_bytes, 8, 512, exclude={"naming"}) == (windows, digest)


def _find(stream, window):
    """Where ``window`` starts in ``stream`` at a multiple of its length (the cut's grid)."""
    for start in range(0, len(stream), len(window)):
        if stream[start:start + len(window)] == window:
            return start
    raise AssertionError("window not in the stream")


def test_a_users_text_file_replaces_the_pydoc_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 8, encoding="utf-8")
    windows, digest = calibration.calibration_windows(by_bytes, 2, 16, path=path)
    assert windows == [by_bytes("abcdefgh" * 2)] * 2
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="64 tokens make 4 windows of 16; 5 asked for"):
        calibration.calibration_windows(by_bytes, 5, 16, path=path)
    with pytest.raises(UserError, match="not found"):
        calibration.calibration_windows(by_bytes, 1, 16, path=tmp_path / "missing.txt")


# --- on disk --------------------------------------------------------------------------------------


def test_statistics_survive_a_save_and_load(stats, tmp_path):
    path = tmp_path / "stats" / "calibration.safetensors"
    calibration.save(stats, path)
    calibration.save(stats, path)  # over an existing file
    back = calibration.load(path)
    assert list(back) == list(stats)
    for name, s in stats.items():
        assert torch.equal(back[name]["fisher"], s["fisher"]) and torch.equal(back[name]["xtx"], s["xtx"])
        assert back[name]["tokens"] == s["tokens"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_failed_save_leaves_no_file(stats, tmp_path):
    path = tmp_path / "calibration.safetensors"
    # safetensors refuses two names for one tensor, halfway through writing.
    broken = {**stats, "output": {**stats["output"], "xtx": stats["output"]["fisher"]}}
    with pytest.raises(RuntimeError, match="share memory"):
        calibration.save(broken, path)
    assert list(tmp_path.iterdir()) == []
