import pytest

from ane_build.runtime import cpu_kernels
from ane_build.stages import smoke
from ane_build.util.errors import UserError
from tests.stages.tiny_export import SMOKE, chat_entries, convert_entry, entries, read_json, released, run_smoke
from tests.tiny_llama import tiny_params, tiny_weights


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return entries(tmp_path_factory, "fp32")


def test_an_fp32_twin_agrees_with_the_fp32_reference_everywhere(tmp_path_factory):
    entry = released(tmp_path_factory)["smoke"]
    report = read_json(entry / smoke.REPORT_JSON)
    assert report["runtime"] == {"runtime": "executorch.runtime", "backend": "XnnpackBackend",
                                 "program": "twin.pte", "registered_backends": report["runtime"]["registered_backends"],
                                 "twin_kernels": cpu_kernels.twin_arithmetic("fp32")}
    assert report["summary"]["min_top1_agreement"] == 1.0
    assert report["summary"]["decode_tokens_per_second"] > 0
    assert [r["prompt"] for r in report["prompts"]] == SMOKE["prompts"]
    for r in report["prompts"]:
        assert (r["top1_agreement"], r["first_divergence"]) == (1.0, None)
        assert r["program_ids"] == r["reference_ids"] and len(r["reference_ids"]) == SMOKE["n_steps"]
        # Greedy, the generation is the program's argmax, so here the reference's too (up to a stop token).
        assert r["generated_ids"] == r["reference_ids"][:len(r["generated_ids"])] and r["generated_ids"]
        assert r["positions"] == SMOKE["n_steps"]
        assert r["prompt_ids"][0] == 1  # bos, as the runner adds it
        assert r["prefill"]["tokens"] == len(r["prompt_ids"]) and r["prefill"]["tokens_per_second"] > 0
        assert r["finite_logits_checked"] == SMOKE["n_steps"]
    evaluation = report["eval_text"]
    # fp32 both: they can differ only by summation order, never by a token's rank.
    assert evaluation["finite"] and evaluation["top1_agreement"] == 1.0 and evaluation["mean_kld"] < 1e-6
    # Windows of the KV cache's 40 slots, each from an empty cache: 40 + 40 + 20 tokens.
    assert (evaluation["tokens"], evaluation["windows"], evaluation["positions"]) == (100, 3, 97)
    assert report["summary"]["eval_top1_agreement"] == 1.0
    text = (entry / smoke.REPORT_MD).read_text()
    assert "97 teacher-forced positions in 3 windows: top-1 agreement 1.000" in text
    first = report["prompts"][0]
    assert "`twin.pte` through executorch.runtime on XnnpackBackend" in text
    assert f"computing in fp32 on {report['runtime']['twin_kernels']['cpu']} (inferred from its features)" in text
    assert f"| {first['prompt']} | 1.000 | none |" in text
    assert first["prompt"] + first["text"] in text


def test_sampling_is_seeded(fp32, tmp_path):
    generated = []
    for run in ("a", "b"):
        run_smoke(fp32, tmp_path / run, temperature=0.8, min_top1_agreement=0.0)
        generated.append([r["generated_ids"] for r in read_json(tmp_path / run / smoke.REPORT_JSON)["prompts"]])
    assert generated[0] == generated[1]


def fails(inputs, out_dir, **overrides):
    """The one-line message of the smoke stage's UserError."""
    with pytest.raises(UserError) as error:
        run_smoke(inputs, out_dir, **overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_other_weights_than_the_checkpoints_fail_the_agreement_bar(fp32, tmp_path):
    other = convert_entry(tmp_path / "other", tiny_weights(tiny_params(), seed=1))
    message = fails({**fp32, "convert": other}, tmp_path / "smoke")
    assert message.startswith(f"smoke.min_top1_agreement: prompt {SMOKE['prompts'][0]!r}: top-1 agreement with "
                              "the fp32 reference is ")
    assert message.endswith("below 1.0") and f"of {SMOKE['n_steps']} teacher-forced positions" in message


def test_nan_logits_fail(tmp_path_factory, tmp_path):
    message = fails(entries(tmp_path_factory, "nan"), tmp_path / "smoke")
    assert message.startswith(f"smoke: prompt {SMOKE['prompts'][0]!r}: the program's logits hold NaN or inf at ")


def test_one_token_over_and_over_fails(tmp_path_factory, tmp_path):
    inputs = entries(tmp_path_factory, "zero-output")
    message = fails(inputs, tmp_path / "smoke")
    assert message == (f"smoke: prompt {SMOKE['prompts'][0]!r}: the generation ends in 1 token(s) [0] repeated "
                       f"{SMOKE['n_steps']} times, of {SMOKE['n_steps']} generated: the model has lost its way")
    # It agrees with its reference, which repeats too: the repeat alone failed it.
    assert read_json(tmp_path / "smoke" / smoke.REPORT_JSON)["summary"]["min_top1_agreement"] == 1.0


def test_a_degenerate_tail_fails_even_with_agreement():
    result = {"prompt": "p", "generated_ids": [11, 12, 13, 14, 9, 8, 9, 8, 9, 8], "top1_agreement": 1.0}
    with pytest.raises(UserError, match=r"^smoke: prompt 'p': the generation ends in 2 token\(s\) \[9, 8\] repeated "
                                        r"3 times, of 10 generated: the model has lost its way$"):
        smoke.check(result, {"min_top1_agreement": 0.5})


def test_the_evaluation_text_has_its_own_gates():
    evaluation = {"tokens": 512, "finite": True, "top1_agreement": 0.96, "mean_kld": 0.03}
    smoke.check_eval(evaluation, {"min_top1_agreement": 0.95, "max_mean_kld": 0.05})
    with pytest.raises(UserError, match=r"^smoke.max_mean_kld: evaluation text \(512 tokens\): mean KL divergence "
                                        r"from the fp32 reference is 0.0300, above 0.02$"):
        smoke.check_eval(evaluation, {"min_top1_agreement": 0.95, "max_mean_kld": 0.02})
    with pytest.raises(UserError, match=r"^smoke.min_top1_agreement: evaluation text \(512 tokens\): top-1 "
                                        r"agreement with the fp32 reference is 0.960, below 0.97$"):
        smoke.check_eval(evaluation, {"min_top1_agreement": 0.97, "max_mean_kld": 0.05})
    with pytest.raises(UserError, match="NaN or inf"):
        smoke.check_eval({"tokens": 512, "finite": False}, {"min_top1_agreement": 0.0})


def test_positions_past_the_kv_cache_window_are_refused(fp32, tmp_path):
    message = fails(fp32, tmp_path / "smoke", n_steps=40)
    assert message.startswith(f"smoke.n_steps: prompt {SMOKE['prompts'][0]!r} (")
    assert message.endswith("the program keeps ane.cache_size=40")


def test_a_runtime_with_core_ml_runs_model_pte():
    coreml = smoke.choose_program(["XnnpackBackend", "CoreMLBackend"], "fp16")
    assert coreml["program"] == "model.pte" and "twin_kernels" not in coreml
    twin = smoke.choose_program(["XnnpackBackend"], "fp16")
    assert twin["program"] == "twin.pte" and twin["twin_kernels"] == cpu_kernels.twin_arithmetic("fp16")


def test_generated_text_cannot_close_its_fence():
    assert smoke._fence("plain") == "```" and smoke._fence("a ```` b") == "`````"



def test_a_stop_token_ends_the_text_but_every_position_is_scored(fp32, tmp_path, monkeypatch):
    from ane_build.runtime.tokenizer import Tokenizer

    run_smoke(fp32, tmp_path / "free")
    free = read_json(tmp_path / "free" / smoke.REPORT_JSON)["prompts"][0]
    stop = free["generated_ids"][3]
    first = free["generated_ids"].index(stop)
    monkeypatch.setattr(Tokenizer, "stop_ids", lambda self, info: {stop})
    run_smoke(fp32, tmp_path / "stopped")
    stopped = read_json(tmp_path / "stopped" / smoke.REPORT_JSON)["prompts"][0]
    assert stopped["generated_ids"] == free["generated_ids"][:first]
    assert stopped["text"] != free["text"] and free["text"].startswith(stopped["text"].rstrip())
    assert (stopped["positions"], stopped["program_ids"]) == (SMOKE["n_steps"], free["program_ids"])


def test_a_chat_model_reads_each_prompt_as_a_users_message(tmp_path_factory, tmp_path):
    inputs = chat_entries(tmp_path_factory)
    run_smoke(inputs, tmp_path / "smoke", chat=True)
    report = read_json(tmp_path / "smoke" / smoke.REPORT_JSON)
    plain = read_json(released(tmp_path_factory)["smoke"] / smoke.REPORT_JSON)
    assert report["chat_template"] == "chat_template.jinja" and report["settings"]["chat"] is True
    for r, message in zip(report["prompts"], SMOKE["prompts"]):
        assert r["prompt"] == message and r["rendered_prompt"] == f"<s>[INST] {message} [/INST]"
        assert r["prompt_ids"][0] == 1 and r["prompt_ids"].count(1) == 1  # the template's bos, and no other
        assert r["top1_agreement"] == 1.0
    # The evaluation text is read as plain text: the same numbers as without the template.
    assert report["eval_text"] == plain["eval_text"]
    text = (tmp_path / "smoke" / smoke.REPORT_MD).read_text()
    assert "each prompt is a user's message, which the program read through the checkpoint's chat template" in text
    first = report["prompts"][0]
    assert f"User:\n\n```\n{first['prompt']}\n```\n\nAssistant:\n\n```\n{first['text'].strip()}\n```" in text
    assert "[INST]" not in text and "<s>" not in text


def test_a_chat_recipe_needs_the_template_in_its_export_entry(fp32, tmp_path):
    message = fails(fp32, tmp_path / "smoke", chat=True)
    assert message == f"chat: true, but the export entry {fp32['export']} has no chat template beside its tokenizer"
