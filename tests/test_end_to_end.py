"""The real default recipe (SmolLM2-135M for iPhone 15 Pro), from an empty artifacts folder.

Minutes, not seconds: it is the one test that builds the real model the way a user does.
"""

import json
import os
import subprocess
import sys

import pytest

from ane_build import pipeline
from tests.test_tasks import ROOT, executed

RECIPE = "smollm2-135m/iphone15pro"


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_gguf):
    artifacts = tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "ANE_BUILD_ARTIFACTS": str(artifacts)}
    env.pop("ANE_BUILD_RECIPES", None)
    env.pop("ANE_BUILD_DEFAULT", None)

    def doit(*args):
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    first = doit()
    return artifacts, first, doit


@pytest.mark.slow
def test_default_build_runs_every_stage_of_the_default_recipe(built):
    _, first, _ = built
    ran = [name.split(":")[0] for name in executed(first)]
    assert sorted(ran) == sorted(["fetch", "convert", "calibrate", "rewrite", "quantize", "export", "smoke", "release"])
    # calibrate and rewrite both read convert alone: doit may run either first; each after what it reads.
    assert all(ran.index(up) < ran.index(stage) for stage in ran for up in pipeline.BY_NAME[stage].upstream)


@pytest.mark.slow
def test_the_default_fits_its_weights_within_the_budget_and_shares_the_embedding(built):
    """120 MB of weights (the recipe's budget_mb), 8 bits where the calibration finds the model sensitive
    and 6-bit palettes elsewhere; the embedding read from the LM head: model.pte under the 130 MB goal."""
    artifacts, _, _ = built
    folder = artifacts / "recipes" / RECIPE
    allocation = json.loads((folder / "quantize" / "allocation.json").read_text())
    assert allocation["weights_mb"] <= allocation["budget_mb"] == 120
    assert allocation["kinds"]["c8w"] and allocation["kinds"]["lut6"]
    assert (folder / "export" / "model.pte").stat().st_size < 130e6
    assert json.loads((folder / "calibrate" / "calibration.json").read_text())["windows"] == 8


@pytest.mark.slow
def test_default_export_is_one_fully_delegated_core_ml_program_with_a_twin(built):
    artifacts, _, _ = built
    export = artifacts / "recipes" / RECIPE / "export"
    report = json.loads((export / "delegation.json").read_text())
    assert report["delegated_share"] == 1.0 and report["cpu_ops"] == {}
    assert {m: r["partitions"] for m, r in report["methods"].items()} == {"forward": 1, "prefill": 1, "verify": 1}
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["metrics"]["pte_over_ideal"] < 1.1
    assert manifest["metrics"]["lint_findings"] == 0  # what the lint allows is listed in lint.md
    assert (export / "twin.pte").stat().st_size > 0


@pytest.mark.slow
def test_a_second_doit_executes_nothing(built):
    _, _, doit = built
    assert executed(doit()) == []


@pytest.mark.slow
def test_smoke_ran_the_twin_and_passed_its_gate(built):
    artifacts, _, _ = built
    report = json.loads((artifacts / "recipes" / RECIPE / "smoke" / "smoke.json").read_text())
    assert report["runtime"]["program"] == "twin.pte"  # Linux: no Core ML backend
    for result in report["prompts"]:
        # A stop token may end the text; every one of the 32 positions is scored all the same.
        assert 0 < len(result["generated_ids"]) <= 32 and result["positions"] == 32 and result["text"].strip()
    summary, settings = report["summary"], report["settings"]
    assert summary["min_top1_agreement"] >= settings["min_top1_agreement"]
    assert summary["eval_top1_agreement"] >= settings["min_top1_agreement"] >= 0.9
    assert summary["eval_mean_kld"] <= settings["max_mean_kld"] <= 0.02
    # 4096 tokens in windows of the 1023-slot cache, each chapter starting one: 4096 - 5 positions.
    assert (report["eval_text"]["tokens"], report["eval_text"]["windows"], report["eval_text"]["positions"]) == \
        (4096, 5, 4091)
    assert summary["decode_tokens_per_second"] > 0


@pytest.mark.slow
def test_smoke_ran_the_core_ml_program_too_and_it_agrees_with_the_twin_within_the_fp16_bound(built):
    """The shipped bytes themselves (model.pte's Core ML program, through the interpreter): smoke's gates,
    and, call by call, within the fp16 bound of exact arithmetic that the twin is held to."""
    from ane_build import recipe
    from tests.runtime.test_coreml import check_within_the_fp16_bound, outputs_and_bounds

    artifacts, _, _ = built
    folder = artifacts / "recipes" / RECIPE
    report = json.loads((folder / "smoke" / "smoke.json").read_text())
    summary, settings = report["summary"], report["settings"]
    assert report["coreml"]["eval_text"]["positions"] == 511  # through the verify method
    assert summary["coreml_min_top1_agreement"] >= settings["min_top1_agreement"]
    assert summary["coreml_eval_top1_agreement"] >= settings["min_top1_agreement"]
    assert summary["coreml_eval_mean_kld"] <= settings["max_mean_kld"]
    assert "## The Core ML program" in (folder / "smoke" / "smoke.md").read_text()
    quantize_params = recipe.load(ROOT / "recipes" / f"{RECIPE}.yaml", ROOT / "recipes")["quantize"]
    entries = {stage: folder / stage for stage in ("rewrite", "calibrate", "export")}
    check_within_the_fp16_bound(outputs_and_bounds(entries, quantize_params))


@pytest.mark.slow
def test_the_default_release_knows_the_capital_of_france(built):
    artifacts, _, _ = built
    report = json.loads((artifacts / "recipes" / RECIPE / "smoke" / "smoke.json").read_text())
    # A chat model: the prompt is a user's message, which the program read through the GGUF's chat template.
    france = next(r for r in report["prompts"] if r["prompt"] == "What is the capital of France?")
    assert france["rendered_prompt"].endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert "Paris" in france["text"].replace(".", " ").split()


@pytest.mark.slow
def test_release_bundle_verifies(built):
    artifacts, _, _ = built
    bundle = artifacts / "release" / RECIPE
    names = {p.name for p in bundle.iterdir()}
    assert {"model.pte", "tokenizer.json", "chat_template.jinja", "manifest.json", "smoke.md",
            "smollm2-135m-iphone15pro.tar.gz"} <= names
    for target in (bundle, bundle / "smollm2-135m-iphone15pro.tar.gz"):
        proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "verify", str(target)],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr


@pytest.mark.slow
def test_upstreams_runner_and_lookahead_write_what_ane_build_run_writes_on_the_twin(built):
    """ExecuTorch's run_static_llm_multifunction.py, unmodified from the wheel, and ``--lookahead``
    (upstream's lookahead_decode on the verify method): the greedy text of ``ane-build run``."""
    from tests.runtime.test_upstream_runner import generated_text

    artifacts, _, _ = built
    export = artifacts / "recipes" / RECIPE / "export"
    prompt, n = "Once upon a time,", "24"

    def run(*argv):
        proc = subprocess.run([sys.executable, *argv], cwd=export, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    upstream = run("-m", "executorch.examples.apple.coreml.llama.run_static_llm_multifunction", "-m", "twin.pte",
                   "-p", "params.json", "-t", "tokenizer.json", "--input_len", "64", "--max_context_len", "1024",
                   "--temperature", "0", "--prompt", prompt, "--max_new_tokens", n)
    ours = run("-m", "ane_build.cli.main", "run", "-m", "twin.pte", "--temperature", "0", "--prompt", prompt,
               "--n_steps", n)
    lookahead = run("-m", "ane_build.cli.main", "run", "-m", "twin.pte", "--temperature", "0", "--prompt", prompt,
                    "--n_steps", n, "--lookahead")
    assert len(ours) > len(prompt) + 40
    assert prompt + generated_text(upstream, prompt) + "\n" == ours == lookahead

