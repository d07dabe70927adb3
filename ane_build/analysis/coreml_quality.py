"""The Core ML program itself, scored where Core ML cannot run: ``model.pte`` through the reference
interpreter (``runtime.coreml``), beside the CPU twin that smoke generated with.

The twin is lowered from the same exported program as the Core ML payload, but the payload
alone passes through coremltools' conversion, its weight formats and our rewrites of it. So
the interpreted program reads what the twin read, teacher-forced, and is compared at each
position with the fp32 reference (the gates smoke applies to the twin apply to it too) and
with the twin (how far conversion moved it):

- each smoke prompt: the prompt in one call of the longest method (the prefill),
  then the twin's continuation one decode call per token: the positions smoke scores the
  twin at, through the methods an app generates with;
- the first ``coreml_eval_tokens`` tokens of the evaluation text (the windows
  ``quality.score_text`` scores first), as the twin read them: seq_length positions per call
  of the verify method where the program has one, else one token per call.

``interpret`` does the interpreter's part alone (smoke runs it in a second process while the
twin reads the evaluation text); ``report`` compares its logits with the twin's and the
reference's log-probabilities, which smoke computed anyway. Top-1 agreement and mean
KL(reference || Core ML) as ``quality`` reports them for the twin, and KL(twin || Core ML).
"""

import logging
import math
import time

log = logging.getLogger(__name__)
ARITHMETIC = "each op computed in fp32, its output rounded to the dtype the program declares ({dtype} here)"
WHO = "model.pte (the Core ML program, interpreted)"
SUMMARY_KEYS = ("coreml_min_top1_agreement", "coreml_eval_top1_agreement", "coreml_eval_mean_kld",
                "coreml_eval_positions", "coreml_twin_min_top1_agreement", "coreml_twin_max_mean_kld")


def logits_along(program, prompt_ids, continuation, verify):
    """Logits [len(continuation), vocab] of ``program`` after the prompt and after each token of
    ``continuation`` but the last (``kv_cache.teacher_forced``); a numpy array, which crosses
    processes as plain bytes (torch's tensors go as shared memory, gone with the process)."""
    from ane_build.runtime.kv_cache import KVCache, teacher_forced

    cache = KVCache(program.info, program.methods, program.rope)
    return teacher_forced(program, cache, prompt_ids, continuation, verify).clone().numpy()


def sequences(prompts, eval_windows):
    """What the Core ML program reads: (prompt ids, continuation, through verify) of each of smoke's
    prompt results, through the methods an app generates with, then each window of the evaluation
    text (its first token as the prompt), through the verify method where the program has one (as
    the twin read them)."""
    out = [(p["prompt_ids"], p["continuation_ids"], False) for p in prompts]
    return out + [(window[:1], window[1:], True) for window in eval_windows]


def interpret(path, token_sequences):
    """{"info", "methods", "logits": [per sequence], "seconds", "calls"} of the Core ML program in
    ``path`` read through the interpreter (fp16 logits, as the program gives them: exact)."""
    from ane_build.runtime.coreml import CoreMLProgram

    started = time.perf_counter()
    program = CoreMLProgram(path)
    loaded = time.perf_counter()
    calls, run = [], program.run
    program.run = lambda method, call: calls.append(method) or run(method, call)
    logits = [logits_along(program, *sequence) for sequence in token_sequences]
    done = time.perf_counter()
    calls = len(calls)
    log.info("interpreted %s: %d calls in %.1f s (loaded in %.1f s)", path, calls, done - loaded, loaded - started)
    return {"info": program.info, "methods": program.methods, "logits": logits, "calls": calls,
            "seconds": {"load": round(loaded - started, 2), "calls": round(done - loaded, 2)}}


def compare(want, got):
    """{positions, finite, top1_agreement, first_divergence, mean_kld, max_kld} of log-probabilities
    ``got`` against ``want`` ([positions, vocab]); KL(want || got) per position."""
    kld = (want.exp() * (want - got)).sum(-1).tolist()
    same = (want.argmax(-1) == got.argmax(-1)).tolist()
    result = {"positions": len(same), "finite": all(math.isfinite(k) for k in kld),
              "top1_agreement": sum(same) / len(same),
              "first_divergence": next((i for i, s in enumerate(same) if not s), None)}
    if result["finite"]:
        result.update(mean_kld=sum(kld) / len(kld), max_kld=max(kld))
    return result


def _scored(logits, reference, twin):
    import torch

    got = torch.from_numpy(logits).double().log_softmax(-1)
    versus_twin = compare(twin, got)
    return {**compare(reference, got),
            "twin": {k: versus_twin.get(k) for k in ("top1_agreement", "first_divergence", "mean_kld", "max_kld")}}


def _scored_windows(logits, evaluation, eval_logprobs):
    """The evaluation windows' scores; the last window may be a prefix of the twin's."""
    import numpy
    import torch

    lengths = [len(x) for x in logits]
    reference, twin = (torch.cat([rows[:n] for rows, n in zip(eval_logprobs[key], lengths)])
                       for key in ("reference", "program"))
    return {"source": evaluation["source"], "sha256": evaluation["sha256"], "tokens": sum(lengths) + len(lengths),
            "windows": len(lengths), **_scored(numpy.concatenate(logits), reference, twin)}


def report(interpreted, prompts, prompt_logprobs, evaluation, eval_logprobs, dtype):
    """The Core ML check for smoke.json: ``interpreted`` is ``interpret``'s result for
    ``sequences(prompts, eval ids)``; ``prompt_logprobs`` [{"reference", "twin"}] per prompt and
    ``eval_logprobs`` (``quality.score_text``'s ``keep``) give the same positions' log-probabilities."""
    logits = interpreted["logits"]
    results = [{"prompt": p["prompt"], **_scored(x, lp["reference"], lp["twin"])}
               for p, x, lp in zip(prompts, logits, prompt_logprobs)]
    eval_result = None
    if len(logits) > len(prompts):
        eval_result = _scored_windows(logits[len(prompts):], evaluation, eval_logprobs)
    for r in results + ([eval_result] if eval_result else []):
        log.info("Core ML program, %s: top-1 agreement %.3f with fp32, %.3f with the twin",
                 r.get("prompt", "evaluation text"), r["top1_agreement"], r["twin"]["top1_agreement"])
    return {"program": "model.pte", "runtime": "ane_build.programs.coreml_interpreter",
            "arithmetic": ARITHMETIC.format(dtype=dtype), "prompts": results, "eval_text": eval_result,
            "seconds": interpreted["seconds"], "calls": interpreted["calls"]}


def summary(report):
    """The smoke metrics of the Core ML check (each None where it did not run)."""
    if report is None:
        return dict.fromkeys(SUMMARY_KEYS)
    scored = report["prompts"] + ([report["eval_text"]] if report["eval_text"] else [])
    evaluation = report["eval_text"] or {}
    twin_klds = [r["twin"]["mean_kld"] for r in scored if r["twin"]["mean_kld"] is not None]
    return dict(zip(SUMMARY_KEYS, (
        min(r["top1_agreement"] for r in report["prompts"]), evaluation.get("top1_agreement"),
        evaluation.get("mean_kld"), evaluation.get("positions"),
        min(r["twin"]["top1_agreement"] for r in scored), max(twin_klds) if len(twin_klds) == len(scored) else None)))


def check(report, min_top1, max_kld):
    """Fail as smoke fails the twin: NaN or inf logits, agreement with fp32 below ``min_top1`` on a
    prompt or the evaluation slice, mean KL divergence above ``max_kld`` on the slice."""
    from ane_build.util.errors import UserError

    scored = [(f"prompt {r['prompt']!r}", r) for r in report["prompts"]]
    if report["eval_text"]:
        scored.append((f"evaluation text ({report['eval_text']['tokens']} tokens)", report["eval_text"]))
    for where, r in scored:
        if not r["finite"]:
            raise UserError("smoke", f"{WHO}, {where}: its logits hold NaN or inf: the Core ML program is broken")
        if r["top1_agreement"] < min_top1:
            raise UserError("smoke.min_top1_agreement", f"{WHO}, {where}: top-1 agreement with the fp32 reference "
                                                        f"is {r['top1_agreement']:.3f} ({r['positions']} teacher-forced "
                                                        f"positions, first divergence at {r['first_divergence']}; "
                                                        f"with the twin {r['twin']['top1_agreement']:.3f}), below "
                                                        f"{min_top1}")
    evaluation = report["eval_text"]
    if evaluation and evaluation["mean_kld"] > max_kld:
        raise UserError("smoke.max_mean_kld", f"{WHO}, evaluation text ({evaluation['tokens']} tokens): mean KL "
                                              f"divergence from the fp32 reference is {evaluation['mean_kld']:.4f} "
                                              f"(from the twin {evaluation['twin']['mean_kld']:.4f}), above {max_kld}")


def markdown(report, why_not=None):
    """smoke.md's section on the Core ML program; ``why_not`` says why it was not run, if it was not."""
    lines = ["", "## The Core ML program", ""]
    if report is None:
        return lines + [why_not]
    lines += [f"`{report['program']}`'s Core ML program itself, run on the CPU through ane-build's reference "
              f"interpreter ({report['arithmetic']}), teacher-forced on the tokens the twin read: top-1 agreement "
              "and mean KL divergence against the fp32 reference, and against the twin.", "",
              "| text | positions | top-1 vs fp32 | mean KLD vs fp32 | top-1 vs twin | mean KLD vs twin |",
              "|---|---|---|---|---|---|"]
    rows = [(f"prompt: {' '.join(r['prompt'].split())}", r) for r in report["prompts"]]
    if report["eval_text"]:
        rows.append((f"evaluation text, first {report['eval_text']['tokens']} tokens", report["eval_text"]))
    for name, r in rows:
        lines.append(f"| {name.replace('|', chr(92) + '|')} | {r['positions']} | {r['top1_agreement']:.3f} | "
                     f"{_number(r.get('mean_kld'))} | {r['twin']['top1_agreement']:.3f} | "
                     f"{_number(r['twin']['mean_kld'])} |")
    return lines


def _number(value):
    if value is None:
        return "NaN/inf"
    return f"{value:.4f}" if value >= 1e-3 or value == 0 else f"{value:.1e}"
