"""Core ML payloads under a size limit: a method's Core ML partition cut between transformer layers.

On an iPhone the Neural Engine takes no Core ML model with more than ~1 GB of weights (lint rule
``weights-1gb``), so a bigger program ships as several Core ML models: several delegate calls in
each method, which ExecuTorch runs one after the other, so a caller sees the same inputs and
outputs. Upstream's static Llama export cuts its programs likewise (graph breaks before the first
layer and after the last), so runners that drive one drive the other.

``limited(CoreMLPartitioner)`` is the partitioner with a ``max_payload_bytes``: it tags as before,
then, where the weights the partition reads exceed the limit, cuts it between layers into the
fewest payloads under the limit, as even as they go. Every method of a program reads the same
weights in the same layers, so every method is cut at the same layers, and the Core ML backend's
positional weight sharing pairs partition i of each method into one multifunction model.

A weight read on both sides of a cut (a shared embedding table read by the first layer's input and
the LM head) is stored in each payload that reads it: ExecuTorch copies a constant for every
partition that uses it; the cut logs how much.
"""

import logging
import math
import re
from collections import defaultdict

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
LAYER = re.compile(r"^layers\.(\d+)(?:\.|$)")
SETTING = "export.max_payload_mb"


def limited(partitioner_class):
    """``partitioner_class`` (a Core ML partitioner) with a ``max_payload_bytes`` keyword."""
    from executorch.exir.backend.partitioner import PartitionResult

    class LimitedPartitioner(partitioner_class):
        def __init__(self, *args, max_payload_bytes, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_payload_bytes = max_payload_bytes

        def partition(self, exported_program):
            tagged = super().partition(exported_program)
            tags = cut(exported_program, tagged.partition_tags, self.max_payload_bytes)
            return PartitionResult(tagged_exported_program=exported_program, partition_tags=tags)

    return LimitedPartitioner


def cut(program, tags, max_bytes):
    """Retag the nodes of ``program`` tagged with one of ``tags`` ({tag: delegation spec}) into payloads
    of at most ``max_bytes`` of weights, cut between layers; returns the new {tag: spec}, in the
    order of the graph (``tags`` itself where one payload holds everything)."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.meta.get("delegation_tag") in tags]
    sizes = stored_sizes(program)
    unit_of = units(nodes)
    reads = defaultdict(set)  # unit -> the constants its nodes read
    for node in nodes:
        reads[unit_of[node]].update(a for a in node.all_input_nodes if a in sizes)
    payload_of_unit = even_cuts([reads[u] for u in range(max(unit_of.values(), default=0) + 1)], sizes, max_bytes)
    if max(payload_of_unit, default=0) == 0:
        return tags
    payload = {}
    for node in nodes:  # in graph order: every input's payload is known, and none is later than its users'
        payload[node] = max([payload_of_unit[unit_of[node]], *(payload[a] for a in node.all_input_nodes if a in payload)])
    new_tags = {}  # (payload, tag) -> (new tag, spec)
    for node in nodes:
        key = (payload[node], node.meta["delegation_tag"])
        new_tags.setdefault(key, (f"{key[1]}_payload{key[0]}", tags[key[1]]))
        node.meta["delegation_tag"] = new_tags[key][0]
    copied = 0
    for constant, size in sizes.items():  # with its first user; ExecuTorch copies it for users in other payloads
        users = [u for u in constant.users if u in payload]
        if users and constant.meta.get("delegation_tag") in tags:
            constant.meta["delegation_tag"] = min(users, key=payload.get).meta["delegation_tag"]
            copied += size * (len({payload[u] for u in users}) - 1)
    log.info("Core ML partition cut into %d payloads of at most %g MB of weights", max(payload_of_unit) + 1,
             max_bytes / 1e6)
    if copied:
        log.warning("%s: %.1f MB of weights are read on both sides of a cut, so stored in each payload that "
                    "reads them (ane.share_embedding puts the table in the first payload and the last)",
                    SETTING, copied / 1e6)
    return dict(new_tags[key] for key in sorted(new_tags, key=lambda key: key[0]))


def units(nodes):
    """{node: unit}: 0 before the first layer, layer i's nodes i + 1, after the last layer n + 1; a node
    outside any layer between two layers goes with the layer before it (graph order)."""
    layers = {node: _layer(node) for node in nodes}
    last = max((i for i in layers.values() if i is not None), default=-1)
    unit_of, unit = {}, 0
    for node in nodes:
        layer = layers[node]
        if layer is not None:
            unit = layer + 1
        elif unit == last + 1:  # past the last layer's nodes: the head
            unit = last + 2
        unit_of[node] = unit
    return unit_of


def _layer(node):
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        found = LAYER.match(path)
        if found:
            return int(found.group(1))
    return None


def stored_sizes(program):
    """{constant placeholder: bytes Core ML stores it in}: a quantized weight's codes at their bits
    (ExecuTorch holds 4- and 6-bit codes one a byte; Core ML packs them), the rest as they are."""
    from torch._export.utils import get_buffer, get_lifted_tensor_constant, get_param

    sizes = {}
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        tensor = next((t for t in (f(program, node) for f in (get_param, get_buffer, get_lifted_tensor_constant))
                       if t is not None), None)
        if tensor is not None:
            sizes[node] = math.ceil(tensor.numel() * tensor.element_size() * _code_bits(node) / 8)
    return sizes


def _code_bits(constant):
    """The bits of one code where ``constant`` is a dequantization's codes, else 8 (bytes as stored)."""
    for user in constant.users:
        name = str(user.target)
        if not user.args or user.args[0] is not constant:
            continue
        if "dequantize_codebook" in name:
            return user.args[2]
        if "dequantize_affine" in name and len(user.args) > 6:
            low, high = user.args[5], user.args[6]
            return max(1, (high - low).bit_length())
    return 8


def even_cuts(reads, sizes, max_bytes):
    """[payload of each unit]: the fewest contiguous payloads whose distinct constants (``reads`` per
    unit) stay within ``max_bytes``, the largest of them as small as that count allows."""
    for unit, constants in enumerate(reads):
        unit_bytes = sum(sizes[c] for c in constants)
        if unit_bytes > max_bytes:
            raise UserError(SETTING, f"{max_bytes / 1e6:g} MB: {_unit_name(unit, len(reads))} alone reads "
                                     f"{unit_bytes / 1e6:.1f} MB of weights; raise it, or quantize to fewer bits")
    fewest = len(_pack(reads, sizes, max_bytes))
    low, high = 0, max_bytes  # the least cap that still packs into ``fewest``
    while low < high:
        middle = (low + high) // 2
        if len(_pack(reads, sizes, middle)) <= fewest:
            high = middle
        else:
            low = middle + 1
    return [payload for payload, members in enumerate(_pack(reads, sizes, high)) for _ in members]


def _pack(reads, sizes, cap):
    """Units packed in order, each payload taking units while its distinct constants fit ``cap``."""
    payloads, held = [], set()
    for unit, constants in enumerate(reads):
        joined = held | constants
        if payloads and sum(sizes[c] for c in joined) <= cap:
            payloads[-1].append(unit)
            held = joined
        else:
            payloads.append([unit])
            held = set(constants)
    return payloads


def _unit_name(unit, count):
    return "what precedes the first layer" if unit == 0 else "the LM head" if unit == count - 1 else f"layer {unit - 1}"

