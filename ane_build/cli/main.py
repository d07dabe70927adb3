"""The ``ane-build`` command: what is not a doit task (schema, status, export, run, verify, lint, ci, pull)."""

import argparse
import json
import sys
from pathlib import Path

from ane_build import pipeline, plans, recipe, schema
from ane_build.analysis import cost, lint
from ane_build.bundle import verify
from ane_build.cache import config, remote
from ane_build.cache.store import Store
from ane_build.cli import ci
from ane_build.cli import export as export_cli
from ane_build.runtime import cli as runtime_cli
from ane_build.util import command, logs


def cmd_schema(args):
    print(json.dumps(schema.json_schema(), indent=2))


def cmd_status(args):
    """Each stage's key and where it is: ``local`` (the store), ``remote`` (the remote cache, if one
    is set) or ``missing``, without building anything. Over every recipe, one that cannot be
    planned is one row saying why (exit 1 only with ``--strict``); asked about by name, it fails."""
    store = Store(args.artifacts)
    cache = remote.configured(config.default_path())
    if args.recipes:
        found = [(rec, pipeline.plan(rec, store.hasher), None)
                 for rec in (recipe.load(Path(p), args.recipes_dir) for p in args.recipes)]
    else:
        found = list(plans.every_recipe(args.recipes_dir, store.hasher))
    for rec, planned, problem in found:
        if problem:
            waiting = plans.waiting(rec, problem)
            print(f"{rec['name']}  skipped  {waiting}" if waiting else f"{rec['name']}  error  {problem}")
            continue
        for name, (key, inputs) in planned.items():
            state = "local" if store.is_valid(name, key) else "remote" if cache and cache.lookup(name, key) else "missing"
            print(f"{name}:{rec['name']}  {key[:16]}  {state}{_hub_commit(name, inputs, rec['source'])}"
                  f"{_decode_cost(name, store, key, rec['device']) if state == 'local' else ''}")
    store.hasher.save()
    return 1 if args.strict and any(problem for _, _, problem in found) else 0


def _decode_cost(stage_name, store, key, device):
    """For a built export, the cheapest method's bytes per decoded token, and the device's bound."""
    methods = cost.read(store.entry(stage_name, key)) if stage_name == "export" else None
    if not methods:
        return ""
    method = cost.cheapest(methods)
    text = f"  {method}: {methods[method]['bytes_per_decoded_token'] / 1e6:.1f} MB read per token"
    bound = cost.decode_bound(methods, device)
    return text + (f", at most {bound['tokens_per_second_at_most']} tokens/s on {device} (bandwidth bound)"
                   if bound else "")


def _hub_commit(stage_name, key_inputs, source):
    """For a Hub source's fetch, the commit its key names (and the branch or tag it was resolved from)."""
    if stage_name != "fetch" or "hf" not in source:
        return ""
    commit = key_inputs["params"]["commit"]
    moved_from = f" ({source['revision']})" if source["revision"] != commit else ""
    return f"  {source['hf']}@{commit}{moved_from}"


def parser():
    p = argparse.ArgumentParser(prog="ane-build", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="print the recipe JSON Schema").set_defaults(func=cmd_schema)
    status = sub.add_parser("status", help="show stage keys and where each is: local, remote or missing")
    status.add_argument("recipes", nargs="*", help="recipe files (default: all)")
    status.add_argument("--recipes-dir", default="recipes")
    status.add_argument("--artifacts", default="artifacts")
    status.add_argument("--strict", action="store_true", help="exit 1 if any recipe cannot be planned")
    status.set_defaults(func=cmd_status)
    for name, module, help_text in (
            ("export", export_cli, "export a .pte from -p/-c files (the seed export.py's flags)"),
            ("verify", verify, "check a release bundle against its manifest.json"),
            ("run", runtime_cli, "generate text with an exported .pte (the seed run.py's flags)"),
            ("lint", lint, "report the ops of a .pte or .mlpackage that break Neural Engine rules")):
        command_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command_parser).set_defaults(func=module.main)
    ci.add_arguments(sub)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    logs.show_progress()
    return command.report_errors(args.func, args) or 0


if __name__ == "__main__":
    sys.exit(main())
