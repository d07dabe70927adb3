"""What each linear's weights matter for: the Fisher diagonal and the inputs' x^T x, measured on text.

Why: squared error treats every weight alike, yet a few weights move the model's output far more
than the rest. Near a trained optimum the loss grows by about 0.5 * sum(F * dw**2) when the weights
move by dw, F being the Fisher information's diagonal, here SqueezeLLM's: the mean over sequences
of the squared gradient of each sequence's mean loss (scaled to one position, ``statistics``).
Weighting the palette fit by F puts table values where the loss cares, and the same sum, per
layer, estimates what quantizing each layer costs, which a mixed-precision allocator compares
across layers. x^T x (a linear's inputs summed over
every position: GPTQ's Hessian of the output error) comes out of the same pass, for methods that
weigh a weight's error by what it multiplies.

The scale is approximate, the ranking steadier: a window's positions' gradients are not
uncorrelated, and on SmolLM2-135M (one MLP weight palettized, 512-token windows) 0.5 * sum(F *
dw**2) came out 2.3 to 2.7 times the mean per-position KL divergence measured on held-out text,
a ratio that held across 4 and 6 bits, plain and weighted palettes (unscaled, per window, it fell
~200 times short). A per-position Fisher would be exact but costs a backward pass per position.

How: the fp32 ``ReferenceLlama`` reads each calibration window once with autograd on; the mean
next-token cross-entropy of the window is differentiated with respect to every linear weight,
the LM head included, and each squared gradient is added to a running sum as soon as it is
complete (so no second copy of the model's gradients is held). ``ReferenceLlama.linear`` is where
each linear's input passes: its x^T x is added there, once per input (wq, wk and wv read the same
one). Only the sums are kept, never a token's activations.

The text and its windows: ``calibration_text`` (light to import: stage keys read its hash).
"""

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ane_build.model.reference import ReferenceLlama

log = logging.getLogger(__name__)
FILE = "statistics.safetensors"  # the calibrate stage's entry holds them under this name


def statistics(reference, windows):
    """{linear name: {"fisher": [out, in], "xtx": [in, in], "tokens": positions}} over ``windows``
    (lists of token ids) for every linear of ``reference`` (a ``ReferenceLlama``), by canonical name
    ("layers.0.attention.wq", ..., "output"). fisher: the mean over windows of the squared gradient
    of the window's mean next-token cross-entropy, times the window's positions: the Fisher diagonal
    of one position's loss (a window's gradient is the mean of its positions', whose squares average
    that many times smaller where the positions' gradients are uncorrelated), so that 0.5 * sum(F *
    dw**2) is in the units of a KL divergence per position; xtx: the linear's input x summed as
    x x^T over every position of every window; tokens: how many positions that is. All float32."""
    if not windows:
        raise ValueError("calibration statistics: no windows")
    recorder = _Recorder(reference)
    with torch.enable_grad():
        for i, ids in enumerate(windows):
            started = time.time()
            recorder.read(ids)
            log.info("calibration window %d/%d: %d tokens, %.1f s", i + 1, len(windows), len(ids),
                     time.time() - started)
    return recorder.result()


class _Recorder(ReferenceLlama):
    """The reference's arithmetic, its linear weights as leaves that take gradients, summing what
    ``statistics`` returns as the windows pass."""

    def __init__(self, reference):
        # The reference's own fp32 tensors (``.float()`` of an fp32 tensor is the tensor): no copy.
        super().__init__(reference.params, reference.w)
        self.leaves = {}  # linear name -> its weight as a leaf, the same storage
        self.fisher = {}  # linear name -> sum over windows of its squared gradient
        self.xtx = {}  # first linear to read an input -> float64 sum of x^T x
        self.reads = {}  # linear name -> the xtx key of the input it reads
        self.windows = self.tokens = 0
        self._input = self._input_key = None

    def read(self, ids):
        if len(ids) < 2:
            raise ValueError(f"calibration window of {len(ids)} token(s): it predicts nothing")
        tokens = torch.tensor([list(ids)])
        logits = self.logits(tokens)[0, :-1]
        self._positions = len(ids) - 1
        torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).backward()
        self.windows, self.tokens = self.windows + 1, self.tokens + len(ids)
        self._input = None  # let the last activation go

    def linear(self, x, name):
        # Linears that read the same tensor in turn (wq, wk, wv; w1, w3) share one sum. Holding
        # the tensor keeps its identity from being reused by another.
        if x is not self._input:
            self._input, self._input_key = x, name
            rows = x.detach().reshape(-1, x.shape[-1])
            # fp32 products over one window's positions, then a float64 sum across windows.
            _add(self.xtx, name, (rows.T @ rows).double())
        self.reads[name] = self._input_key
        return x @ self._leaf(name).T

    def _leaf(self, name):
        if name not in self.leaves:
            leaf = self.w[f"{name}.weight"].detach().requires_grad_()
            leaf.register_post_accumulate_grad_hook(lambda leaf, name=name: self._add_square(name, leaf))
            self.leaves[name] = leaf
        return self.leaves[name]

    def _add_square(self, name, leaf):
        # Squared and dropped as soon as it is whole: one layer's gradient alive at a time.
        _add(self.fisher, name, leaf.grad.square().mul_(self._positions))
        leaf.grad = None

    def result(self):
        stats = {}
        for name in self.leaves:
            fisher = self.fisher.pop(name).div_(self.windows)
            stats[name] = {"fisher": fisher, "xtx": self.xtx[self.reads[name]].float(), "tokens": self.tokens}
        return stats


def _add(sums, key, value):
    if key in sums:
        sums[key] += value
    else:
        sums[key] = value


# --- on disk ------------------------------------------------------------------------------------


def save(stats, path):
    """Write ``statistics``' result to ``path`` (safetensors), whole or not at all."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"{name}.{kind}": s[kind].contiguous() for name, s in stats.items() for kind in ("fisher", "xtx")}
    metadata = {"tokens": json.dumps({name: s["tokens"] for name, s in stats.items()})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise


def load(path):
    """``save``'s statistics back, in the order they were saved."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
        return {name: {"fisher": f.get_tensor(f"{name}.fisher"), "xtx": f.get_tensor(f"{name}.xtx"),
                       "tokens": count} for name, count in tokens.items()}
