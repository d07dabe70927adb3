"""The native runner (runner/: C++ over the wheel's ExecuTorch runtime, a C ABI, a CLI) against the
project's own runner, ``ane_build.runtime``, on tiny twin.pte files that the export stage's code writes.

Both drive a program through the calling convention of ``ane_build/model/ane_llama.py`` (its module
docstring; upstream ExecuTorch's static-LLM "smart_mask" one): caller-owned per-layer KV caches in a
ring, a mask and the rotary rows per call, a one-token "forward" and an S-token "prefill". The tiny
twins (tests/runtime/tiny_programs.py) have 8-token prefill calls, a 12-slot ring and a 48-token
context, so a generation wraps the ring several times.

The runner is built once per module with CMake; without cmake or a C++ compiler these tests skip, except
under CI=true, where they fail.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ane_build.runtime.generate import Generation
from ane_build.runtime.program import PteProgram
from ane_build.runtime.sampling import Sampler
from tests.model.test_ane_llama import tokens_for
from tests.runtime.tiny_programs import (
    CACHE,
    MAX,
    SEQ,
    build_twin,
    export_without_metadata,
)
from tests.tiny_llama import tiny_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runner" / "python"))
import ane_runner_ctypes as native

TWIN = "list-decode"  # fp32, per-layer caches, a one-token forward beside prefill
TWIN_FP16 = "list-decode-fp16"
PROMPT = tokens_for(tiny_params(), 13)  # a full prefill call, then a padded one


# --- fixtures ------------------------------------------------------------------------------------------

def _missing_toolchain():
    if not shutil.which("cmake"):
        return "cmake is not installed"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler (c++, g++, clang++ or $CXX)"
    return None


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """(libane_runner path, ane-runner path), built with CMake against the installed executorch wheel."""
    missing = _missing_toolchain()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true, so the native runner tests fail instead of skipping", pytrace=False)
        pytest.skip(f"{missing}: the native runner cannot be built")
    out = tmp_path_factory.mktemp("runner-build")
    for command in (["cmake", "-S", str(ROOT / "runner"), "-B", str(out), f"-DANE_RUNNER_PYTHON={sys.executable}"],
                    ["cmake", "--build", str(out), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    library = next(p for p in out.iterdir() if p.name.startswith("libane_runner."))
    return library, out / "ane-runner"


@pytest.fixture(scope="module")
def lib(build):
    return native.load(build[0])


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """twin(name) -> path of that tiny twin.pte (tiny_programs' names), built once per module."""
    built = {}

    def get(name=TWIN):
        if name not in built:
            built[name] = build_twin(tmp_path_factory.mktemp(name), name)
        return built[name]
    return get


@pytest.fixture
def runner(lib, twin):
    with native.Runner(lib, twin()) as r:
        yield r


class RecordingSampler(Sampler):
    """Greedy, keeping the logits each id was picked from (the Python runner's, as fp32)."""

    def __init__(self):
        super().__init__(0.0)
        self.seen = []

    def __call__(self, logits):
        self.seen.append(logits.float().clone())  # clone: the program may reuse its output buffer
        return super().__call__(logits)


def python_greedy(path, prompt, n=None, sampler=None):
    """The project's runner: (ids, its Generation)."""
    generation = Generation(PteProgram(path), prompt, sampler or Sampler(0.0), n)
    return list(generation), generation


# --- the native runner against the project's runner ----------------------------------------------------

@pytest.mark.parametrize("name", [TWIN, TWIN_FP16])
# 8: one full prefill call; 13: a full one and a padded one; 20: three, the third wrapping the ring.
@pytest.mark.parametrize("prompt_length", [8, 13, 20])
def test_greedy_ids_and_logits_equal_the_python_runners(lib, twin, name, prompt_length):
    prompt = tokens_for(tiny_params(), prompt_length)
    n_new = MAX - prompt_length  # the whole context: the ring wraps several times
    sampler = RecordingSampler()
    expected, generation = python_greedy(twin(name), prompt, n_new, sampler)
    assert len(expected) == len(sampler.seen) == n_new
    with native.Runner(lib, twin(name)) as r:
        r.set_stop_ids([])
        assert r.prefill(prompt) == native.Status.OK, r.error
        steps = [(r.next(), torch.tensor(r.logits())) for _ in range(n_new)]
        assert [status_id for status_id, _ in steps] == [(native.Status.OK, i) for i in expected]
        # Bit for bit: the same program fed the same inputs runs the same kernels. The inputs differ
        # only where no real token looks: closed mask columns are -inf here and MASK_MIN (-32752) in
        # Python, whose exp() is 0 either way in fp16 and fp32 (every row keeps its own token open);
        # padding rows' rotary rows past the table's end are zeros here and its last row in Python, and
        # padding rows' outputs are dropped. The fp16 logits are widened to fp32 exactly on both sides.
        for step, ((_, logits), reference) in enumerate(zip(steps, sampler.seen)):
            torch.testing.assert_close(logits, reference, rtol=0, atol=0, msg=f"step {step}")
        assert r.info().dtype_bits == (16 if name == TWIN_FP16 else 32)
        assert r.info().position == MAX - 1 == generation.cache.pos  # the last id is sampled, not fed


def test_the_twin_notices_a_wrong_ring(twin):
    """Guards the test above: a ring that stops being written once full changes the twin's greedy ids."""
    n_new = MAX - len(PROMPT)
    expected, _ = python_greedy(twin(), PROMPT, n_new)
    generation = Generation(PteProgram(twin()), PROMPT, Sampler(0.0), n_new)
    cache, commit = generation.cache, generation.cache.commit

    def stuck(new_k, new_v, n):
        if cache.pos + n > CACHE:
            cache.pos += n
        else:
            commit(new_k, new_v, n)
    cache.commit = stuck
    assert list(generation) != expected


def test_info_reads_the_program(runner, twin):
    info, expected = runner.info(), PteProgram(twin()).info
    assert (info.seq_length, info.cache_len, info.max_seq_length, info.vocab_size, info.n_layers, info.dtype_bits,
            info.position) == (SEQ, CACHE, MAX, expected.vocab_size, expected.n_layers, 32, 0)
    assert (expected.seq_length, expected.cache_size, expected.max_seq_length) == (SEQ, CACHE, MAX)


def test_stop_ids_default_to_the_programs_eos_ids(runner, twin):
    assert runner.stop_ids() == list(PteProgram(twin()).info.eos_ids) == [2, 3]


def test_reset_starts_over(runner):
    runner.set_stop_ids([])
    first = runner.generate(PROMPT, 20)
    runner.reset()
    assert runner.info().position == 0 and runner.logits() is None
    assert runner.generate(PROMPT, 20) == first


def test_sampling_is_reproducible_under_a_seed(runner):
    runner.set_stop_ids([])

    def sample(seed, temperature=1.5, top_p=0.9):
        runner.reset()
        assert runner.set_sampling(temperature, top_p, seed) == native.Status.OK
        return runner.generate(PROMPT, 30)[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    runner.reset()
    runner.set_sampling(0.0)
    greedy = runner.generate(PROMPT, 30)[0]
    assert sample(7) != greedy
    assert sample(7, top_p=1e-6) == greedy  # the nucleus is the likeliest token alone


def test_bad_sampling_is_refused(runner):
    assert runner.set_sampling(-1.0) == native.Status.INVALID_ARGUMENT
    assert "temperature" in runner.error
    assert runner.set_sampling(1.0, top_p=0.0) == native.Status.INVALID_ARGUMENT
    assert "top_p" in runner.error


def test_stop_ids_end_a_generation(runner):
    runner.set_stop_ids([])
    ids, _ = runner.generate(PROMPT, 30)
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    runner.reset()
    runner.set_stop_ids([ids[k]])
    assert runner.generate(PROMPT, 30) == (ids[:k], native.Status.STOPPED)
    # A stop id is not fed: the position ends after ids[k - 1], and another next stops again.
    assert runner.info().position == len(PROMPT) + k
    assert runner.next() == (native.Status.STOPPED, ids[k])


def test_a_bad_path_gives_null_and_a_message(lib, tmp_path):
    with pytest.raises(native.OpenError, match="no such file"):
        native.Runner(lib, tmp_path / "missing.pte")
    (tmp_path / "junk.pte").write_bytes(b"not a program" * 10)
    with pytest.raises(native.OpenError, match="junk.pte: not an ExecuTorch program"):
        native.Runner(lib, tmp_path / "junk.pte")


def test_a_program_without_its_rotary_table_is_refused(lib, tmp_path):
    path = export_without_metadata(tmp_path / "bare.pte")
    with pytest.raises(native.OpenError, match="bare.pte: no constant method freqs_cos"):
        native.Runner(lib, path)


def test_a_prompt_longer_than_the_context_is_refused(runner):
    assert runner.prefill(list(range(1, MAX + 2))) == native.Status.CONTEXT_FULL
    assert f"pass the context of {MAX} tokens" in runner.error
    assert runner.info().position == 0  # nothing fed


def test_generation_ends_when_the_context_is_full(runner, twin):
    runner.set_stop_ids([])
    ids, status = runner.generate(PROMPT, 2 * MAX)
    # Every position fed, and one more id sampled from the last one's logits (the Python runner stops
    # before it: it keeps prompt and generated ids within max_seq_length).
    assert (len(ids), status) == (MAX - len(PROMPT) + 1, native.Status.CONTEXT_FULL)
    assert runner.info().position == MAX
    assert ids[:-1] == python_greedy(twin(), PROMPT)[0]


def test_bad_ids_and_order_are_refused(runner):
    assert runner.next()[0] == native.Status.NO_LOGITS
    vocab = runner.info().vocab_size
    assert runner.prefill([vocab]) == native.Status.INVALID_ARGUMENT
    assert "outside the vocabulary" in runner.error


def test_the_command_line_tool(build, twin):
    expected, _ = python_greedy(twin(), PROMPT, 10)
    done = subprocess.run([str(build[1]), str(twin()), "-n", "10", "--stop", ""], input=" ".join(map(str, PROMPT)),
                          capture_output=True, text=True, check=True)
    assert list(map(int, done.stdout.split())) == expected
    assert "tokens/s" in done.stderr
