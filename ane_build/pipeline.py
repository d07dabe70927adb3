"""The stage table of DESIGN.md, and how a recipe's stage keys chain through it.

Keys are computed from the recipe alone (plus the content hash of a local
source), so a build knows what is cached before anything runs.
"""

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ane_build.cache import keys
from ane_build.recipe import needs_calibration, recorded
from ane_build.util.errors import UserError
from ane_build.util.memory import release_memory


@dataclass(frozen=True)
class Stage:
    name: str
    version: int  # bump when the stage's output format changes without a source change
    sections: tuple  # the recipe sections this stage reads
    upstream: tuple  # the stages whose outputs it reads
    flags: tuple = ()  # top-level recipe keys it also reads (``chat``): in its key, and added to its params
    only_if: object = None  # recipe -> whether the recipe has this stage at all; None: every recipe has it

    @property
    def module_name(self):
        """Its code: this module and what it imports (``import_graph``), all in its key."""
        return f"ane_build.stages.{self.name}"

    @property
    def module(self):
        return importlib.import_module(self.module_name)


STAGES = (
    Stage("fetch", 1, ("source",), ()),
    Stage("convert", 1, ("convert",), ("fetch",), ("chat",)),
    # Only for data-aware quantizers; keyed on the checkpoint, so every device's recipe shares it.
    Stage("calibrate", 1, ("calibrate",), ("convert",), only_if=needs_calibration),
    Stage("rewrite", 1, ("ane",), ("convert",)),
    Stage("quantize", 1, ("quantize",), ("rewrite", "calibrate")),
    Stage("export", 1, ("export",), ("quantize",)),
    Stage("smoke", 1, ("smoke",), ("export", "convert"), ("chat",)),
    Stage("release", 1, ("release",), ("export", "smoke")),
)
BY_NAME = {s.name: s for s in STAGES}


def stages_of(recipe):
    """The stages ``recipe`` has, upstream first."""
    return [s for s in STAGES if s.only_if is None or s.only_if(recipe)]


def upstream_of(stage, recipe):
    """The stages whose outputs ``stage`` reads for ``recipe``."""
    return [up for up in stage.upstream if BY_NAME[up] in stages_of(recipe)]


def key_params(stage, recipe, file_sha256):
    """The recipe slice ``stage`` is keyed on.

    fetch is keyed on what the source holds, not where it lives: the same
    checkpoint reached by path, package or URL is one entry.
    """
    if stage.name == "fetch":
        from ane_build.stages import fetch

        return fetch.key_params(recipe["source"], file_sha256)
    if stage.name == "smoke":
        from ane_build.analysis import quality

        # The evaluation text comes with Python, and its bytes differ between some releases.
        return {"smoke": recipe["smoke"], **flags(stage, recipe), "eval_text_sha256": quality.eval_text()[1]}
    if stage.name == "calibrate":
        from ane_build.analysis import quality
        from ane_build.quant import calibration_text

        # The text is keyed by its bytes: a file named in the recipe, or Python's own (which differ
        # between some releases).
        section = recipe["calibrate"]
        named = {**section, "text": section["text"] and Path(section["text"]).name}  # not where it is on this host
        text = calibration_text.chosen_text(section["text"], quality.held_out_topics())
        return {"calibrate": named, "text_sha256": calibration_text.sha256(text)}
    if stage.name == "release":
        from ane_build.bundle import runner_sources

        # The bundle's manifest records the whole recipe (name and device too), so it is keyed on it;
        # it carries the native runner's sources, which are not Python: the import graph misses them.
        return {"recipe": recorded(recipe), "runner_sources_sha256": runner_sources.sha256()}
    return {**{section: recipe[section] for section in stage.sections}, **flags(stage, recipe)}


def flags(stage, recipe):
    return {flag: recipe[flag] for flag in stage.flags}


def plan(recipe, file_sha256):
    """{stage name: (key, key inputs)} for every stage, upstream first."""
    planned = {}
    for stage in stages_of(recipe):
        upstream = {up: planned[up][0] for up in upstream_of(stage, recipe)}
        with naming_recipe(recipe):
            params = key_params(stage, recipe, file_sha256)
        inputs = keys.key_inputs(stage, params, upstream)
        planned[stage.name] = (keys.stage_key(inputs), inputs)
    return planned


@contextmanager
def naming_recipe(recipe):
    """Prefix a stage's UserError with the recipe file, so the one line says where to fix it."""
    try:
        yield
    except UserError as e:
        raise e.at(recipe["path"]) from None


def run_params(stage, recipe, planned=None):
    """What the stage's ``run`` receives: the recipe sections it reads (one section: that mapping), and
    its flags (``chat``).

    release gets the whole recipe and every stage key, for its manifest. fetch of a Hub source
    gets the commit its key was planned with: the branch it names may have moved since.
    """
    if stage.name == "release":
        return {"recipe": recipe, "stage_keys": {name: key for name, (key, _) in planned.items()}}
    if stage.name == "fetch" and "hf" in recipe["source"]:
        return {**recipe["source"], "revision": planned["fetch"][1]["params"]["commit"]}
    slices = {section: recipe[section] for section in stage.sections}
    return {**(next(iter(slices.values())) if len(slices) == 1 else slices), **flags(stage, recipe)}


def build(store, recipe, stage_name, planned):
    """Build (or reuse) one stage of ``recipe``; return (entry dir, whether it was built)."""
    stage = BY_NAME[stage_name]
    key, key_inputs = planned[stage_name]
    inputs = {up: store.entry(up, planned[up][0]) for up in upstream_of(stage, recipe)}
    params = run_params(stage, recipe, planned)
    with naming_recipe(recipe):
        entry, built = store.build(stage.name, key, key_inputs, lambda out: stage.module.run(inputs, params, out))
    if built:  # doit runs every stage in its one process: the next starts with this one's memory back
        release_memory()
    link_views(store, recipe["name"], stage.name, key)
    return entry, built


def obtain(store, recipe, stage_name, planned, remote=None, local=True):
    """Make one stage of ``recipe`` available, from the store, the remote cache (``remote.py``) or
    a build (pushed then); return (entry, how): "cached", "pulled", "built", or "remote".

    "remote" only when ``local`` is false, that is no one asked for this stage's files: the remote
    cache holds the entry and nothing is downloaded (``entry`` is then its URL). A later stage
    that builds on it pulls it then (``_inputs``), as Bazel's builds without the bytes do.
    """
    key = planned[stage_name][0]
    if store.is_valid(stage_name, key):
        entry, how = store.entry(stage_name, key), "cached"
    elif remote and not local and remote.lookup(stage_name, key):
        return remote.where(stage_name, key), "remote"
    elif remote and (pulled := remote.pull(store, stage_name, key)):
        entry, how = pulled[0], "pulled" if pulled[1] else "cached"  # else a concurrent pull put it there
    else:
        _inputs(store, recipe, stage_name, planned, remote)
        entry, built = build(store, recipe, stage_name, planned)
        if built and remote:
            remote.push(store, stage_name, key)
        return entry, "built" if built else "cached"
    link_views(store, recipe["name"], stage_name, key)
    return entry, how


def _inputs(store, recipe, stage_name, planned, remote):
    """The upstream entries of a stage about to build, into the local store: one that an earlier
    task left in the remote cache is pulled now, or built (its own inputs first) if that fails."""
    for upstream in upstream_of(BY_NAME[stage_name], recipe):
        obtain(store, recipe, upstream, planned, remote)


def view_links(store, recipe_name, stage_name):
    """The links a built stage shows itself by: its recipe view, and for release also
    ``artifacts/release/<recipe>`` (the bundle folder inside the entry)."""
    links = [store.view(recipe_name, stage_name)]
    return links + [store.root / "release" / recipe_name] if stage_name == "release" else links


def link_views(store, recipe_name, stage_name, key):
    """Point ``view_links`` at the stage's entry."""
    store.link_view(recipe_name, stage_name, key)
    for bundle_link in view_links(store, recipe_name, stage_name)[1:]:
        bundle = next(p for p in store.entry(stage_name, key).iterdir() if p.is_dir())
        store.link(bundle_link, bundle)
