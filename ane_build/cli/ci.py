"""``ane-build ci plan``: the CI matrix that builds recipes over many runners, each shared stage once;
``ane-build pull``: a release bundle from the remote cache, without building.

The plan has two levels, each a matrix a CI job's strategy takes as it is
(``{"include": [job, ...]}``), every job running ``doit <targets>`` on a runner of its own
with the remote cache on:

- ``prefix``: one job per group of recipes that share stages (one model's fetch, convert,
  rewrite...), building the deepest stages they share, so each is built once;
- ``release``: then one job per recipe, through its release; what it shares it finds in the
  remote cache, and downloads only what it builds on.

A recipe that shares nothing has no prefix job. Each release job also names its release key,
which ``ane-build pull RECIPE --key KEY`` takes on a runner that cannot plan the recipe (a Mac
job without the checkpoint: a local source's key is its content's hash).
"""

import collections
import json
import logging
import sys
from pathlib import Path

from ane_build import pipeline, plans, recipe
from ane_build.cache import config, remote
from ane_build.cache.store import Store
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
LAST = pipeline.STAGES[-1].name


def plan(recipes, planned):
    """The matrix for ``recipes`` (loaded), given {recipe name: pipeline.plan of it}."""
    users = collections.Counter((stage, key) for stages in planned.values() for stage, (key, _) in stages.items())
    groups = collections.defaultdict(dict)  # first stage's key -> {deepest shared (stage, key): task}
    for rec in recipes:
        stages = planned[rec["name"]]
        # A key names every stage before it, so what two recipes share is a prefix of the stages.
        shared = [s.name for s in pipeline.stages_of(rec) if users[(s.name, stages[s.name][0])] > 1]
        if shared:
            deepest = (shared[-1], stages[shared[-1]][0])
            groups[stages[pipeline.STAGES[0].name][0]].setdefault(deepest, f"{shared[-1]}:{rec['name']}")
    prefix = []
    for deepest in groups.values():
        targets = [task for entry, task in deepest.items() if not _leads_to_another(entry, deepest, planned)]
        prefix.append({"name": "shared: " + ", ".join(targets), "targets": " ".join(targets)})
    release = [{"name": rec["name"], "recipe": rec["name"], "targets": f"{LAST}:{rec['name']}",
                "key": planned[rec["name"]][LAST][0]} for rec in recipes]
    return {"prefix": {"include": prefix}, "release": {"include": release}}


def _leads_to_another(entry, deepest, planned):
    """Whether another target's chain holds ``entry`` already (doit builds it on the way)."""
    stage, key = entry
    return any(other != entry and planned[task.split(":", 1)[1]][stage][0] == key
               for other, task in deepest.items())


def cmd_plan(args):
    """Named recipes must all plan; over every recipe, one waiting for its checkpoint is left out
    with one line on stderr, and a broken one is an error."""
    store = Store(args.artifacts)
    if args.recipes:
        recipes = [recipe.load(path, args.recipes_dir) for path in recipe_paths(args.recipes, args.recipes_dir)]
        planned = {rec["name"]: pipeline.plan(rec, store.hasher) for rec in recipes}
    else:
        recipes, planned = [], {}
        for rec, stages, problem in sorted(plans.every_recipe(args.recipes_dir, store.hasher),
                                           key=lambda found: plans.order(found[2])):
            if problem and not plans.waiting(rec, problem):
                raise problem
            if problem:
                print(f"skipped {rec['name']}: {plans.waiting(rec, problem)}", file=sys.stderr)
                continue
            recipes.append(rec)
            planned[rec["name"]] = stages
    store.hasher.save()
    print(json.dumps(plan(recipes, planned), separators=(",", ":")))


def cmd_pull(args):
    """Pull ``args.recipe``'s release entry into the store and link ``artifacts/release/<recipe>``."""
    cache = remote.configured(config.default_path())
    if cache is None:
        raise UserError("ANE_BUILD_CACHE", "no remote cache set (here, or [cache] url in ane-build.toml)")
    store = Store(args.artifacts)
    path = recipe_paths([args.recipe], args.recipes_dir)[0]
    name = recipe.recipe_name(path, args.recipes_dir)
    key = args.key or pipeline.plan(recipe.load(path, args.recipes_dir), store.hasher)[LAST][0]
    if not store.is_valid(LAST, key):
        _pull(cache, store, name, key)
    pipeline.link_views(store, name, LAST, key)
    print(pipeline.view_links(store, name, LAST)[-1])


def _pull(cache, store, name, key):
    manifest = cache.lookup(LAST, key)
    released = manifest and manifest["key_inputs"]["params"].get("recipe", {}).get("name")
    if manifest and released != name:  # a key copied from another recipe's job
        raise UserError(f"--key {key}", f"is the {LAST} of {released}, not of {name}")
    if manifest is None or cache.pull(store, LAST, key) is None:
        why = "could not be pulled (see the warning above)" if cache.down or (LAST, key) in cache.distrusted \
            else f"is not in the remote cache; build it first (doit {LAST}:{name})"
        raise UserError(f"{LAST}:{name}", f"{cache.where(LAST, key)} {why}")


def recipe_paths(given, recipes_dir):
    """Recipe files from names (``smollm2-135m/iphone15pro``) or paths; every recipe when none are given."""
    if not given:
        return recipe.discover(recipes_dir)
    return [Path(g) if g.endswith(".yaml") else Path(recipes_dir) / f"{g}.yaml" for g in given]


def add_arguments(sub):
    """``ci plan`` and ``pull``, on the ``ane-build`` subcommands ``sub``."""
    ci = sub.add_parser("ci", help="plan CI jobs over many runners").add_subparsers(dest="ci_command", required=True)
    planner = ci.add_parser("plan", help="print the JSON matrix that builds recipes, shared stages once",
                            description=__doc__)
    planner.add_argument("recipes", nargs="*", help="recipe names or files (default: all)")
    planner.set_defaults(func=cmd_plan)
    puller = sub.add_parser("pull", help="fetch a built release bundle from the remote cache, without building")
    puller.add_argument("recipe", help="a recipe name (smollm2-135m/iphone15pro) or file")
    puller.add_argument("--key", help="its release key, from `ane-build ci plan` (default: planned from the recipe)")
    puller.set_defaults(func=cmd_pull)
    for parser in (planner, puller):
        parser.add_argument("--recipes-dir", default="recipes")
        parser.add_argument("--artifacts", default="artifacts")
