"""Lookahead decoding: several tokens per call, the same text as greedy decoding, through upstream's
``StaticAttentionIOManager.lookahead_decode`` driving the program's verify method.

Each call feeds the verify method (seq_length tokens, every position's logits) the last token,
a window of guesses from earlier calls (the lookahead branches) and n-grams seen before that
start with the last token (the verification branches), under a mask that keeps the branches
apart. Every verified token is the greedy one, so the text is greedy decoding's, in fewer calls
where the text repeats itself. Upstream's manager owns the caches and the masks here (it has
the n-gram bookkeeping; our ``kv_cache`` does not); the program's own rotary table replaces the
one it computes, so both runners feed the program the same rows.
"""

from dataclasses import dataclass

from ane_build.model import io
from ane_build.model.ane_llama import MASK_MIN
from ane_build.model.io import VERIFY
from ane_build.util.errors import UserError


@dataclass(frozen=True)
class Settings:
    """upstream's run_static_llm*.py defaults: (ngram_size - 1) * (window_size + n_verifications) tokens per call."""

    ngram_size: int = 5
    window_size: int = 4
    n_verifications: int = 4

    def tokens_per_call(self):
        return (self.ngram_size - 1) * (self.window_size + self.n_verifications)


class Lookahead:
    """Greedy generation through ``program``'s verify method: ``generate(prompt_ids, n, stop_ids)``."""

    def __init__(self, program, settings=Settings()):
        info = program.info
        if VERIFY not in program.methods:
            raise UserError("--lookahead", f"the program has no {VERIFY} method (every position's logits): "
                                           "build it with ane.verify_method: true")
        if not info.use_cache_list:
            raise UserError("--lookahead", "needs one cache per layer (ane.use_cache_list), as upstream's manager "
                                           "keeps them")
        if settings.tokens_per_call() > program.methods[VERIFY]:
            raise UserError("--lookahead", f"(ngram_size - 1) * (window_size + n_verifications) = "
                                           f"{settings.tokens_per_call()} tokens do not fit the verify method's "
                                           f"{program.methods[VERIFY]}")
        self.program, self.settings, self.calls = program, settings, 0
        self.manager = _manager(info, program.methods[VERIFY], program.rope)

    def generate(self, prompt_ids, n=None, stop_ids=()):
        """Up to ``n`` greedy tokens after the prompt (a stop token ends them and is not given).

        Upstream's manager slices a whole call's rotary rows, padding included, so a generation
        stops a call's length before the end of the context.
        """
        room = self.program.info.max_seq_length - len(prompt_ids) - self.manager.input_len
        if room < 1:
            raise UserError("--prompt", f"{len(prompt_ids)} tokens leave no room for lookahead calls of "
                                        f"{self.manager.input_len} in a context of "
                                        f"{self.program.info.max_seq_length}")
        n = min(n or room, room)
        self.manager.reset()
        first = int(self.manager.prefill(self._call, list(prompt_ids))[0, -1].argmax())
        tokens = [first]
        if n > 1 and first not in stop_ids:
            tokens = self.manager.lookahead_decode(
                self._call, first, n - 1, self.settings.ngram_size, self.settings.window_size,
                self.settings.n_verifications, stop_tokens=list(stop_ids))
        tokens = tokens[:n]
        return tokens[:next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]

    def _call(self, tokens, options):
        """The model function upstream's manager calls: its inputs in the program's order."""
        self.calls += 1
        k_caches, v_caches = options["in_cache_state"]
        (mask,) = options["masks"].values()  # one cache length in all layers
        args = (tokens, mask, options["freqs_cos_override"], options["freqs_sin_override"],
                list(k_caches.values()), list(v_caches.values()))
        logits, new_k, new_v = self.program.run(VERIFY, _Inputs(args, io.flat_inputs(args)))
        return logits[None], {"out_cache_state": (dict(zip(k_caches, new_k)), dict(zip(v_caches, new_v)))}


@dataclass
class _Inputs:
    """One call's inputs as ``program.run`` reads them (a ``kv_cache.Call``'s two forms)."""

    args: tuple
    flat: list


def _manager(info, seq_length, rope):
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.static_attention import StaticAttentionIOManager

    # The manager reads only the caches' shapes and the rotary table from its config.
    config = ModelArgs(dim=info.n_kv_heads * info.head_dim, n_layers=info.n_layers, n_heads=info.n_kv_heads,
                       n_kv_heads=info.n_kv_heads, head_dim=info.head_dim, vocab_size=info.vocab_size,
                       max_context_len=info.max_seq_length, generate_full_logits=True)
    config.attention_type = "static_mha"
    manager = StaticAttentionIOManager(config, input_len=seq_length, cache_lens=info.cache_size,
                                       dtype=info.torch_dtype, style="smart_mask", mask_val=MASK_MIN)
    manager.freqs_cos, manager.freqs_sin = rope
    return manager

