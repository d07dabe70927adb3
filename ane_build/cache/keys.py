"""Stage keys: sha256 of the canonical JSON of everything a stage's output depends on.

Never paths, timestamps, thread counts or hostnames: two machines building the
same recipe with the same toolchain compute the same keys.
"""

import hashlib
import json
from functools import lru_cache
from importlib import metadata

from ane_build.cache import import_graph

TOOLCHAIN = ("torch", "executorch", "coremltools", "torchao")


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


def key_inputs(stage, params, upstream_keys):
    """Everything the key of ``stage`` hashes, as a JSON-able dict (stored in the manifest): its
    code is every package module it can run, each by its sha256, and the versions of the
    libraries those modules import (``import_graph``)."""
    return {
        "stage": stage.name,
        "format_version": stage.version,
        "params": params,
        "upstream": upstream_keys,
        "code": import_graph.fingerprint(stage.module_name),
        "libraries": import_graph.libraries(stage.module_name),
    }


def stage_key(inputs):
    return sha256_json(inputs)
