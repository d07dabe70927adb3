"""How closely a program follows its fp32 checkpoint on text it did not write.

The smoke stage's prompts are scored along the program's own continuation; that says little
about a model that has drifted onto a different but fluent path. Here both read the same
human-written text, teacher-forced: Python's own documentation of naming and binding
(``pydoc_data.topics``, shipped with every CPython, so no download), and at each position
the program's next-token distribution is compared with the fp32 reference's: top-1
agreement and mean KL(fp32 || program), as llama.cpp's ``perplexity --kl-divergence``
reports them.

Light to import (torch is imported when a program is scored): stage keys read the text's hash.

The program reads the text one token per call, as it decodes (its forward returns only the
last position's logits), so each position's logits come from the program's own KV cache.
A NaN or inf logit makes a KL divergence NaN: the result then says ``finite: false``.
"""

import hashlib
import logging
import math

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
EVAL_TOPIC = "naming"
MAX_NGRAM = 8


def eval_text():
    """The evaluation text, and its sha256 (its bytes differ between some Python releases)."""
    from pydoc_data.topics import topics

    text = topics[EVAL_TOPIC]
    return text, hashlib.sha256(text.encode()).hexdigest()


def score_text(program, tokenizer, reference, n_tokens, keep=None):
    """{"tokens", "top1_agreement", "mean_kld", ...} of ``program`` on the first ``n_tokens``
    tokens of the evaluation text (fewer if its KV cache holds fewer: past its window the
    program rightly sees less than the reference). ``keep``, a dict, receives the token ids and
    both log-probabilities ("ids", "reference", "program": [positions, vocab]), for another
    program to be compared at the same positions."""
    import torch

    from ane_build.runtime.kv_cache import KVCache, teacher_forced

    text, digest = eval_text()
    ids = tokenizer.prompt_ids(text, program.info)[:min(n_tokens, program.info.cache_size)]
    if len(ids) < 2:
        raise UserError("smoke.eval_tokens", f"{n_tokens} token(s) score no position; expected 0 (none) or 2 or more")
    # Position i predicts token i + 1 having read tokens 0..i.
    cache = KVCache(program.info, program.methods, program.rope)
    got = teacher_forced(program, cache, ids[:1], ids[1:], verify=True).double().log_softmax(-1)
    want = reference(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    if keep is not None:
        keep.update(ids=ids, reference=want, program=got)
    kld = (want.exp() * (want - got)).sum(-1).tolist()
    top1 = (want.argmax(-1) == got.argmax(-1)).int().tolist()
    result = {"source": f"pydoc_data.topics[{EVAL_TOPIC!r}]", "sha256": digest, "tokens": len(ids),
              "positions": len(ids) - 1, "finite": all(math.isfinite(k) for k in kld)}
    if result["finite"]:
        ranked = sorted(kld)
        result.update(top1_agreement=sum(top1) / len(top1), mean_kld=sum(kld) / len(kld),
                      p99_kld=ranked[int(0.99 * (len(ranked) - 1))], max_kld=ranked[-1])
        log.info("eval text: %d positions, top-1 agreement %.3f, mean KLD %.4f", result["positions"],
                 result["top1_agreement"], result["mean_kld"])
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
