"""What decoding one token costs each method of a program, counted from its shapes, and the
upper bound on decode speed that memory bandwidth sets on a device.

Decoding is memory-bound on phones and laptops: every generated token reads every weight
once, and the KV cache, while the arithmetic units wait. So bytes per token over a device's
memory bandwidth bounds tokens/s from above. A bound, not a measurement: a real device also
spends time on the CPU between calls, on dispatch, and on what the Neural Engine does not
stream at full bandwidth.

Counted per call of a method taking S tokens, of which one is real when it decodes:

- weights read: every linear (the LM head included) and norm, and the embedding rows of the
  S tokens (a gather reads only those);
- MACs: the linears for S tokens, attention over the cache and the call's own S tokens, the
  pick of the last real row, and the LM head once (the program returns only that row's logits;
  a verify method's, every position's: S times);
- KV cache: every layer reads its whole cache and writes S new slots;
- padding waste: the share of the call's per-token work spent on its S - 1 pad tokens, when a
  generation feeds it one token a call.
"""

import json
from pathlib import Path

from ane_build.checkpoint import canonical
from ane_build.model import io

COST_JSON = "cost.json"
ELEMENT_BYTES = {"fp16": 2, "fp32": 4}
# Unified memory bandwidth, GB/s, by the recipes' ``device``: what bounds decoding on it.
DEVICE_BANDWIDTH = {
    "iPad Pro (M4)": (120.0, "Apple: M4, 120 GB/s unified memory bandwidth (apple.com/newsroom, May 2024)"),
    "Mac (Apple M3)": (100.0, "Apple: M3, 100 GB/s unified memory bandwidth (apple.com/newsroom, October 2023)"),
    "iPhone 15 Pro": (51.2, "Apple does not publish it; 51.2 GB/s is LPDDR5-6400 on a 64-bit bus, the A17 "
                            "Pro's memory as teardowns report it"),
}


def costs(spec):
    """{method: its counts per call and per decoded token} for a program of ``spec`` (spec.json)."""
    return {method: method_cost(spec, seq_length, every_position=method == io.VERIFY)
            for method, seq_length in io.methods(spec["ane"]).items()}


def method_cost(spec, seq_length, every_position=False):
    params, ane = spec["params"], spec["ane"]
    element = ELEMENT_BYTES[ane["dtype"]]
    weights = weight_bytes(spec["quantize"]["weight_groups"], params["dim"], seq_length)
    per_token, lm_head = token_macs(params, ane["cache_size"], seq_length), params["dim"] * params["vocab_size"]
    # The last real row is picked by a one-hot matmul (S x dim); a verify call keeps every row.
    pick, lm_head = (0, seq_length * lm_head) if every_position else (params["dim"], lm_head)
    kv_slot = 2 * params["n_layers"] * (params.get("n_kv_heads") or params["n_heads"]) * canonical.head_dim(params)
    kv_read, kv_written = kv_slot * ane["cache_size"] * element, kv_slot * seq_length * element
    return {
        "tokens_per_call": seq_length,
        "weight_bytes_per_call": weights,
        "macs_per_call": seq_length * (per_token + pick) + lm_head,
        "kv_bytes_read_per_call": kv_read,
        "kv_bytes_written_per_call": kv_written,
        # One real token per call when decoding: the other S - 1 are padding.
        "bytes_per_decoded_token": weights + kv_read + kv_written,
        "padding_waste": round((seq_length - 1) * per_token / (seq_length * per_token + lm_head), 4),
    }


def weight_bytes(groups, dim, seq_length):
    """Bytes of weights a call reads: all of them but the embedding table, of which S rows."""
    total = 0
    for name, group in groups.items():
        count = seq_length * dim if name == "embedding" else group["params"]
        total += count * group["bits"] // 8
    return total


def token_macs(params, cache_size, seq_length):
    """MACs of one token through every layer: linears, then scores and weighted sum over the
    cache and the call's tokens."""
    hd, n_kv = canonical.head_dim(params), params.get("n_kv_heads") or params["n_heads"]
    dim, q_width = params["dim"], params["n_heads"] * hd
    linears = dim * q_width + 2 * dim * n_kv * hd + q_width * dim + 3 * dim * params["hidden_dim"]
    attention = 2 * params["n_heads"] * hd * (cache_size + seq_length)
    return params["n_layers"] * (linears + attention)


def cheapest(method_costs):
    """The method that reads the fewest bytes per decoded token: the one to decode with."""
    return min(method_costs, key=lambda m: method_costs[m]["bytes_per_decoded_token"])


def decode_bound(method_costs, device):
    """{"device", "bandwidth_gb_s", "source", "tokens_per_second_at_most"} for decoding one token a
    call with the cheapest method, or None when the device's bandwidth is not in the table."""
    if device not in DEVICE_BANDWIDTH:
        return None
    bandwidth, source = DEVICE_BANDWIDTH[device]
    method = cheapest(method_costs)
    per_token = method_costs[method]["bytes_per_decoded_token"]
    return {"device": device, "method": method, "bandwidth_gb_s": bandwidth, "source": source,
            "tokens_per_second_at_most": round(bandwidth * 1e9 / per_token, 1)}


def write(spec, out_dir):
    """cost.json in ``out_dir`` (an export entry: shared by devices, so without a device's bound)."""
    report = {"methods": costs(spec), "note": "counted from the program's shapes, per call and per decoded token"}
    (Path(out_dir) / COST_JSON).write_text(json.dumps(report, indent=2) + "\n")
    return report


def read(export_dir):
    """The methods' costs an export entry holds, or None for an entry from before cost.json."""
    path = Path(export_dir) / COST_JSON
    return json.loads(path.read_text())["methods"] if path.exists() else None
