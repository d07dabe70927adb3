"""Generate text with an exported program: the flags and meanings of the seed's run.py, plus
``--n_steps``, ``--seed`` and ``--chat``. The text streams to stdout (the prompt first; with
``--chat``, the assistant's reply alone), speeds go to stderr."""

import sys
import time
from pathlib import Path

from ane_build.checkpoint import canonical, tokenizer_files
from ane_build.runtime import chat
from ane_build.runtime.coreml import open_pte
from ane_build.runtime.generate import Generation
from ane_build.runtime.lookahead import Lookahead
from ane_build.runtime.program import open_eager
from ane_build.runtime.sampling import Sampler
from ane_build.runtime.tokenizer import TextStream, Tokenizer
from ane_build.util.errors import UserError


def add_arguments(parser):
    parser.add_argument("-m", "--model", help="the .pte to run: model.pte (on Core ML where its backend is, "
                                              "macOS; elsewhere through the reference interpreter, slowly), or "
                                              "its CPU twin, twin.pte")
    parser.add_argument("-t", "--tokenizer", help="tokenizer.model or tokenizer.json (default: the one beside "
                                                  "the model or the checkpoint)")
    parser.add_argument("--prompt", default="Once upon a time,")
    parser.add_argument("--chat", action="store_true",
                        help="the prompt is a user's message to a chat-tuned model: render it with the model's chat "
                             "template and print the assistant's reply")
    parser.add_argument("--chat_template", help="with --chat: the Jinja chat template (default: "
                                                f"{canonical.CHAT_TEMPLATE_FILE} beside the tokenizer)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: 0.6)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (default: 0.9)")
    parser.add_argument("--use_eager", action="store_true",
                        help="run the checkpoint (-c, -p) in eager PyTorch instead of a .pte")
    parser.add_argument("-p", "--params", help="params.json of the checkpoint (default: the one beside it)")
    parser.add_argument("-c", "--checkpoint", help="with --use_eager: a canonical checkpoint folder, its "
                                                   "model.safetensors, or a Meta .pth")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], help="with --use_eager: the model's dtype "
                                                                  "(default fp32); a .pte states its own")
    parser.add_argument("--seq_length", type=int, help="tokens per prefill call (a .pte states its own)")
    parser.add_argument("--max_seq_length", type=int, help="the context: positions the RoPE tables cover "
                                                           "(a .pte states its own)")
    parser.add_argument("--cache_size", type=int, help="the sliding window of past tokens (default: "
                                                       "max_seq_length - 1; a .pte states its own)")
    parser.add_argument("--n_steps", type=int, help="tokens to generate at most (default: until a stop token "
                                                    "or the end of the context)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: a fresh one each run)")
    parser.add_argument("--lookahead", action="store_true",
                        help="lookahead decoding through the program's verify method: greedy text (needs "
                             "--temperature 0) in fewer calls")
    return parser


def main(args):
    """Generate as ``args`` say. A mistake in them raises UserError for the caller to report."""
    sampler = Sampler(args.temperature, args.top_p, args.seed)  # checks its flags before any loading
    if args.lookahead and args.temperature != 0:
        raise UserError("--lookahead", f"decodes greedily: pass --temperature 0 (got {args.temperature})")
    program, source = open_program(args)
    # An export entry and a canonical checkpoint keep their tokenizer beside the weights.
    tokenizer = Tokenizer(args.tokenizer or tokenizer_files.find(source if source.is_dir() else source.parent,
                                                                 canonical.TOKENIZER_FILES))
    info = program.info
    tokenizer.check_fits(info.vocab_size, source.name)
    prompt_ids = encode_prompt(args, tokenizer, info)
    if args.lookahead:
        generation = LookaheadRun(program, prompt_ids, args.n_steps, tokenizer.stop_ids(info))
    else:
        generation = Generation(program, prompt_ids, sampler, args.n_steps, tokenizer.stop_ids(info))
    stream = TextStream(tokenizer, prompt_ids)
    if not args.chat:  # a continuation joins onto the prompt; a reply stands alone
        print(args.prompt, end="", flush=True)
    for token in generation:
        print(stream.push(token), end="", flush=True)
    print(stream.flush())
    print(speeds(generation.stats, getattr(program, "interpreted", False)), file=sys.stderr)
    return 0


class LookaheadRun:
    """``--lookahead``: the tokens of ``lookahead.Lookahead``, with a line of what it took."""

    def __init__(self, program, prompt_ids, n_steps, stop_ids):
        self.lookahead, self.args = Lookahead(program), (prompt_ids, n_steps, stop_ids)
        self.stats = ""

    def __iter__(self):
        started = time.perf_counter()
        tokens = self.lookahead.generate(*self.args)
        seconds = time.perf_counter() - started
        self.stats = (f"lookahead: {len(tokens)} tokens in {self.lookahead.calls} calls of the verify method, "
                      f"the prompt's included ({seconds:.3f} s, {len(tokens) / seconds:.1f} tokens/s)")
        return iter(tokens)


def encode_prompt(args, tokenizer, info):
    """The prompt's ids: as text to continue, or with --chat as a user's message in the chat template."""
    if not args.chat:
        if args.chat_template:
            raise UserError("--chat_template", "applies with --chat only")
        return tokenizer.prompt_ids(args.prompt, info)
    path = Path(args.chat_template) if args.chat_template else chat.beside(tokenizer.path)
    if not args.chat_template and not path.is_file():
        raise UserError("--chat", f"no chat template: expected {path} beside the tokenizer (a chat model's "
                                  "entries and release bundles keep it there), or --chat_template PATH")
    return chat.for_program(path, tokenizer, info).prompt(args.prompt)[1]


def open_program(args):
    """(the program, the file or folder it came from)."""
    shape_flags = {"seq_length": args.seq_length, "max_seq_length": args.max_seq_length,
                   "cache_size": args.cache_size, "dtype": args.dtype}
    if args.use_eager:
        if not args.checkpoint:
            raise UserError("--use_eager", "needs -c/--checkpoint (and -p/--params unless a params.json is beside it)")
        shape_flags["dtype"] = args.dtype or "fp32"
        return open_eager(args.checkpoint, args.params, **shape_flags), Path(args.checkpoint)
    if not args.model:
        raise UserError("-m/--model", "required: the .pte to run (or --use_eager with -c/--checkpoint)")
    return open_pte(args.model, **shape_flags), Path(args.model)


def speeds(stats, interpreted=False):
    """The run's speeds; an interpreted Core ML program's are the interpreter's, on this CPU, not a device's."""
    where = "; the Core ML program through ane-build's reference interpreter on this CPU" if interpreted else ""
    if isinstance(stats, str):  # a lookahead run's own line
        return stats + where
    return (f"prefill: {stats.prompt_tokens} tokens in {stats.prefill_seconds:.3f} s "
            f"({stats.prefill_tokens_per_second:.1f} tokens/s); decode: {stats.decode_calls} tokens in "
            f"{stats.decode_seconds:.3f} s ({stats.decode_tokens_per_second:.1f} tokens/s){where}")
