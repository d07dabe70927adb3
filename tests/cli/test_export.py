"""`ane-build export` / `python -m ane_build.cli.export`: the seed export.py's flags, through the stage code."""

import json
import subprocess
import sys

import pytest
import torch

from tests.tiny_llama import tiny_params, tiny_weights

SETTINGS = ["--seq_length", "8", "--max_seq_length", "32", "--use_cache_list", "--target_split_size", "64",
            "--coreml-quantize", "c4w", "--dtype", "fp16"]


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """params.json + consolidated .pth of a tiny Llama, as a user of the seed would pass them."""
    folder = tmp_path_factory.mktemp("seed")
    params = tiny_params()
    torch.save(tiny_weights(params), folder / "model.pth")
    (folder / "params.json").write_text(json.dumps(params))  # the seed's ModelArgs fields, as convert writes
    return folder


def export(folder, *flags):
    return subprocess.run([sys.executable, "-m", "ane_build.cli.export", "-p", str(folder / "params.json"),
                           "-c", str(folder / "model.pth"), *flags], capture_output=True, text=True)


def one_line_error(proc):
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_seed_flags_write_a_delegated_pte_and_its_twin(seed_files, tmp_path):
    from executorch.runtime import Runtime

    out = tmp_path / "out" / "tiny.pte"
    proc = export(seed_files, "-n", str(out), *SETTINGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and (tmp_path / "out/tiny.twin.pte").is_file()
    assert "100.0% of ops delegated" in (tmp_path / "out/tiny.delegation.txt").read_text()
    twin = Runtime.get().load_program(tmp_path / "out/tiny.twin.pte")
    # Seed parity: one forward method of seq_length tokens (no prefill unless a decode method is asked
    # for), plus the runner metadata and the rotary table.
    assert "forward" in twin.method_names and "prefill" not in twin.method_names
    assert list(twin.metadata("forward").input_tensor_meta(0).sizes()) == [1, 8]
    assert twin.load_method("seq_length").execute([]) == [8]
    assert {"freqs_cos", "freqs_sin"} <= set(twin.method_names)


@pytest.mark.parametrize("flags, expected", [
    (["--seq_length", "0"], "--seq_length: expected at least 1; got 0"),
    (["--dtype", "bf16"], "--dtype: expected one of fp16, fp32; got 'bf16' (the Neural Engine computes in fp16"),
    (["-E", "3,32"], "-E/--embedding-quantize: expected a value matching"),
    (["--seq_length", "64", "--max_seq_length", "64"], "--cache_size: expected 1 <= cache_size < max_seq_length (64); got 0"),
    (["--max_seq_length", "32", "--cache_size", "32"], "--cache_size: expected 1 <= cache_size < max_seq_length (32); got 32"),
    (["--compute_unit", "NPU"], "--compute_unit: expected one of CPU_ONLY"),
    (["--max_payload_mb", "0"], "--max_payload_mb: expected at least 0.01; got 0.0"),
    (["--coreml-quantize", "b4w", "--minimum_deployment_target", "iOS17"], "weights (b4w) need export.minimum_deployment_target iOS18"),
])
def test_bad_flags_are_one_line(seed_files, tmp_path, flags, expected):
    out = tmp_path / "x.pte"
    line = one_line_error(export(seed_files, "-n", str(out), *flags))
    assert line.startswith("error: ane-build export: ") and expected in line
    assert not out.exists()


def test_split_size_that_does_not_divide_is_one_line(seed_files, tmp_path):
    out = tmp_path / "x.pte"
    line = one_line_error(export(seed_files, "-n", str(out), "--seq_length", "8", "--max_seq_length", "32",
                                 "--target_split_size", "100"))
    assert "ane.target_split_size" in line and not out.exists()


def test_checkpoint_whose_shapes_do_not_match_params(seed_files, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    params = tiny_params(hidden_dim=96)
    torch.save(tiny_weights(params), wrong / "model.pth")
    (wrong / "params.json").write_text((seed_files / "params.json").read_text())
    line = one_line_error(export(wrong, "-n", str(tmp_path / "x.pte")))
    assert "feed_forward.w1.weight has shape [96, 64]" in line


def test_missing_checkpoint(seed_files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.export", "-p", str(seed_files / "params.json"),
                           "-c", str(tmp_path / "nope.pth")], capture_output=True, text=True)
    assert "nope.pth: checkpoint not found" in one_line_error(proc)
