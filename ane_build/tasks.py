"""doit wiring: one task per (stage, recipe), up to date when its stage key has a valid store entry.

Tasks are plain dicts. doit's own database only remembers which key a task last
produced (its saved values), so ``doit forget`` makes a task run again, and that
run finds the store entry and returns at once instead of rebuilding it.

With a remote cache (``remote.py``), a task first looks its key up there: a stage that doit was
asked for is pulled; one that only leads to it stays in the remote, and is pulled when a later
stage has to build on it.
"""

import contextlib
import json
import os
import time
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from ane_build import pipeline, plans
from ane_build.cache import remote
from ane_build.cache.store import Store
from ane_build.util import logs
from ane_build.util.errors import UserError

# The tasks doit was asked for (groups expanded), told to the Reporter as the run starts; None: unknown, all.
_asked = None
_named = set()  # the recipes of the tasks named on the command line (not through a group), likewise
_waiting = {}  # task name: why it is skipped (its recipe waits for a checkpoint), for the Reporter
_left_remote = set()  # tasks up to date because the remote cache holds their entry, for the Reporter


def doit_config(artifacts_dir, default_recipe):
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    last = pipeline.STAGES[-1].name
    return {
        "default_tasks": [f"{last}:{default_recipe}"],
        # sqlite: safe for concurrent doit processes and CI, unlike the default dbm.
        "backend": "sqlite3",
        "dep_file": str(Path(artifacts_dir) / "doit.sqlite3"),
        "reporter": Reporter,
    }


def generate(recipes_dir, artifacts_dir, config_path=None):
    """Yield every task dict for every recipe under ``recipes_dir``; ``config_path``: the project's
    ane-build.toml, which may name a remote cache (as may the environment)."""
    store = Store(artifacts_dir)
    cache = remote.configured(config_path)
    names = []
    for rec, planned, problem in plans.every_recipe(recipes_dir, store.hasher):
        names.append((plans.order(problem), rec["name"], pipeline.stages_of(rec)))
        for stage in pipeline.stages_of(rec):
            yield _task(store, cache, rec, stage, planned, problem)
    # A group builds the recipes it can first, skips those waiting for a checkpoint, and fails on a
    # broken one last: one broken recipe does not keep the others from building.
    for stage in pipeline.STAGES:
        yield {"basename": stage.name, "doc": f"{stage.name} every recipe", "actions": None,
               "task_dep": [f"{stage.name}:{name}" for _, name, stages in sorted(names) if stage in stages]}
    store.hasher.save()


def _task(store, cache, rec, stage, planned, problem):
    key = planned[stage.name][0] if planned else None
    waiting = plans.waiting(rec, problem)
    waiting = waiting and f"{rec['name']}: {waiting}"
    return {
        # Top-level tasks named <stage>:<recipe> (not doit subtasks), so `doit list` shows them.
        "basename": f"{stage.name}:{rec['name']}",
        "doc": f"{stage.name} {rec['name']}" + (f" ({rec['device']})" if rec["device"] else ""),
        "actions": [(_run, [store, cache, rec, stage.name, planned, problem])],
        "uptodate": [(_uptodate, [store, rec["name"], stage.name, key, waiting])],
        "task_dep": [f"{up}:{rec['name']}" for up in pipeline.upstream_of(stage, rec)],
        "clean": [(_clean, [store, rec["name"], stage.name, key])],
    }


def _uptodate(task, values, store, recipe_name, stage_name, key, waiting):
    if waiting and recipe_name not in _named:  # reached through a group: skipped, not failed
        _waiting[task.name] = waiting
        return True
    if key is None or values.get("key") != key:
        return False
    if store.is_valid(stage_name, key):
        pipeline.link_views(store, recipe_name, stage_name, key)  # repair a deleted view; cheap
        return True
    # Left in the remote cache by the last run and still not asked for: a stage that builds on it pulls it.
    if values.get("how") == "remote" and not _wanted(task.name):
        _left_remote.add(task.name)
        return True
    return False


def _wanted(task_name):
    return _asked is None or task_name in _asked


def _ask_for(tasks, selected):
    """Record the tasks doit was asked for: ``selected`` names, a group standing for its task_dep."""
    global _asked, _named
    _named = {name.split(":", 1)[1] for name in selected or () if name in tasks and tasks[name].actions}
    _asked, todo = set(), list(selected or ())
    while todo:
        name = todo.pop()
        if name in tasks and name not in _asked:
            _asked.add(name)
            todo.extend(() if tasks[name].actions else tasks[name].task_dep)


def _run(store, cache, rec, stage_name, planned, problem, task):
    """Build one stage; its output goes to ``artifacts/logs/<recipe>/<stage>.log`` unless doit
    runs with ``-v 2``, which shows everything."""
    log_path = store.root / "logs" / rec["name"] / f"{stage_name}.log"
    quiet = task.verbosity < 2
    if quiet:
        output = logs.stage_output(log_path, task.name, _last_seconds(store, rec["name"], stage_name))
    else:
        logs.show_progress()
        output = contextlib.nullcontext()
    started = time.monotonic()
    try:
        with output:
            if problem:
                raise problem
            entry, how = pipeline.obtain(store, rec, stage_name, planned, cache, local=_wanted(task.name))
    except UserError as e:
        return TaskFailed(f"{e} (log: {log_path})" if quiet and log_path.stat().st_size else str(e))
    return {"key": planned[stage_name][0], "how": how, "seconds": round(time.monotonic() - started, 1),
            "entry": str(entry)}


def _last_seconds(store, recipe_name, stage_name):
    """How long the stage's last build for this recipe took (its view's entry), if it has one."""
    try:
        return json.loads((store.view(recipe_name, stage_name) / "manifest.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return None


def _clean(store, recipe_name, stage_name, key):
    if key is not None:
        store.remove(stage_name, key)
    for link in pipeline.view_links(store, recipe_name, stage_name):
        if link.is_symlink():
            os.unlink(link)


class Reporter(ConsoleReporter):
    """One line as a stage starts and one as it ends (built or found cached, with its wall time),
    and a user's mistake as one line, not a traceback."""

    VERBS = {"built": "built ", "cached": "cached", "pulled": "pulled", "remote": "remote"}

    def initialize(self, tasks, selected_tasks):
        _ask_for(tasks, selected_tasks)
        self._said = set()

    def execute_task(self, task):
        if task.actions:
            self.write(f"start  {task.name}\n")

    def add_success(self, task):
        values = task.values
        if task.actions and "how" in values:
            verb = self.VERBS[values["how"]]
            self.write(f"{verb} {task.name}  {values['seconds']:.1f} s  {values['entry']}\n")

    def skip_uptodate(self, task):
        if task.name in _waiting:
            if _waiting[task.name] not in self._said:  # once for the recipe, not once per stage
                self._said.add(_waiting[task.name])
                self.write(f"skipped {_waiting[task.name]}\n")
        elif task.actions:
            verb = "remote" if task.name in _left_remote else "cached"
            self.write(f"{verb} {task.name}  up to date\n")

    def _write_failure(self, result, write_exception=True):
        fail = result["exception"]
        if isinstance(fail, TaskFailed) and not fail.traceback:
            self.write(f"error: {fail.message}\n")
        else:
            super()._write_failure(result, write_exception)
