"""doit wiring: one task per (stage, recipe), up to date when its stage key has a valid store entry.

Tasks are plain dicts. doit's own database only remembers which key a task last
produced (its saved values), so ``doit forget`` makes a task run again, and that
run finds the store entry and returns at once instead of rebuilding it.
"""

import logging
import os
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from ane_build import logs, pipeline, recipe
from ane_build.errors import UserError
from ane_build.store import Store


def doit_config(artifacts_dir, default_recipe):
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    last = pipeline.STAGES[-1].name
    return {
        "default_tasks": [f"{last}:{default_recipe}"],
        # sqlite: safe for concurrent doit processes and CI, unlike the default dbm.
        "backend": "sqlite3",
        "dep_file": str(Path(artifacts_dir) / "doit.sqlite3"),
        "reporter": Reporter,
        "verbosity": 2,
    }


def generate(recipes_dir, artifacts_dir):
    """Yield every task dict for every recipe under ``recipes_dir``."""
    store = Store(artifacts_dir)
    names = []
    for path in recipe.discover(recipes_dir):
        rec = recipe.load(path, recipes_dir)
        names.append(rec["name"])
        try:
            planned, problem = pipeline.plan(rec, store.hasher), None
        except UserError as e:  # e.g. a source not there yet: listed, and fails only when run
            planned, problem = None, e
        for stage in pipeline.STAGES:
            yield _task(store, rec, stage, planned, problem)
    for stage in pipeline.STAGES:
        yield {"basename": stage.name, "doc": f"{stage.name} every recipe", "actions": None,
               "task_dep": [f"{stage.name}:{name}" for name in names]}
    store.hasher.save()


def _task(store, rec, stage, planned, problem):
    key = planned[stage.name][0] if planned else None
    return {
        # Top-level tasks named <stage>:<recipe> (not doit subtasks), so `doit list` shows them.
        "basename": f"{stage.name}:{rec['name']}",
        "doc": f"{stage.name} {rec['name']}" + (f" ({rec['device']})" if rec["device"] else ""),
        "actions": [(_run, [store, rec, stage.name, planned, problem])],
        "uptodate": [(_uptodate, [store, rec["name"], stage.name, key])],
        "task_dep": [f"{up}:{rec['name']}" for up in stage.upstream],
        "clean": [(_clean, [store, rec["name"], stage.name, key])],
    }


def _uptodate(task, values, store, recipe_name, stage_name, key):
    if key is None or values.get("key") != key or not store.is_valid(stage_name, key):
        return False
    pipeline.link_views(store, recipe_name, stage_name, key)  # repair a deleted view; cheap
    return True


def _run(store, rec, stage_name, planned, problem):
    logs.show_progress()
    try:
        if problem:
            raise problem
        entry, built = pipeline.build(store, rec, stage_name, planned)
    except UserError as e:
        return TaskFailed(str(e))
    logging.getLogger(__name__).info("%s %s: %s", "built" if built else "cached", stage_name, entry)
    return {"key": planned[stage_name][0]}


def _clean(store, recipe_name, stage_name, key):
    if key is not None:
        store.remove(stage_name, key)
    for link in pipeline.view_links(store, recipe_name, stage_name):
        if link.is_symlink():
            os.unlink(link)


class Reporter(ConsoleReporter):
    """doit's console reporter, but a user's mistake is one line, not a traceback."""

    def _write_failure(self, result, write_exception=True):
        fail = result["exception"]
        if isinstance(fail, TaskFailed) and not fail.traceback:
            self.write(f"error: {fail.message}\n")
        else:
            super()._write_failure(result, write_exception)
