"""What keeps a Core ML op off the Apple Neural Engine, as public sources report it: a table of
rules, each checked on the MIL program alone.

No Linux-side API predicts where Core ML will run an op, and Apple publishes no static list
("it changes based on device generation, operating system version, tensor sizes", Apple's
aseemw in apple/coremltools#1780). Each rule is a heuristic with its reason and sources
(../shared/research/ane_rules.md gathers them), marked ``documented`` (Apple's docs, code or
engineers) or ``community`` (measured and reported by others: ExecuTorch, Anemll, ANEForge...).
On a Mac, Core ML's own compute plan decides (``device_plan``).

Severity says what happens when the rule is broken: ``reject`` (the Neural Engine refuses the
model, or the op), ``fallback`` (the op runs on the CPU or GPU: a device switch each way),
``slow`` (it stays on the Neural Engine, padded or copied), ``numerics`` (wrong results reported),
``check`` (reports conflict: ask the device plan).
"""

from dataclasses import dataclass

from ane_build.programs.coreml_program import Op, is_constant_op

DOCUMENTED, COMMUNITY = "documented", "community"
MAX_AXIS = 65536  # on every chip
MAX_NON_CHANNEL_AXIS = 16384  # on M1-M3-generation Neural Engines (and their iPhone siblings)
MAX_WEIGHT_BYTES = 10 ** 9  # per Core ML model, for the Neural Engine on an iPhone
ROW_BYTES = 64  # the Neural Engine pads each row of the last axis to this
FLOAT_BYTES = {"float16": 2, "float32": 4}
WIDE_INTS = ("int32", "int64", "uint32", "uint64")  # beyond the Neural Engine's int8/int16
PALETTE_SIZES = (2, 4, 16, 64, 256)  # 1, 2, 4, 6 and 8-bit palettes


@dataclass(frozen=True)
class Rule:
    id: str
    reason: str  # one line
    sources: tuple
    evidence: str  # DOCUMENTED or COMMUNITY
    severity: str  # reject, fallback, slow, numerics, check


RULES = (
    Rule("rank", "a tensor of rank > 4: Core ML rejects rank > 5, and rank-5 tensors are reported to fail at "
         "run time or compute wrongly; the Neural Engine's layout is 4-D",
         ("executorch examples/models/llama/static_attention.py ('Core ML sometimes fails at runtime when "
          "given 5D tensors')", "executorch#15833, PR #16144 (5-D attention wrong on iOS 26)",
          "Anemll agent.md ('Keep tensor ranks <= 4')", "apple/coremltools#1723 (Apple: no rank > 5)"),
         COMMUNITY, "check"),
    Rule("fp32", "fp32 compute: the Neural Engine computes in fp16 only, so an fp32 op runs on the CPU or GPU",
         ("coremltools docs, Typed Execution ('The GPU and NE use float 16 precision')",
          "executorch docs/source/backends/coreml/coreml-partitioner.md ('the ANE only supports FP16 precision')",
          "apple/ml-stable-diffusion torch2coreml.py ('ANE doesn't support FLOAT32')"),
         DOCUMENTED, "fallback"),
    Rule("int-arithmetic", "32/64-bit integer arithmetic (index math, casts): the Neural Engine computes in "
         "fp16, int8 and int16, so it runs on the CPU",
         ("apple/coreai-models neural_engine_rules.md ('Supported dtypes: fp16, int8, int16')",
          "executorch PR #19252 (MLComputePlan of a Core ML .pte: cast and gather off the ANE)"),
         DOCUMENTED, "fallback"),
    Rule("dynamic-shape", "a dimension left open, or a reshape to a shape computed at run time: the Neural "
         "Engine takes static (or enumerated) shapes only",
         ("executorch docs/source/backends/coreml/coreml-partitioner.md ('ANE does not support true dynamic "
          "shapes')", "coremltools docs, FAQs: Neural Engine with flexible input shapes; a static reshape "
                      "converted to a dynamic one is not supported on the NE"),
         DOCUMENTED, "fallback"),
    Rule("dynamic-slice", "a slice at offsets computed at run time runs on the CPU",
         ("smpanaro/more-ane-transformers src/experiments/NOTES.md (a dynamic offset moves slice_by_index, "
          "slice_by_size to the CPU)", "executorch PR #7616 ('ops required to update KV-cache are not "
                                       "supported on ANE')"),
         COMMUNITY, "fallback"),
    Rule("axis-65536", f"an axis over {MAX_AXIS}: no Neural Engine takes it",
         ("ANEForge docs/developer/op-quirks.md ('Per-axis size <= 65536')",
          "maderix/ANE PR #26 (a 151936-vocabulary LM head exceeds the ANE's 65536 max dim)",
          "Anemll agent.md (65536 channels)"),
         COMMUNITY, "fallback"),
    Rule("axis-16384", f"a non-channel axis (any but the third from last) over {MAX_NON_CHANNEL_AXIS}: "
         "M1-M3-generation Neural Engines reject it (ExecuTorch splits linears to stay under it)",
         ("ANEForge docs/cross-chip.md (16384 on older chips, measured)",
          "Anemll anemll/models/llama_model.py ('ANE tensors dimension size is limited to 16384')",
          "smpanaro/more-ane-transformers NOTES.md ('Output blob dimensions exceed ANE limit' for a "
          "[1, 1, 50257] linear)", "ncdrone/rustane#13 (width > 16384: ANECCompile FAILED)"),
         COMMUNITY, "fallback"),
    Rule("gather", "a gather at indices computed at run time (an embedding lookup, index_select) runs on "
         "the CPU", ("apple/ml-ane-transformers README (the ops left on the CPU are 'the embedding lookup "
                     "related operations')", "apple/coreai-models neural_engine_rules.md (RoPE: no table "
                                             "lookup in the graph)",
                     "smpanaro/CoreMLInspect README (gather: GPU/CPU only)"),
         DOCUMENTED, "fallback"),
    Rule("scatter", "scatter ops fall off the Neural Engine",
         ("coremltools converters/mil/frontend/torch/ops.py (Apple's comments: scatter 'falls off ANE')",),
         DOCUMENTED, "fallback"),
    Rule("sort", "topk, argsort, argmax and argmin run off the Neural Engine",
         ("roboflow/rf-detr PR #1495 (MLComputePlan, M3 Pro: topk off the ANE)",
          "executorch#11715, PR #19247 (argmax/argmin kept out of Core ML)"),
         COMMUNITY, "fallback"),
    Rule("rnn", "recurrent layers (lstm, gru, rnn) do not run on the Neural Engine",
         ("apple/coremltools#1780 (Apple: 'RNN or LSTM are not supported on the neural engine')",),
         DOCUMENTED, "fallback"),
    Rule("cpu-op", "ops with no Neural Engine kernel reported: cumsum, band_part, control flow, "
         "non-maximum suppression, random numbers",
         ("smpanaro/more-ane-transformers NOTES.md (cond, matrix_band_part not on the ANE)",
          "../shared/research/ane_rules.md R24 (cumsum, NMS, random: CPU by nature, no measurement found)"),
         COMMUNITY, "check"),
    Rule("state", "Core ML state (an in-graph KV cache): on the Neural Engine it works or fails by OS, chip "
         "and shape; the reliable pattern keeps caches as inputs and outputs",
         ("apple/coremltools#2553, Anemll#27 (stateful cache fails on the ANE at some sizes)",
          "FluidInference/mobius PR #77 (stateful decode: ANECCompile -14 on M5 Pro)",
          "apple/coreai-models neural_engine_rules.md ('KV cache - readonly pattern')"),
         COMMUNITY, "check"),
    Rule("fused-attention", "Core ML's fused scaled_dot_product_attention: reported wrong on iOS 26 and "
         "without a Neural Engine path; write attention out as matmuls and a softmax",
         ("executorch PR #16144 (decomposes SDPA 'to fix iOS26 numerics in Core ML')",
          "apple/coreai-models neural_engine_rules.md (no fused SDPA path)"),
         COMMUNITY, "numerics"),
    Rule("last-axis", f"an fp16/fp32 input or output whose last axis is not a multiple of {ROW_BYTES} bytes: "
         f"the Neural Engine pads each row to {ROW_BYTES} bytes (a singleton last axis costs 32x in fp16)",
         ("Apple, Deploying Transformers on the Apple Neural Engine (machinelearning.apple.com/research/"
          "neural-engine-transformers), principle 1", "apple/coreai-models neural_engine_rules.md "
                                                     "(tensor memory alignment)"),
         DOCUMENTED, "slow"),
    Rule("blockwise-scales", "weights dequantized with per-block scales: the Neural Engine wants one scale "
         "per output channel, or a palette",
         ("coremltools docs, Quantization performance ('if the model is running on the NE, it is "
          "recommended to use the per-channel scales option')",
          "executorch examples/apple/coreml/llama/readme.md ('The ANE requires channelwise')",
          "executorch PR #19252 (constexpr_blockwise_shift_scale planned on the CPU)"),
         DOCUMENTED, "fallback"),
    Rule("palette-bits", "a palette that is not 1, 2, 4, 6 or 8 bits: the Neural Engine accelerates those",
         ("apple/ml-stable-diffusion README ('Neural Engine supported bit-widths of 1, 2, 4, 6 and 8')",),
         DOCUMENTED, "slow"),
    Rule("weights-1gb", f"over {MAX_WEIGHT_BYTES / 1e9:g} GB of weights in one Core ML model: on an iPhone "
         "the Neural Engine takes none of it",
         ("coremltools docs, MLModel utilities: Bisect Model ('if you are deploying a model to run on neural "
          "engine on an iPhone, it cannot be larger than 1 GB')",
          "apple/ml-stable-diffusion README (--chunk-unet: under 1 GB each for the Neural Engine on iOS)"),
         DOCUMENTED, "reject"),
    Rule("planned-off-ane", "Core ML's own compute plan puts the op on the CPU or GPU (--device-plan, "
         "on a Mac)", ("Apple, MLComputePlan (developer.apple.com/documentation/coreml/mlcomputeplan)",
                       "WWDC24 session 10161 (performance tools)"),
         DOCUMENTED, "fallback"),
)
BY_ID = {rule.id: rule for rule in RULES}


@dataclass(frozen=True)
class Allowance:
    id: str
    rules: tuple  # the rules whose findings it may cover
    reason: str


# Findings every Core ML LLM has and that cost little: still reported, but not failures.
INPUT_LOOKUPS = Allowance(
    "input-lookups", ("gather", "int-arithmetic", "blockwise-scales"),
    "lookups into a constant table (the token embedding, RoPE rows) at indices computed from the inputs "
    "alone, with that index arithmetic and the table's dequantization: a few small ops before any Neural "
    "Engine work, which every Core ML LLM runs on the CPU for its embedding")
# What upstream ExecuTorch's calling convention for static LLMs fixes, which our programs speak so
# that its runners drive them (README, "Calling convention").
UPSTREAM_CONVENTION = Allowance(
    "upstream-convention", ("axis-65536", "axis-16384", "last-axis"),
    "the tensors upstream ExecuTorch's static-LLM calling convention fixes, so that its runners drive the "
    "program: the logits of forward and prefill as one row of the vocabulary's width (the split LM head's "
    "chunks joined by a reshape at the very end: one copy of a row, where the Neural Engine may hand it to "
    "the CPU; past 65536, as Llama 3's 128256, no Neural Engine takes that row: the same copy), and the mask "
    "over the shared cache and a call's own tokens, whose rows are cache_size + seq_length wide in at least "
    "one method (they cannot be 64-byte multiples for both a 1-token and a seq_length call: the prefill's "
    "1087 fp16 columns of the default recipe pad 2 bytes in 2176)")
ALLOWANCES = (INPUT_LOOKUPS, UPSTREAM_CONVENTION)


@dataclass(frozen=True)
class Finding:
    rule: str
    model: str
    function: str | None  # None for a finding about the whole model
    op: str  # the MIL op type; "input" or "output" for the function's own tensors
    name: str  # the op's name: ExecuTorch names an op after the exported graph's node it came from
    tensors: tuple  # the Tensors it computes (or is)
    detail: str
    allowed: str | None = None  # the Allowance that covers it

    def as_dict(self):
        return {"rule": self.rule, "model": self.model, "function": self.function, "op": self.op,
                "name": self.name, "detail": self.detail, "allowed": self.allowed,
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors]}


def lint_program(models):
    """Every Finding in a program's coreml_program.Models, allowances applied (``lint_model``)."""
    widths = mask_widths(models)
    return [finding for model in models for finding in lint_model(model, widths)]


def lint_model(model, widths):
    """Every Finding in one coreml_program.Model, allowances applied; ``widths``: ``mask_widths``."""
    findings = []
    if model.weight_bytes > MAX_WEIGHT_BYTES:
        findings.append(Finding("weights-1gb", model.label, None, "model", model.label, (),
                                f"{model.weight_bytes / 1e9:.2f} GB of weights"))
    for fn in model.functions:
        lookups, fixed = input_lookups(fn), convention_tensors(fn, widths)
        for rule_id, check in CHECKS.items():
            for op, detail in check(fn):
                allowed = None
                if op in lookups and rule_id in INPUT_LOOKUPS.rules:
                    allowed = INPUT_LOOKUPS.id
                elif {t.name for t in op.outputs} & fixed and rule_id in UPSTREAM_CONVENTION.rules:
                    allowed = UPSTREAM_CONVENTION.id
                findings.append(Finding(rule_id, model.label, fn.name, op.type, op.name, op.outputs, detail,
                                        allowed))
    return findings


def mask_widths(models):
    """{function name: the last axis of its ``attn_mask`` input} over a program's models (its payloads)."""
    return {fn.name: t.shape[-1] for model in models for fn in model.functions for t in fn.inputs
            if t.name == "attn_mask" and t.shape}


def convention_tensors(fn, widths):
    """The names of the tensors ``UPSTREAM_CONVENTION`` covers in ``fn``: the logits row (its only output
    of rank 2; the caches' rows are rank 4) and the mask input (``model.ane_llama``'s ``attn_mask``:
    Core ML keeps the exported program's input names, not its order). A program cut into several
    payloads (``programs.payload_split``) takes the mask in its first alone, and hands it on to the
    others as a rank-2 input of the same width (its rows repeated per query group): the mask still.
    None in a function of a method that takes no such mask: its rank-2 outputs are nobody's logits."""
    width = widths.get(fn.name)
    if width is None:
        return set()
    masks = {t.name for t in fn.inputs if t.name == "attn_mask" or (len(t.shape or ()) == 2 and t.shape[-1] == width)}
    return masks | {name for name in fn.outputs if len(fn.tensors[name].shape or ()) == 2}


CHECKS = {}  # rule id -> check(function) yielding (op, detail) for each op breaking it


def check(rule_id):
    assert rule_id in BY_ID, rule_id

    def register(function):
        CHECKS[rule_id] = function
        return function
    return register


def _computed(fn):
    """What a call computes: the function's inputs (as "input" ops), then every op not resolved at load."""
    yield from (Op("input", t.name, {}, (t,)) for t in fn.inputs)
    yield from (op for op in fn.ops if not is_constant_op(op))


def _outputs(fn):
    return [Op("output", name, {}, (fn.tensors[name],)) for name in fn.outputs]


def _argument(fn, op, arg):
    """The Tensor bound to an op's single-valued argument ``arg``, or None."""
    bindings = op.inputs.get(arg, ())
    return fn.value(bindings[0]) if bindings else None


def _shape(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@check("rank")
def _rank(fn):
    for op in _computed(fn):
        high = [t for t in op.outputs if len(t.shape) > 4]
        if high:
            yield op, f"rank {len(high[0].shape)}: {_shape(high[0].shape)}"


@check("fp32")
def _fp32(fn):
    for op in _computed(fn):
        wide = [t for t in op.outputs if t.dtype in ("float32", "float64")]
        if wide:
            yield op, f"{wide[0].dtype} {_shape(wide[0].shape)}"


@check("int-arithmetic")
def _int_arithmetic(fn):
    for op in _computed(fn):
        if op.type == "input":
            continue  # an integer input is fine; what computes on it is not
        wide = [f"{t.dtype} output" for t in op.outputs if t.dtype in WIDE_INTS]
        # The data an op computes on (not a gather's indices or a slice's bounds: other rules' business).
        wide += [f"{fn.value(b).dtype} input {arg}" for arg in ("x", "y", "a", "b") for b in op.inputs.get(arg, ())
                 if not fn.is_constant(b) and fn.value(b) and fn.value(b).dtype in WIDE_INTS]
        if wide:
            yield op, wide[0]


@check("dynamic-shape")
def _dynamic_shape(fn):
    for op in _computed(fn):
        open_axes = [t for t in op.outputs if None in t.shape]
        if open_axes:
            yield op, f"open dimension: {_shape(open_axes[0].shape)}"
        elif op.type == "reshape" and not all(map(fn.is_constant, op.inputs.get("shape", ()))):
            yield op, "reshape to a shape computed at run time"


SLICE_BOUNDS = {"slice_by_index": ("begin", "end"), "slice_by_size": ("begin", "size"),
                "slice_update": ("begin", "end")}


@check("dynamic-slice")
def _dynamic_slice(fn):
    for op in _computed(fn):
        for arg in SLICE_BOUNDS.get(op.type, ()):
            if not all(map(fn.is_constant, op.inputs.get(arg, ()))):
                yield op, f"{arg} computed at run time"
                break


def _axes_over(fn, limit, axes_of):
    for op in _computed(fn):
        for t in op.outputs:
            over = [(axis, t.shape[axis]) for axis in axes_of(t.shape) if (t.shape[axis] or 0) > limit]
            if over:
                yield op, f"axis {over[0][0]} is {over[0][1]} in {_shape(t.shape)}"
                break


@check("axis-65536")
def _axis_65536(fn):
    yield from _axes_over(fn, MAX_AXIS, lambda shape: range(len(shape)))


@check("axis-16384")
def _axis_16384(fn):
    # The Neural Engine lays a tensor out as (..., C, H, W): the channel axis is the third from last.
    # Axes past MAX_AXIS are axis-65536's.
    def non_channel(shape):
        return [a for a in range(len(shape)) if a != len(shape) - 3 and (shape[a] or 0) <= MAX_AXIS]
    yield from _axes_over(fn, MAX_NON_CHANNEL_AXIS, non_channel)


GATHERS = ("gather", "gather_nd", "gather_along_axis")


@check("gather")
def _gather(fn):
    for op in _computed(fn):
        if op.type in GATHERS and not all(map(fn.is_constant, op.inputs.get("indices", ()))):
            table = _argument(fn, op, "x")
            yield op, f"from {_shape(table.shape) if table else 'a value'} at run-time indices"


OFF_ANE_OPS = {
    "scatter": ("scatter", "scatter_nd", "scatter_along_axis"),
    "sort": ("topk", "argsort", "reduce_argmax", "reduce_argmin"),
    "rnn": ("lstm", "gru", "rnn"),
    "cpu-op": ("cumsum", "band_part", "cond", "while_loop", "non_maximum_suppression", "random_bernoulli",
               "random_categorical", "random_normal", "random_uniform"),
    "state": ("read_state", "write_state", "coreml_update_state"),
    "fused-attention": ("scaled_dot_product_attention",),
}


def _by_type(rule_id):
    def find(fn):
        if rule_id == "state":
            yield from ((op, "a state input") for op in _computed(fn) if op.type == "input" and op.outputs[0].state)
        yield from ((op, op.type) for op in _computed(fn) if op.type in OFF_ANE_OPS[rule_id])
    return find


for _rule_id in OFF_ANE_OPS:
    check(_rule_id)(_by_type(_rule_id))


@check("last-axis")
def _last_axis(fn):
    for op in [Op("input", t.name, {}, (t,)) for t in fn.inputs] + _outputs(fn):
        t = op.outputs[0]
        if t.dtype in FLOAT_BYTES and t.shape and t.shape[-1] is not None:
            row = t.shape[-1] * FLOAT_BYTES[t.dtype]
            if row % ROW_BYTES:
                yield op, f"last axis {t.shape[-1]} x {FLOAT_BYTES[t.dtype]} bytes = {row} bytes in {_shape(t.shape)}"


@check("blockwise-scales")
def _blockwise_scales(fn):
    for op in fn.ops:
        if op.type != "constexpr_blockwise_shift_scale":
            continue
        data, scale = _argument(fn, op, "data"), _argument(fn, op, "scale")
        if data and scale and not _per_channel(data.shape, scale.shape):
            yield op, f"scales {_shape(scale.shape)} for weights {_shape(data.shape)}"


def _per_channel(data, scale):
    """One scale per tensor or per slice along one axis: every scale axis 1 or whole, at most one whole."""
    whole = [a for a, (d, s) in enumerate(zip(data, scale)) if s == d and d != 1]
    return all(s in (1, d) for d, s in zip(data, scale)) and len(whole) <= 1


@check("palette-bits")
def _palette_bits(fn):
    for op in fn.ops:
        lut = _argument(fn, op, "lut") if op.type == "constexpr_lut_to_dense" else None
        if lut and lut.shape:
            # iOS18 palettes are [..., entries, vector size]; iOS16's a flat list of entries.
            entries = lut.shape[0] if len(lut.shape) == 1 else lut.shape[-2]
            if entries not in PALETTE_SIZES:
                yield op, f"a palette of {entries} entries"


def input_lookups(fn):
    """The ops of ``fn`` that look up a constant table at indices computed from the inputs alone: such
    gathers, the integer ops computing their indices, and constexprs feeding only such gathers."""
    covered = set()
    for op in fn.ops:
        if op.type in GATHERS and all(map(fn.is_constant, op.inputs.get("x", ()))):
            index_ops = _index_ops(fn, op.inputs.get("indices", ()))
            if index_ops is not None:
                covered |= {op, *index_ops}
    for op in reversed(fn.ops):  # a chain of constexprs (palette, then scales) from its end
        if op.type.startswith("constexpr_") and _feeds_only(fn, op, covered):
            covered.add(op)
    return covered


def _index_ops(fn, names):
    """The ops computing ``names`` from inputs and constants through integer (or bool) values only,
    or None if a float value computed at run time takes part."""
    ops, todo = set(), list(names)
    while todo:
        binding = todo.pop()
        op = None if fn.is_constant(binding) else fn.producers.get(binding)
        if op is None or op in ops:
            continue  # a function input, a constant, or seen
        if any(t.dtype.startswith(("float", "bfloat")) for t in op.outputs):
            return None
        ops.add(op)
        todo += [b for bindings in op.inputs.values() for b in bindings]
    return ops


def _feeds_only(fn, op, covered):
    readers = [reader for out in op.outputs for reader in fn.consumers.get(out.name, [])]
    return bool(readers) and all(reader in covered for reader in readers)
