"""smoke: export entry + canonical checkpoint + recipe ``smoke:`` -> generations, speeds and top-1
agreement with the fp32 reference; the stage fails when the program is broken.

Each prompt runs through the program once, with the runner's own code (``ane_build.runtime``): a
continuation of ``n_steps`` tokens (greedy at temperature 0, else sampled with seed 0). It gives

- the text shown (up to the first stop token) and the prefill / decode speeds;
- the top-1 agreement, teacher-forced: the fp32 ``ReferenceLlama`` reads the prompt and the same
  continuation in one pass, and at each of the ``n_steps`` positions its argmax is compared with
  the program's argmax there. Both always read the same tokens, so one early disagreement does
  not make every later position differ, as comparing two free generations would; greedy, the
  first disagreement is where their free generations would part.

The program is the Core ML ``model.pte`` where this runtime has the Core ML backend (macOS),
else the CPU twin lowered from the same exported program (Linux). On Linux the Core ML
program itself is then also run, through the reference interpreter, on the prompts' positions
and a slice of the evaluation text, in a second process while the twin reads the text
(``analysis.coreml_quality``; ``smoke.interpret_coreml``), and held to the same gates. The
entry holds ``smoke.json`` (every number) and ``smoke.md`` (for people).

For a chat model (the recipe's ``chat``), each prompt is a user's message: the program reads it
rendered by the checkpoint's chat template (``runtime.chat``), and smoke.md shows the message and
the assistant's reply, as an app's user sees them. The evaluation text is read as plain text either
way, so the quality numbers mean the same for every recipe.
"""

import contextlib
import json
import logging
import re
from datetime import datetime
from pathlib import Path

import torch

from ane_build import schema
from ane_build.analysis import coreml_quality, quality
from ane_build.model import io
from ane_build.model.reference import ReferenceLlama
from ane_build.runtime import chat, cpu_kernels
from ane_build.runtime.generate import Generation
from ane_build.runtime.program import PteProgram
from ane_build.runtime.sampling import Sampler
from ane_build.runtime.tokenizer import TextStream, Tokenizer
from ane_build.stages.export import MODEL_FILE, TWIN_FILE
from ane_build.util import worker
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
DEFAULTS = schema.SCHEMA["smoke"]  # for settings given without a recipe (a run by hand)
REPORT_JSON = "smoke.json"
REPORT_MD = "smoke.md"
SEED = 0
COREML = "CoreMLBackend"
# The delegate each file of an export entry runs on (the twin's ops beyond linears use portable kernels).
BACKENDS = {MODEL_FILE: COREML, TWIN_FILE: "XnnpackBackend"}
# The date a chat template's strftime_now tells (Llama 3's write it into the prompt): a fixed one, as
# smoke.md ships in a release that must come out the same bytes on every build.
CHAT_DATE = datetime(2025, 1, 1)


def run(inputs, params, out_dir):
    """inputs: {"export": export entry dir, "convert": canonical checkpoint dir}; params: the
    recipe's ``smoke:`` mapping, and its ``chat``."""
    from executorch.runtime import Runtime

    export_dir, out_dir = Path(inputs["export"]), Path(out_dir)
    spec = io.read_spec(export_dir)
    template_file = chat_template_file(export_dir, spec) if params.get("chat") else None
    runtime = choose_program(Runtime.get().backend_registry.registered_backend_names, spec["ane"]["dtype"])
    program = PteProgram(export_dir / runtime["program"])
    tokenizer = Tokenizer(export_dir / spec["tokenizer"])
    tokenizer.check_fits(program.info.vocab_size, runtime["program"])
    reference = ReferenceLlama.from_checkpoint(inputs["convert"])
    template = chat.for_program(template_file, tokenizer, program.info, now=CHAT_DATE) if template_file else None
    log.info("smoke: %s on %s, %d prompt(s)", runtime["program"], runtime["backend"], len(params["prompts"]))

    scored = [smoke_prompt(program, tokenizer, reference, prompt, params, template) for prompt in params["prompts"]]
    results = [result for result, _ in scored]
    evaluation, coreml, coreml_not_run = score_eval_and_coreml(export_dir, runtime, program, tokenizer, reference,
                                                               scored, params)
    summary = {**summarize(results, evaluation, runtime), **coreml_quality.summary(coreml)}
    report = {"runtime": runtime, "settings": {**params, "top_p": 1.0, "seed": SEED}, "summary": summary,
              "chat_template": spec["chat_template"] if template else None, "prompts": results, "eval_text": evaluation,
              "coreml": coreml, "coreml_not_run": coreml_not_run}
    # Written before the checks below, so a run by hand keeps the report of a program that fails them.
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / REPORT_MD).write_text(markdown(report))
    for result in results:
        check(result, params)
    if evaluation:
        check_eval(evaluation, params)
    if coreml:
        coreml_quality.check(coreml, params["min_top1_agreement"],
                             params.get("max_mean_kld", DEFAULTS["max_mean_kld"].default))
    return summary


def score_eval_and_coreml(export_dir, runtime, twin, tokenizer, reference, scored, params):
    """(the evaluation text's scores, the Core ML check's report, why it did not run). The
    interpreter reads model.pte in a second process (``worker``) while the twin reads the text."""
    n_eval = params.get("eval_tokens", DEFAULTS["eval_tokens"].default)
    results = [result for result, _ in scored]
    eval_windows, not_run = coreml_plan(runtime, tokenizer, twin.info, params, n_eval)
    interpreting = worker.beside_or_later(start="fork")(
        coreml_quality.interpret, export_dir / MODEL_FILE, coreml_quality.sequences(results, eval_windows)) \
        if not_run is None else contextlib.nullcontext()
    with interpreting as interpreted:
        kept = {}
        evaluation = quality.score_text(twin, tokenizer, reference, n_eval, keep=kept) if n_eval else None
        if not_run is not None:
            return evaluation, None, not_run
        done = interpreted()
    if done["info"] != twin.info or done["methods"] != twin.methods:
        raise UserError(str(export_dir), f"{MODEL_FILE} and {TWIN_FILE} state different shapes ({done['info']}, "
                                         f"{done['methods']} against {twin.info}, {twin.methods})")
    report = coreml_quality.report(done, results, [logprobs for _, logprobs in scored], evaluation, kept,
                                   twin.info.dtype)
    return evaluation, report, None


def coreml_plan(runtime, tokenizer, info, params, n_eval):
    """(the evaluation text's first windows that the interpreted Core ML program reads, None) where
    smoke interprets model.pte; else (None, why it does not)."""
    if runtime["program"] == MODEL_FILE:
        return None, "Smoke ran the Core ML program itself (this runtime has the Core ML backend)."
    if not params.get("interpret_coreml", DEFAULTS["interpret_coreml"].default):
        return None, "Not interpreted (smoke.interpret_coreml: false): every number above is the twin's."
    n = min(params.get("coreml_eval_tokens", DEFAULTS["coreml_eval_tokens"].default), n_eval)
    return quality.eval_windows(tokenizer, info, n) if n else [], None


def choose_program(registered_backends, dtype):
    """Which file of the export entry to run, and on what, as smoke.json records it; for the twin of
    a ``dtype`` program also the arithmetic this CPU's kernels compute it in, as its numbers depend on it."""
    name = MODEL_FILE if COREML in registered_backends else TWIN_FILE
    chosen = {"runtime": "executorch.runtime", "backend": BACKENDS[name], "program": name,
              "registered_backends": sorted(registered_backends)}
    if name == TWIN_FILE:
        chosen["twin_kernels"] = cpu_kernels.twin_arithmetic(dtype)
    return chosen


def chat_template_file(export_dir, spec):
    """The export's chat template (a chat recipe's convert made sure the checkpoint has one)."""
    if not spec.get("chat_template"):
        raise UserError("chat", f"true, but the export entry {export_dir} has no chat template beside its tokenizer")
    return export_dir / spec["chat_template"]


def smoke_prompt(program, tokenizer, reference, prompt, params, template=None):
    """One prompt's generation, speeds and teacher-forced agreement; with a chat ``template``, the
    prompt is a user's message the program reads through it."""
    info, n_steps = program.info, params["n_steps"]
    rendered, prompt_ids = template.prompt(prompt) if template else (None, tokenizer.prompt_ids(prompt, info))
    # The last token fed sits at position len + n_steps - 2 and should see every one before it:
    # past its window of cache_size past tokens, the program rightly sees less than the reference.
    needed = len(prompt_ids) + n_steps - 2
    if needed > info.cache_size:
        raise UserError("smoke.n_steps", f"prompt {prompt!r} ({len(prompt_ids)} tokens) with n_steps={n_steps} needs "
                                         f"{needed} past tokens in the KV cache to compare with the fp32 reference; "
                                         f"the program keeps ane.cache_size={info.cache_size}")
    watch = FiniteWatch(Sampler(params["temperature"], seed=SEED), prompt)
    # Past a stop token too: every position is scored; the text ends at the stop token.
    generation = Generation(program, prompt_ids, watch, n_steps)
    continuation = list(generation)
    stops = tokenizer.stop_ids(info)
    generated = continuation[:next((i for i, t in enumerate(continuation) if t in stops), len(continuation))]
    stream = TextStream(tokenizer, prompt_ids)
    text = "".join(stream.push(token) for token in generated) + stream.flush()

    reference_logprobs = reference_along(reference, prompt_ids, continuation)
    predicted, expected = watch.argmaxes, reference_logprobs.argmax(-1).tolist()
    agreeing = sum(p == e for p, e in zip(predicted, expected))
    stats = generation.stats
    result = {
        "prompt": prompt, **({"rendered_prompt": rendered} if template else {}), "prompt_ids": prompt_ids,
        "generated_ids": generated, "text": text,
        "top1_agreement": agreeing / len(predicted), "agreeing_positions": agreeing, "positions": len(predicted),
        "first_divergence": next((i for i, (p, e) in enumerate(zip(predicted, expected)) if p != e), None),
        "reference_ids": expected, "program_ids": predicted, "continuation_ids": continuation,
        # Every logit vector was checked (a non-finite one fails the stage at once).
        "finite_logits_checked": len(watch.argmaxes),
        "prefill": {"tokens": stats.prompt_tokens, "seconds": stats.prefill_seconds,
                    "tokens_per_second": stats.prefill_tokens_per_second},
        "decode": {"tokens": stats.decode_calls, "seconds": stats.decode_seconds,
                   "tokens_per_second": stats.decode_tokens_per_second},
    }
    log.info("smoke %r -> %r: top-1 agreement %.3f, decode %.1f tokens/s", prompt, text, result["top1_agreement"],
             stats.decode_tokens_per_second)
    # Each position's log-probabilities, for the Core ML program to be compared with.
    return result, {"reference": reference_logprobs, "twin": torch.stack(watch.logprobs)}


class FiniteWatch:
    """A sampler that first refuses logits holding a NaN or inf (sampling would fail on them, or
    pick a meaningless token), and keeps each one's argmax and log-probabilities."""

    def __init__(self, sampler, prompt):
        self.sampler, self.prompt, self.argmaxes, self.logprobs = sampler, prompt, [], []

    def __call__(self, logits):
        check_finite(logits, self.prompt, f"generated token {len(self.argmaxes)}")
        self.argmaxes.append(int(logits.argmax()))
        self.logprobs.append(logits.double().log_softmax(-1))
        return self.sampler(logits)


def check_finite(logits, prompt, where):
    if not torch.isfinite(logits).all():
        raise UserError("smoke", f"prompt {prompt!r}: the program's logits hold NaN or inf at {where}: the "
                                 "exported program is broken")


def reference_along(reference, prompt_ids, continuation):
    """The reference's log-probabilities after the prompt and after each token of ``continuation``
    but the last, from one pass over them all."""
    logits = reference(torch.tensor([prompt_ids + continuation[:-1]]))[0, len(prompt_ids) - 1:]
    return logits.double().log_softmax(-1)


def summarize(results, evaluation, runtime):
    """The stage's metrics: the worst agreement, the evaluation text's, and speeds over every prompt's tokens."""
    def rate(phase):
        seconds = sum(r[phase]["seconds"] for r in results)
        return sum(r[phase]["tokens"] for r in results) / seconds if seconds else 0.0

    return {"min_top1_agreement": min(r["top1_agreement"] for r in results),
            "prefill_tokens_per_second": round(rate("prefill"), 1),
            "decode_tokens_per_second": round(rate("decode"), 1),
            "eval_top1_agreement": evaluation and evaluation.get("top1_agreement"),
            "eval_mean_kld": evaluation and evaluation.get("mean_kld"),
            "eval_positions": evaluation and evaluation["positions"],
            "program": runtime["program"], "backend": runtime["backend"]}


def check(result, params):
    """Fail on a generation that says the program is broken, or on agreement below the recipe's bar."""
    prompt, generated = result["prompt"], result["generated_ids"]
    if not generated:
        raise UserError("smoke", f"prompt {prompt!r}: the generation is empty (its first token is a stop token)")
    loop = quality.repeating_tail(generated)
    if loop:
        raise UserError("smoke", f"prompt {prompt!r}: the generation ends in {len(loop[0])} token(s) {loop[0]} "
                                 f"repeated {loop[1]} times, of {len(generated)} generated: the model has lost its way")
    if result["top1_agreement"] < params["min_top1_agreement"]:
        raise UserError("smoke.min_top1_agreement",
                        f"prompt {prompt!r}: top-1 agreement with the fp32 reference is "
                        f"{result['top1_agreement']:.3f} ({result['agreeing_positions']} of {result['positions']} "
                        f"teacher-forced positions, first divergence at {result['first_divergence']}), below "
                        f"{params['min_top1_agreement']}")


def check_eval(evaluation, params):
    """Fail when the program does not follow the fp32 model on the evaluation text."""
    where = f"evaluation text ({evaluation['tokens']} tokens)"
    if not evaluation["finite"]:
        raise UserError("smoke", f"{where}: the program's logits hold NaN or inf: the exported program is broken")
    if evaluation["top1_agreement"] < params["min_top1_agreement"]:
        raise UserError("smoke.min_top1_agreement", f"{where}: top-1 agreement with the fp32 reference is "
                                                    f"{evaluation['top1_agreement']:.3f}, below "
                                                    f"{params['min_top1_agreement']}")
    limit = params.get("max_mean_kld", DEFAULTS["max_mean_kld"].default)
    if evaluation["mean_kld"] > limit:
        raise UserError("smoke.max_mean_kld", f"{where}: mean KL divergence from the fp32 reference is "
                                              f"{evaluation['mean_kld']:.4f}, above {limit}")


def markdown(report):
    """The report for people: what ran, and its quality. Not its speeds (smoke.json has them): they
    are the build host's, and would make a release bundle, which ships this file, differ on each build."""
    runtime, settings, summary = report["runtime"], report["settings"], report["summary"]
    ran = f"`{runtime['program']}` through {runtime['runtime']} on {runtime['backend']}"
    if runtime["program"] == TWIN_FILE:
        kernels = runtime["twin_kernels"]
        ran += (f" (the CPU twin of `{MODEL_FILE}`: this runtime has no {COREML}), computing in "
                f"{kernels['arithmetic']} on {kernels['cpu'] or kernels['machine']} (inferred from its features)")
    sampling = "greedy" if settings["temperature"] == 0 else f"temperature {settings['temperature']}, seed {SEED}"
    lines = [
        "# Smoke test", "",
        (f"Ran {ran}. {settings['n_steps']} tokens per prompt, {sampling}. Top-1 agreement with the fp32 "
         f"reference over {settings['n_steps']} teacher-forced positions: at least "
         f"{settings['min_top1_agreement']} required, {summary['min_top1_agreement']:.3f} at worst."
         + _chat_sentence(report.get("chat_template"))), "",
        "| prompt | top-1 agreement | first divergence |",
        "|---|---|---|",
    ]
    for r in report["prompts"]:
        divergence = "none" if r["first_divergence"] is None else r["first_divergence"]
        lines.append(f"| {_cell(r['prompt'])} | {r['top1_agreement']:.3f} | {divergence} |")
    lines += _eval_lines(report["eval_text"], settings)
    lines += coreml_quality.markdown(report.get("coreml"), report.get("coreml_not_run"))
    for r in report["prompts"]:
        lines += ["", f"## {_cell(r['prompt'])}", ""] + _generation(r, report.get("chat_template"))
    return "\n".join(lines) + "\n"


def _chat_sentence(chat_template):
    return (f" A chat model: each prompt is a user's message, which the program read through the checkpoint's "
            f"chat template (`{chat_template}`); below, the assistant's reply to it.") if chat_template else ""


def _generation(result, chat_template):
    """The prompt and what the program wrote: a continuation of plain text, or a chat's two turns (the
    template's own text is in smoke.json, not here: an app's user never sees it)."""
    fence = _fence(result["prompt"] + result["text"])
    if not chat_template:
        return [fence, result["prompt"] + result["text"], fence]
    return ["User:", "", fence, result["prompt"], fence, "", "Assistant:", "", fence, result["text"].strip(), fence]


def _eval_lines(evaluation, settings):
    if not evaluation:
        return ["", "No evaluation text was scored (smoke.eval_tokens: 0)."]
    if not evaluation["finite"]:
        return ["", "On the evaluation text the program's logits held NaN or inf."]
    limit = settings.get("max_mean_kld", DEFAULTS["max_mean_kld"].default)
    return ["", f"Evaluation text ({evaluation['source']}, sha256 {evaluation['sha256'][:12]}), "
                f"{evaluation['positions']} teacher-forced positions in {evaluation['windows']} windows: top-1 agreement "
                f"{evaluation['top1_agreement']:.3f} (at least {settings['min_top1_agreement']} required), "
                f"mean KL divergence from fp32 {evaluation['mean_kld']:.4f} (at most "
                f"{limit} allowed; 99th percentile {evaluation['p99_kld']:.4f}, "
                f"max {evaluation['max_kld']:.4f})."]


def _cell(text):
    return " ".join(text.split()).replace("|", "\\|")


def _fence(text):
    """A code fence longer than any run of backticks in ``text``, so generated text cannot close it."""
    longest = max(map(len, re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)
