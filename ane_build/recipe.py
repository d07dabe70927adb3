"""Load a YAML recipe: follow ``extends:``, deep-merge, validate, fill defaults, resolve paths.

A recipe's name is its path under the recipes folder without ``.yaml``
(``recipes/smollm2-135m/iphone15pro.yaml`` -> ``smollm2-135m/iphone15pro``).
Files under ``recipes/_base/`` are bases to extend, not recipes to build.
"""

import copy
import logging
import os
from pathlib import Path

import yaml

from ane_build import schema
from ane_build.sources import hub
from ane_build.util.errors import UserError, display_path

log = logging.getLogger(__name__)
BASE_DIR = "_base"


def discover(recipes_dir):
    """Every buildable recipe file under ``recipes_dir``, sorted."""
    root = Path(recipes_dir)
    return sorted(p for p in root.rglob("*.yaml") if BASE_DIR not in p.relative_to(root).parts)


def recipe_name(path, recipes_dir):
    return Path(path).resolve().relative_to(Path(recipes_dir).resolve()).with_suffix("").as_posix()


def load(path, recipes_dir=None):
    """The validated recipe at ``path`` as a plain dict, with ``name`` and ``path`` added."""
    path = Path(path)
    where = display_path(path)
    if not path.is_file():
        raise UserError(where, "recipe not found")
    merged = _merged(path, chain=())
    merged.pop("extends", None)
    _absolutize_source_path(merged, path.parent)
    recipe = validate(merged, where)
    recipe["name"] = recipe_name(path, recipes_dir) if recipes_dir else path.stem
    recipe["path"] = where
    _warn_source_blocks_on_ne(recipe)
    return recipe


def validate(data, where):
    """``data`` (a recipe mapping, paths already absolute) checked and completed with defaults."""
    recipe = schema.validate(data, where)
    # Only the keys of the chosen source kind are kept: stages see what the user wrote.
    recipe["source"] = {k: v for k, v in recipe["source"].items() if v is not None}
    _check_rules(recipe, where)
    return recipe


def recorded(recipe):
    """The recipe as the manifest records it (and the stage key should hash it): without where it
    was read from on this host (its ``path``, a local source's folder), so the same recipe gives
    the same manifest on every machine. A local source's content is pinned by the fetch key."""
    recorded = copy.deepcopy({k: v for k, v in recipe.items() if k != "path"})
    if "path" in recorded["source"]:
        recorded["source"]["path"] = Path(recorded["source"]["path"]).name
    return recorded


def _merged(path, chain):
    """The recipe at ``path`` deep-merged over its ``extends`` chain."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(display_path(p) for p in (*chain, resolved))
        raise UserError(display_path(path), f"extends: cycle {cycle}")
    data = _read_yaml(path)
    base_ref = data.get("extends")
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise UserError(display_path(path), f"extends: expected a path string; got {base_ref!r}")
    base_path = path.parent / base_ref
    if not base_path.is_file():
        raise UserError(display_path(path), f"extends: base recipe {display_path(base_path)} not found")
    # A base's relative source.path is relative to the base's own folder.
    base = _merged(base_path, (*chain, resolved))
    _absolutize_source_path(base, base_path.parent)
    return deep_merge(base, data)


def _read_yaml(path):
    try:
        loader = _StrictLoader(path.read_text())
    except UnicodeDecodeError as e:
        raise UserError(display_path(path), f"unreadable YAML: {e}") from None
    try:
        data = loader.get_single_data()
    except _Refused as e:
        raise UserError(f"{display_path(path)}:{e.mark.line + 1}", f"{e.key}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise UserError(f"{display_path(path)}:{mark.line + 1}:{mark.column + 1}",
                        f"YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(display_path(path), f"unreadable YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(display_path(path), f"expected a mapping at the top level; got {type(data).__name__}")
    return data


class _Refused(Exception):
    """Something strict recipe YAML does not take, at ``mark``, under the (dotted) ``key``."""

    def __init__(self, mark, key, problem):
        super().__init__(problem)
        self.mark, self.key, self.problem = mark, key, problem


_YAML_TAG = "tag:yaml.org,2002:"
_KEY_KINDS = {"int": "an integer", "float": "a number", "bool": "true/false", "null": "null",
              "timestamp": "a date"}


class _StrictLoader(yaml.SafeLoader):
    """safe_load's loader, refusing what lets a recipe read as one thing and load as another: a
    repeated key (PyYAML keeps the last one silently), anchors and aliases (a value written
    somewhere else, merge keys ``<<`` included), any tag (``!!str``, ``!!python/object``: a value
    the reader does not see as written), and keys that are not strings (``1:``, ``yes:``, ``null:``).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._path = []  # the keys (and list indices) from the top down to the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        is_key = isinstance(parent, yaml.MappingNode) and index is None
        if is_key:
            step = event.value if isinstance(event, yaml.ScalarEvent) else "?"
        else:
            step = index.value if isinstance(parent, yaml.MappingNode) else index
        self._path.append(step)
        try:
            self._refuse_references_and_tags(event)
            node = super().compose_node(parent, index)
            if is_key:
                self._check_key(parent, node)
        finally:
            self._path.pop()
        return node

    def _key(self):
        text = ""
        for step in self._path[1:]:  # the first step is the document itself
            text += f"[{step}]" if isinstance(step, int) else f".{step}"
        return text.lstrip(".") or "(top level)"

    def _refuse_references_and_tags(self, event):
        if event.anchor is not None:  # an alias's anchor is the name it refers to
            which = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise _Refused(event.start_mark, self._key(),
                           f"YAML {which}{event.anchor}: anchors and aliases are not allowed (write the value out)")
        if event.tag is not None:
            tag = event.tag.replace(_YAML_TAG, "!!", 1)
            raise _Refused(event.start_mark, self._key(),
                           f"YAML tag {tag}: tags are not allowed (write a plain value; quote a string)")

    def _check_key(self, mapping, key):
        if not isinstance(key, yaml.ScalarNode):
            raise _Refused(key.start_mark, self._key(), "a key must be a string, not a list or mapping")
        kind = key.tag.removeprefix(_YAML_TAG)
        if kind == "merge":
            raise _Refused(key.start_mark, self._key(), "merge keys are not allowed (write the keys out)")
        if kind != "str":
            raise _Refused(key.start_mark, self._key(),
                           f"a key must be a string; this one reads as {_KEY_KINDS.get(kind, kind)} "
                           f"(quote it: '{key.value}')")
        first = next((k for k, _ in mapping.value if k.value == key.value), None)
        if first is not None:
            raise _Refused(key.start_mark, self._key(), f"duplicate key (first at line {first.start_mark.line + 1})")


def deep_merge(base, override, whole=schema.ONE_KIND, _prefix=""):
    """``override`` over ``base``: mappings merge key by key, except those named in ``whole``
    (dotted paths), which ``override`` replaces whole like anything else."""
    out = dict(base)
    for key, value in override.items():
        path = _prefix + key
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in whole:
            out[key] = deep_merge(out[key], value, whole, f"{path}.")
        else:
            out[key] = value
    return out


def _absolutize_source_path(data, folder):
    """source.path and calibrate.text, relative to the recipe that names them, made absolute."""
    for section, key in (("source", "path"), ("calibrate", "text")):
        fields = data.get(section)
        if isinstance(fields, dict) and isinstance(fields.get(key), str):
            # Not resolve(): a link is named as the user wrote it, and a broken one is refused where it is read.
            fields[key] = os.path.abspath(folder / fields[key])


def _check_rules(recipe, where):
    """Rules that span fields; each failure is one line naming the field."""
    _check_source(recipe["source"], where)
    ane = recipe["ane"]
    cache = schema.cache_size(ane)
    if not 1 <= cache < ane["max_seq_length"]:
        raise UserError(where, f"ane.cache_size: expected 1 <= cache_size < max_seq_length "
                               f"({ane['max_seq_length']}); got {cache}")
    _check_overrides(recipe["quantize"]["overrides"] or {}, where)
    if ane.get("share_embedding") and recipe["quantize"].get("embedding"):
        raise UserError(where, "quantize.embedding: ane.share_embedding reads the embedding from the LM head, "
                               "which is quantized as a linear (quantize.linear / overrides.output); remove one")
    _check_deployment_target(recipe, where)
    prompts = recipe["smoke"]["prompts"]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UserError(where, f"smoke.prompts: expected a list of non-empty strings; got {prompts!r}")


def needs_calibration(recipe):
    """Whether the recipe's quantizers read calibration statistics (its ``calibrate`` stage): a
    data-aware fit, or a size budget to allocate. False for a broken recipe (no quantize section)."""
    quantize = recipe.get("quantize") or {}
    return quantize.get("fit", "data-free") != "data-free" or quantize.get("budget_mb") is not None


def linear_kinds(quantize):
    """Every kind a ``quantize:`` section gives some linear: ``linear`` and the overrides' kinds."""
    return {quantize["linear"], *(quantize.get("overrides") or {}).values()}


def _check_overrides(overrides, where):
    kinds = schema.SCHEMA["quantize"]["linear"].choices
    for pattern, kind in overrides.items():
        if not isinstance(pattern, str) or kind not in kinds:
            raise UserError(where, f"quantize.overrides.{pattern}: expected a module pattern (a string) mapped to "
                                   f"one of {', '.join(kinds)}; got {kind!r}")


def _check_deployment_target(recipe, where):
    """What Core ML before iOS18 cannot take (checked on coremltools 9.0)."""
    target = recipe["export"]["minimum_deployment_target"]
    if target == "iOS18":
        return
    quant, dtype = recipe["quantize"], recipe["ane"]["dtype"]
    kinds = sorted(linear_kinds(quant) - {"none"})
    if kinds:
        raise UserError(where, f"quantize.linear: quantized linear weights ({'/'.join(kinds)}) need "
                               f"export.minimum_deployment_target iOS18 (checked on coremltools 9.0); got {target}")
    if quant["embedding"] not in (None, "8,0"):
        raise UserError(where, f"quantize.embedding: before iOS18 Core ML takes only '8,0' (8-bit, one "
                               f"scale per row); got {quant['embedding']!r} with {target}")
    if dtype != "fp32":
        # Before iOS18 the converter decomposes attention and adds the fp16 mask to fp32 scores.
        raise UserError(where, f"ane.dtype: fp16 needs export.minimum_deployment_target iOS18; got {target}")


def _warn_source_blocks_on_ne(recipe):
    """Kind source keeps a GGUF's per-block scales, which the Neural Engine does not run: allowed
    (Core ML takes them), but said, since the recipe asks for the NE."""
    if recipe["export"]["compute_unit"] == "CPU_AND_NE" and "source" in linear_kinds(recipe["quantize"]):
        log.warning("recipe %s (%s): quantize.linear=source keeps the checkpoint's per-block scales, which the "
                    "Neural Engine does not run: with export.compute_unit=CPU_AND_NE, Core ML will dequantize those "
                    "linears on the GPU/CPU (c8w or c4w, one scale per channel, run on the NE)",
                    recipe["name"], recipe["path"])


def _check_source(source, where):
    given = [kind for kind in schema.SOURCE_KINDS if kind in source]
    if len(given) != 1:
        kinds = ", ".join(kind + "".join(f" (+ {k})" for k in required[1:])
                          for kind, (required, _) in schema.SOURCE_KINDS.items())
        raise UserError(where, f"source: expected exactly one of {kinds}; got {', '.join(given) or 'none'}")
    kind = given[0]
    required, optional = schema.SOURCE_KINDS[kind]
    for key in required:
        if key not in source:
            raise UserError(where, f"source.{key}: required with source.{kind}")
    for key in source:
        if key not in required + optional:
            raise UserError(where, f"source.{key}: not used with source.{kind} (whose keys are "
                                   f"{', '.join(required + optional)})")
    if kind == "hf":
        _check_hub_source(source, where)


def _check_hub_source(source, where):
    files = source.get("files")
    if files is not None and (not files or not all(isinstance(f, str) and f for f in files)):
        raise UserError(where, f"source.files: expected a list of glob patterns (non-empty strings); got {files!r}")
    if not hub.is_commit(source["revision"]) and not source.get("allow_moving_revision"):
        # A branch or tag names different files over time; a key must name the same ones forever.
        raise UserError(where, f"source.revision: expected a commit (40 lowercase hex digits); got "
                               f"{source['revision']!r}, which can move: pin its commit, or set "
                               "source.allow_moving_revision: true to resolve it each time the build is planned")
