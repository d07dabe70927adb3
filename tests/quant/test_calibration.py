"""Calibration statistics: the Fisher diagonal and x^T x as other computations give them; the text
they are measured on, which leaves out the evaluation's; and their file."""


import pytest
import torch

from ane_build.checkpoint import canonical
from ane_build.model.reference import ReferenceLlama, rms_norm
from ane_build.quant import calibration
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
