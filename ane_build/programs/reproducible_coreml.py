"""Core ML payloads that are the same bytes for the same model, so a rebuild gives the same ``.pte``.

Lowering the same program twice gave two ``model.pte`` files, for three reasons, all in what
ExecuTorch's Core ML backend writes (coremltools 9.0, ExecuTorch 1.5.1):

- each payload is named ``executorch_<uuid4>`` (in its metadata.json and the program's named
  data key): here the uuid is derived from a seed (the caller's: the stage's inputs) and a
  count, so a different model gets a different name, and the same model the same one. The
  name matters on a device: the runtime caches a compiled model under it;
- the .mlpackage's Manifest.json names its items by fresh UUIDs: here they are derived from
  the package's own content;
- model.mlmodel is a protobuf whose maps are written in no fixed order, and holds the
  conversion date: here it is written with sorted maps and without the date (which no
  runtime reads).

``deterministic_payloads`` patches the backend for the duration of a lowering.
"""

import contextlib
import hashlib
import json
import uuid
from pathlib import Path

CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"
MODEL_SPEC = Path("Data/com.apple.CoreML/model.mlmodel")


@contextlib.contextmanager
def deterministic_payloads(seed):
    """While inside, ExecuTorch's Core ML backend names and writes its payloads deterministically."""
    from executorch.backends.apple.coreml import executorchcoreml
    from executorch.backends.apple.coreml.compiler import coreml_preprocess

    flatten = executorchcoreml.flatten_directory_contents

    def normalized_flatten(directory):
        for package in sorted(Path(directory).glob("*.mlpackage")):
            normalize_package(package)
        return flatten(directory)

    saved_uuid = coreml_preprocess.uuid
    coreml_preprocess.uuid = SeededUuids(seed)
    executorchcoreml.flatten_directory_contents = normalized_flatten
    try:
        yield
    finally:
        coreml_preprocess.uuid = saved_uuid
        executorchcoreml.flatten_directory_contents = flatten


class SeededUuids:
    """Stands in for the ``uuid`` module where the backend calls ``uuid.uuid4()``: the n-th
    call returns a version-4 UUID made from sha256(seed, n)."""

    def __init__(self, seed):
        self.seed, self.count = seed, 0

    def uuid4(self):
        self.count += 1
        return derived_uuid(f"{self.seed}/{self.count}")


def derived_uuid(text):
    return uuid.UUID(bytes=hashlib.sha256(text.encode()).digest()[:16], version=4)


def normalize_package(package):
    """Rewrite ``package`` (an .mlpackage folder) so that it is a function of its model alone."""
    _normalize_spec(package / MODEL_SPEC)
    content = hashlib.sha256()
    for path in sorted(p for p in (package / "Data").rglob("*") if p.is_file()):
        content.update(path.relative_to(package).as_posix().encode() + b"\0")
        content.update(hashlib.sha256(path.read_bytes()).digest())
    _rename_items(package / "Manifest.json", content.hexdigest())


def _normalize_spec(path):
    from coremltools.proto import Model_pb2

    model = Model_pb2.Model()
    model.ParseFromString(path.read_bytes())
    model.description.metadata.userDefined.pop(CONVERSION_DATE, None)
    path.write_bytes(model.SerializeToString(deterministic=True))


def _rename_items(manifest_path, content_digest):
    """Manifest.json with each item named by a UUID derived from the content and the item's path."""
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(derived_uuid(f"{content_digest}/{item['path']}"))
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True))
