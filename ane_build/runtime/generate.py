"""The generation loop: prefill the prompt, then one token per call until a stop token,
``n_steps`` tokens, or the end of the context (prompt and generated tokens together fill at
most max_seq_length positions: the RoPE tables end there).

Prefill and decode are timed apart (model calls and sampling only, not the caller's work
between tokens): a prompt runs seq_length tokens per call, decoding one.
"""

import math
import time
from dataclasses import dataclass

from ane_build.runtime.kv_cache import KVCache, feed
from ane_build.util.errors import UserError


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_calls: int = 0  # generated tokens fed back, one call each
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self):
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self):
        return self.decode_calls / self.decode_seconds if self.decode_seconds else 0.0


class Generation:
    """Iterate over it for the generated token ids (a stop token ends it and is not given)."""

    def __init__(self, program, prompt_ids, sampler, n_steps=None, stop_ids=()):
        context = program.info.max_seq_length
        if not prompt_ids:
            raise UserError("--prompt", "encodes to no tokens")
        if len(prompt_ids) >= context:
            raise UserError("--prompt", f"{len(prompt_ids)} tokens leave no room to generate in a context of "
                                        f"max_seq_length={context} tokens")
        if n_steps is not None and n_steps < 1:
            raise UserError("--n_steps", f"expected 1 or more tokens to generate; got {n_steps}")
        self.program, self.prompt_ids, self.sampler = program, list(prompt_ids), sampler
        self.stop_ids = frozenset(stop_ids)
        self.max_new_tokens = min(n_steps or math.inf, context - len(prompt_ids))
        self.cache = KVCache(program.info, program.methods, program.rope)
        self.stats = Stats(prompt_tokens=len(prompt_ids))

    def __iter__(self):
        started = time.perf_counter()
        token = self.sampler(feed(self.program, self.cache, self.prompt_ids))
        self.stats.prefill_seconds = time.perf_counter() - started
        while token not in self.stop_ids:
            yield token
            self.stats.generated_tokens += 1
            if self.stats.generated_tokens == self.max_new_tokens:
                return
            started = time.perf_counter()
            token = self.sampler(feed(self.program, self.cache, [token]))
            self.stats.decode_seconds += time.perf_counter() - started
            self.stats.decode_calls += 1
