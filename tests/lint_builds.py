"""Tiny Core ML ``.pte`` files for the lint tests, made by the export stage (``ane_lint: warn``, so it
writes its reports whatever they find) and shared by the test modules of one session.

Shapes are the default recipe's in miniature, chosen so that every input and output lies in whole
64-byte rows on the Neural Engine (its last axis a multiple of 32 fp16 values) but for what upstream's
calling convention fixes (``ane_rules.UPSTREAM_CONVENTION``): 32-token calls and head_dim 64, as the
default recipe's (the rotary inputs are head_dim / 2 = 32 values wide). The "list" build has the
default recipe's cache list, decode method and weights (c8w asymmetric, an 8-bit embedding): a
one-token forward and a 32-token prefill sharing a cache of max_seq_length - 1 = 95 slots, so the
prefill's mask is 127 columns wide, as the default recipe's is 1087. "tensor" keeps each cache as one
5-D tensor (``use_cache_list: false``), of 96 slots (a 128-column mask; slots and head_dim differ, so
a cache's shape tells its layout).
"""

from tests.stages.tiny_entries import ane, build
from tests.tiny_llama import tiny_params

PARAMS = tiny_params(head_dim=64)
QUANTIZE = {"linear": "c8w", "mapping": "asymmetric", "embedding": "8,0"}
BUILDS = {
    "list": {"ane_params": ane(seq_length=32, max_seq_length=96, decode_method=True)},
    "tensor": {"ane_params": ane(seq_length=32, max_seq_length=128, use_cache_list=False)},
}
_built = {}


def built(tmp_path_factory, name):
    """(entries, metrics) of ``tiny_entries.build`` through export for BUILDS[name], once per session."""
    if name not in _built:
        _built[name] = build(tmp_path_factory.mktemp(f"lint-{name}"), "export", **BUILDS[name],
                             quantize_params=QUANTIZE, export_params={"ane_lint": "warn"}, model_params=PARAMS)
    return _built[name]
