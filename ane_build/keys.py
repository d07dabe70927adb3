"""Stage keys: sha256 of the canonical JSON of everything a stage's output depends on.

Never paths, timestamps, thread counts or hostnames: two machines building the
same recipe with the same toolchain compute the same keys.
"""

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

TOOLCHAIN = ("torch", "executorch", "coremltools", "torchao")
PACKAGE_ROOT = Path(__file__).resolve().parent


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj):
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@lru_cache(maxsize=None)
def toolchain_versions():
    versions = {}
    for name in TOOLCHAIN:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=None)
def source_fingerprint(sources):
    """sha256 over the text of the stage's own source files (paths relative to ane_build/).

    A folder entry (ending in "/") stands for every .py file in it.
    """
    h = hashlib.sha256()
    for rel in sources:
        files = sorted((PACKAGE_ROOT / rel).glob("*.py")) if rel.endswith("/") else [PACKAGE_ROOT / rel]
        for f in files:
            h.update(f.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def key_inputs(stage, params, upstream_keys):
    """Everything the key of ``stage`` hashes, as a JSON-able dict (stored in the manifest)."""
    return {
        "stage": stage.name,
        "format_version": stage.version,
        "params": params,
        "upstream": upstream_keys,
        "toolchain": toolchain_versions(),
        "source": source_fingerprint(stage.sources),
    }


def stage_key(inputs):
    return sha256_json(inputs)
