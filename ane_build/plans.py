"""Every recipe's plan, or why it has none: the commands over all recipes (``doit <stage>``,
``ane-build status``, ``ane-build ci plan``) go on past a recipe that cannot be planned.

Such a recipe either waits for a checkpoint the user brings (its local source is not there:
``SourceMissing``), and is skipped in one line saying what to put where, or is broken (invalid
YAML, an unreadable source...), and fails the command after the others.
"""

from ane_build import pipeline, recipe
from ane_build.util.errors import SourceMissing, UserError, display_path


def every_recipe(recipes_dir, hasher):
    """(recipe, plan, None) for each recipe under ``recipes_dir``, or (recipe, None, the UserError)
    for one that cannot be planned; of a broken recipe only the name and path are known."""
    for path in recipe.discover(recipes_dir):
        rec = {"name": recipe.recipe_name(path, recipes_dir), "device": None, "path": display_path(path)}
        try:
            rec = recipe.load(path, recipes_dir)
            yield rec, pipeline.plan(rec, hasher), None
        except UserError as e:
            yield rec, None, e


def waiting(rec, problem):
    """For a recipe whose checkpoint is not there yet, why it is skipped: what to put where; else None."""
    if not isinstance(problem, SourceMissing):
        return None
    what = f" ({rec['description']})" if rec.get("description") else ""
    return (f"waits for its checkpoint{what}: put it at {display_path(problem.path)} "
            f"(source.path of {rec['path']})")


def order(problem):
    """Sorts the recipes a command goes through: plannable first, waiting next, broken last."""
    return 0 if problem is None else 1 if isinstance(problem, SourceMissing) else 2
