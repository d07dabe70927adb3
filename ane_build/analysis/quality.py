"""How closely a program follows its fp32 checkpoint on text it did not write.

The smoke stage's prompts are scored along the program's own continuation; that says little
about a model that has drifted onto a different but fluent path. Here both read the same
human-written text, teacher-forced: four chapters of Python's own language reference
(``pydoc_data.topics``, shipped with every CPython, so no download), and at each position
the program's next-token distribution is compared with the fp32 reference's: top-1
agreement and mean KL(fp32 || program), as llama.cpp's ``perplexity --kl-divergence``
reports them.

Why 4096 tokens by default: top-1 agreement near 0.95 has a standard error of
sqrt(0.95 * 0.05 / n), about 0.3% at 4096 positions against 1% at 512, which is what it takes
to rank quantization schemes that differ by a point.

The text is read in windows of at most ``ane.cache_size`` tokens, each from an empty KV cache:
past its window the program rightly sees less than the reference. Every chapter starts a
window (with the program's bos), so a window never joins two chapters. A window goes through
the program's verify method, seq_length positions a call, where it has one (else one token a
call, as it decodes), so each position's logits come from the program's own KV cache.
A NaN or inf logit makes a KL divergence NaN: the result then says ``finite: false``.

Light to import (torch is imported when a program is scored): stage keys read the text's hash.
"""

import hashlib
import logging
import math

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
# Prose chapters (few grammar listings), each longer than a window, in reading order.
EVAL_TOPICS = ("naming", "customization", "assignment", "comparisons")
MAX_NGRAM = 8


def eval_chapters():
    """[(topic, text)] of the evaluation text, in reading order."""
    from pydoc_data.topics import topics

    return [(topic, topics[topic]) for topic in EVAL_TOPICS]


def eval_text():
    """The evaluation text, and its sha256 (its bytes differ between some Python releases)."""
    text = "\n\n".join(text for _, text in eval_chapters())
    return text, hashlib.sha256(text.encode()).hexdigest()


def held_out_topics():
    """The evaluation's chapters and every chapter quoting one of their paragraphs: the calibration
    (``quant.calibration_text``) reads none of them, so no program is tuned on text it is scored on."""
    from ane_build.quant import calibration_text

    return set(EVAL_TOPICS) | calibration_text.chapters_quoting([text for _, text in eval_chapters()])


def eval_windows(tokenizer, info, n_tokens):
    """The first ``n_tokens`` tokens of the evaluation text as the windows a program reads, each
    from an empty cache: every chapter from its start, cut every ``info.cache_size`` tokens.
    Fewer tokens where the text holds fewer; a piece of one token (no position) is left out."""
    windows, left = [], n_tokens
    for _, text in eval_chapters():
        ids = tokenizer.prompt_ids(text, info)
        for start in range(0, len(ids), info.cache_size):
            window = ids[start:start + min(info.cache_size, left)]
            if len(window) > 1:  # a chapter's last token alone predicts nothing
                windows.append(window)
                left -= len(window)
            if left < 2:
                return windows
    return windows


def score_text(program, tokenizer, reference, n_tokens, keep=None):
    """{"tokens", "positions", "windows", "top1_agreement", "mean_kld", ...} of ``program`` on the first
    ``n_tokens`` tokens of the evaluation text (``eval_windows``). ``keep``, a dict, receives per window
    the token ids and both log-probabilities ("ids", "reference", "program": lists of [positions, vocab]),
    for another program to be compared at the same positions."""
    import torch

    from ane_build.runtime.kv_cache import KVCache, teacher_forced

    windows = eval_windows(tokenizer, program.info, n_tokens)
    if not windows:
        raise UserError("smoke.eval_tokens", f"{n_tokens} token(s) score no position; expected 0 (none) or 2 or more")
    got, want = [], []
    for ids in windows:  # position i of a window predicts its token i + 1, having read tokens 0..i
        cache = KVCache(program.info, program.methods, program.rope)
        got.append(teacher_forced(program, cache, ids[:1], ids[1:], verify=True).double().log_softmax(-1))
        want.append(reference(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1))
    if keep is not None:
        keep.update(ids=windows, reference=want, program=got)
    return compared(torch.cat(want), torch.cat(got), windows)


def compared(want, got, windows):
    """The evaluation result of log-probabilities ``got`` against ``want`` over ``windows``."""
    kld = (want.exp() * (want - got)).sum(-1).tolist()
    top1 = (want.argmax(-1) == got.argmax(-1)).int().tolist()
    result = {"source": f"pydoc_data.topics{list(EVAL_TOPICS)}", "sha256": eval_text()[1],
              "tokens": sum(map(len, windows)), "windows": len(windows), "positions": len(kld),
              "finite": all(math.isfinite(k) for k in kld)}
    if result["finite"]:
        ranked = sorted(kld)
        result.update(top1_agreement=sum(top1) / len(top1), mean_kld=sum(kld) / len(kld),
                      p99_kld=ranked[int(0.99 * (len(ranked) - 1))], max_kld=ranked[-1])
        log.info("eval text: %d positions in %d windows, top-1 agreement %.3f, mean KLD %.4f", result["positions"],
                 len(windows), result["top1_agreement"], result["mean_kld"])
    return result


def repeating_tail(generated):
    """(n-gram, times) when the generation has fallen into a loop, else None.

    A loop is one token repeated over at least half of the generation, or an n-gram of 2 to
    MAX_NGRAM tokens repeated at least three times in a row at its end. A model under greedy
    decoding that does either has lost its way, whatever its agreement before."""
    for n in range(1, MAX_NGRAM + 1):
        gram = tuple(generated[-n:])
        times = 0
        while len(generated) >= (times + 1) * n and tuple(generated[len(generated) - (times + 1) * n:][:n]) == gram:
            times += 1
        needed = 3 if n > 1 else 2
        if len(gram) == n and times >= needed and (n > 1 or 2 * times >= len(generated)):
            return list(gram), times
    return None
