"""Every recipe field: its type, default, allowed values and help, in one table.

The same table validates recipes (`validate`) and is exported as JSON Schema
(`json_schema`) for editor completion. Defaults are the seed export's settings.
"""

import re
from dataclasses import dataclass

from ane_build.util.errors import UserError

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


@dataclass(frozen=True)
class Field:
    type: type | tuple
    default: object = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None
    help: str = ""
    nullable: bool = False
    note: str = ""  # why the choices are what they are, added to a bad-choice error


SCHEMA = {
    "extends": Field(str, help="a base recipe, relative to this file's folder"),
    "description": Field(str, "", help="one line for humans"),
    "device": Field(str, "", help="the target device this recipe builds for"),
    "chat": Field(bool, False, help="a chat-tuned model: prompts go through the checkpoint's chat template "
                                    "(which convert requires and the release ships beside the tokenizer)"),
    "source": {
        "path": Field(str, help="a local checkpoint file or folder (relative to the recipe)"),
        "package": Field(str, help="an installed Python package holding the checkpoint"),
        "file": Field(str, help="with package: the file inside it; with url: the saved name"),
        "url": Field(str, pattern=r"^https://", help="an https URL; requires sha256"),
        "sha256": Field(str, pattern=r"^[0-9a-f]{64}$", help="the pinned hash of the url's content"),
        "hf": Field(str, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$",
                    help="a Hugging Face Hub model repo, org/name; requires revision"),
        "revision": Field(str, help="with hf: the 40-hex commit (a branch or tag needs allow_moving_revision)"),
        "files": Field(list, None, nullable=True, help="with hf: glob patterns of the files to fetch; default all"),
        "allow_moving_revision": Field(bool, None, nullable=True,
                                       help="with hf: take a branch or tag, resolved to its commit when planning"),
    },
    "convert": {
        "format": Field(str, "auto", choices=("auto", "gguf", "hf", "meta"),
                        help="checkpoint format; auto detects it"),
    },
    "calibrate": {
        "text": Field(str, None, nullable=True, help="a UTF-8 text file to calibrate on (relative to the recipe); "
                                                    "default: Python's language reference less the evaluation text"),
        "windows": Field(int, 8, minimum=1, help="windows of text the fp32 model reads, each from its start"),
        "window_tokens": Field(int, 512, minimum=2, help="tokens per window"),
    },
    "ane": {
        "dtype": Field(str, "fp16", choices=("fp16", "fp32"), help="compute precision",
                       note="the Neural Engine computes in fp16 and Core ML has no bf16 compute precision"),
        "seq_length": Field(int, 64, minimum=1, help="tokens per forward call"),
        "max_seq_length": Field(int, 1024, minimum=2, help="context length the caches are sized for"),
        "cache_size": Field(int, None, minimum=1, nullable=True,
                            help="KV cache slots; default max_seq_length - 1 with a decode method (prefill and "
                                 "decode share caches, as upstream's multifunction export), else "
                                 "max_seq_length - seq_length"),
        "use_cache_list": Field(bool, True, help="one 4D cache per layer instead of one 5D tensor"),
        "target_split_size": Field(int, 1024, minimum=1, nullable=True,
                                   help="split linear out_features into chunks of this size"),
        "max_splits": Field(int, 8, minimum=1, help="at most this many chunks per linear"),
        "decode_method": Field(bool, False, help="upstream's multifunction form: forward decodes one token "
                                                 "and prefill takes seq_length (else forward takes seq_length)"),
        "share_embedding": Field(bool, False, help="tied checkpoints: read token rows from the LM head's weights, "
                                                   "so the program stores the table once (quantized as the head)"),
        "verify_method": Field(bool, False, help="add verify: seq_length tokens, every position's logits "
                                                 "(lookahead decoding; smoke scores text with it)"),
    },
    "quantize": {
        "linear": Field(str, "c4w", choices=("none", "c4w", "b4w", "c8w", "lut4", "lut6", "source"),
                        help="weights at 4 bits per channel (c4w) or per block (b4w), 8 bits per channel (c8w), "
                             "4/6-bit palettes per group of channels (lut4, lut6), "
                             "or a GGUF's own blocks as they are (source)"),
        "group_size": Field(int, 32, minimum=1, help="b4w block size along in_features"),
        "palette_group": Field(int, 16, minimum=1, help="lut4/lut6: output channels sharing one palette"),
        "mapping": Field(str, "symmetric", choices=("symmetric", "asymmetric"),
                         help="linear weights: a scale per channel/block (the seed's), or a scale and a zero point"),
        "scales": Field(str, "minmax", choices=("minmax", "hqq"),
                        help="how scales are fitted: span each channel (minmax) or minimise the error (hqq)"),
        "overrides": Field(dict, None, nullable=True,
                           help="{module pattern: kind} for some linears, e.g. {output: c8w} (mixed precision)"),
        "fit": Field(str, "data-free", choices=("data-free", "fisher", "gptq"),
                     help="data-free: palettes by plain k-means, grids by scales alone; fisher: palettes by k-means "
                          "weighted by the calibration's Fisher diagonal; gptq: fisher palettes, and every code "
                          "(palette or c4w/c8w grid) chosen with GPTQ's error feedback (both need calibrate)"),
        "budget_mb": Field(float, None, minimum=0, nullable=True,
                           help="pick each linear's kind among candidates to keep the weights within this many MB "
                                "at the least estimated KL divergence (needs calibrate); overrides stay fixed"),
        "candidates": Field(list, ["c8w", "lut6", "lut4"], help="the kinds budget_mb chooses among"),
        "embedding": Field(str, None, pattern=r"^(4|8),\d+$", nullable=True,
                           help="'bits,group' (bits 4 or 8; group 0 = per channel)"),
    },
    "export": {
        "minimum_deployment_target": Field(str, "iOS18", choices=DEPLOYMENT_TARGETS),
        "compute_unit": Field(str, "CPU_AND_NE", choices=COMPUTE_UNITS),
        "require_full_delegation": Field(bool, True, help="fail if any op stays on the CPU"),
        "max_payload_mb": Field(float, 1000, minimum=0.01,
                                help="at most this many MB of weights in one Core ML model (an iPhone's Neural Engine "
                                     "takes none over 1 GB): a bigger program is cut between layers into several"),
        "ane_lint": Field(str, "error", choices=("error", "warn", "off"),
                          help="lint model.pte for the Neural Engine (lint.json, lint.md): a finding outside "
                               "the allowlist fails the stage (error) or is logged (warn); off: no lint"),
    },
    "smoke": {
        "prompts": Field(list, ["Once upon a time,"], help="prompts generated from"),
        "n_steps": Field(int, 32, minimum=1, help="tokens generated and teacher-forced per prompt"),
        "min_top1_agreement": Field(float, 0.9, minimum=0, maximum=1,
                                    help="fail below this top-1 agreement with fp32 (each prompt, the eval text)"),
        "max_mean_kld": Field(float, 0.05, minimum=0, help="fail above this mean KL divergence from fp32 "
                                                              "on the evaluation text"),
        "eval_tokens": Field(int, 4096, minimum=0, help="tokens of the evaluation text scored (0: none), in windows "
                                                         "of at most ane.cache_size tokens"),
        "interpret_coreml": Field(bool, True, help="where smoke runs the twin (no Core ML backend), also run "
                                                   "model.pte's Core ML program through the reference interpreter "
                                                   "and hold it to the same gates"),
        "coreml_eval_tokens": Field(int, 512, minimum=0, help="the first tokens of the evaluation text the "
                                                              "interpreted Core ML program reads (at most eval_tokens; "
                                                              "0: none): through its verify method, 64 a call, if it "
                                                              "has one, else one a call (~90 ms each on SmolLM2)"),
        "temperature": Field(float, 0.0, minimum=0, help="0 is greedy"),
    },
    "release": {
        "name": Field(str, None, nullable=True, help="bundle name; default the recipe name"),
    },
}

# kind -> (the keys it requires, the first naming the kind; the keys it may add).
SOURCE_KINDS = {
    "path": (("path",), ()),
    "package": (("package", "file"), ()),
    "url": (("url", "sha256"), ("file",)),
    "hf": (("hf", "revision"), ("files", "allow_moving_revision")),
}
# Mappings that choose one kind among several, each kind with keys of its own: a recipe's
# replaces its base's whole, since keys of two kinds merged together make no source.
ONE_KIND = ("source",)


def cache_size(ane):
    """``ane.cache_size``, or its default for the other ``ane:`` settings."""
    if ane.get("cache_size") is not None:
        return ane["cache_size"]
    return ane["max_seq_length"] - (1 if ane.get("decode_method") else ane["seq_length"])


def _type_name(t):
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a mapping"}[t]


def _check_value(field, value):
    """The problem with ``value`` (given in the recipe) for ``field``, or None."""
    if value is None:
        return None if field.nullable else f"expected {_type_name(field.type)}; got null"
    ok_type = isinstance(value, field.type) and not (field.type in (int, float) and isinstance(value, bool))
    if field.type is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    if not ok_type:
        # YAML 1.1 reads off/on/no/yes as booleans: a string field given one was meant as a word.
        hint = " (YAML reads off, on, no and yes as true/false: quote the word)" if (
            field.type is str and isinstance(value, bool)) else ""
        return f"expected {_type_name(field.type)}; got {value!r}{hint}"
    if field.choices and value not in field.choices:
        note = f" ({field.note})" if field.note else ""
        return f"expected one of {', '.join(field.choices)}; got {value!r}{note}"
    if field.minimum is not None and value < field.minimum:
        return f"expected at least {field.minimum}; got {value!r}"
    if field.maximum is not None and value > field.maximum:
        return f"expected at most {field.maximum}; got {value!r}"
    if field.pattern and not re.search(field.pattern, value):
        return f"expected a value matching {field.pattern}; got {value!r}"
    return None


def validate(data, where):
    """Check ``data`` against SCHEMA and fill defaults; return the complete recipe dict."""
    if not isinstance(data, dict):
        raise UserError(where, f"expected a mapping at the top level; got {type(data).__name__}")
    return _validate_section(SCHEMA, data, "", where)


def _validate_section(spec, data, prefix, where):
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise UserError(where, f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(spec)}")
    out = {}
    for key, field in spec.items():
        value = data.get(key)
        if isinstance(field, dict):
            if value is not None and not isinstance(value, dict):
                raise UserError(where, f"{prefix}{key}: expected a mapping; got {value!r}")
            out[key] = _validate_section(field, value or {}, f"{prefix}{key}.", where)
            continue
        problem = _check_value(field, value) if key in data else None
        if problem:
            raise UserError(where, f"{prefix}{key}: {problem}")
        out[key] = data[key] if key in data else field.default
    return out


def json_schema():
    """SCHEMA as a JSON Schema document (draft 2020-12)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ane-build recipe",
        **_json_section(SCHEMA),
    }


def _json_section(spec):
    props = {}
    for key, field in spec.items():
        props[key] = _json_section(field) if isinstance(field, dict) else _json_field(field)
    return {"type": "object", "properties": props, "additionalProperties": False}


def _json_field(field):
    kind = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
            dict: "object"}[field.type]
    out = {"type": [kind, "null"] if field.nullable else kind, "description": field.help}
    if field.default is not None:
        out["default"] = field.default
    if field.choices:
        out["enum"] = list(field.choices)
    if field.minimum is not None:
        out["minimum"] = field.minimum
    if field.maximum is not None:
        out["maximum"] = field.maximum
    if field.pattern:
        out["pattern"] = field.pattern
    return out
