"""The recipes we ship: each loads, and the bring-your-own Llama 3.2 1B family builds on a stand-in."""

import pytest

from ane_build import recipe
from tests.test_tasks import ROOT, doit, executed
from tests.tiny_llama import LLAMA3_ROPE, tiny_params, tiny_weights, write_meta

RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("path", recipe.discover(RECIPES), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    rec = recipe.load(path, RECIPES)
    assert rec["device"] and rec["ane"]["decode_method"]


def test_default_model_devices_share_fetch_and_convert():
    from ane_build import pipeline
    from ane_build.cache.filehash import FileHasher

    hasher = FileHasher(ROOT / "artifacts" / "store" / ".filehash.json")
    plans = [pipeline.plan(recipe.load(p, RECIPES), hasher) for p in sorted(RECIPES.glob("smollm2-135m/*.yaml"))]
    assert len(plans) >= 3
    assert len({p["convert"][0] for p in plans}) == 1 and len({p["export"][0] for p in plans}) == len(plans)


def test_llama32_1b_recipe_builds_a_meta_checkpoint_stand_in(tmp_path):
    """The shipped Llama 3.2 1B recipe, unchanged but for its source: a tiny Meta folder of the same format,
    and its lint a warning (the tiny shapes' rows are not whole 64-byte lines; the 1B's are)."""
    params = tiny_params(vocab_size=520, **LLAMA3_ROPE)  # tiktoken: 262 ranks + Llama 3's 256 specials
    write_meta(params, tiny_weights(params), tmp_path / "Llama-tiny", tokenizer="tiktoken")
    (tmp_path / "recipes/mine").mkdir(parents=True)
    (tmp_path / "recipes/mine/phone.yaml").write_text(
        f"extends: {RECIPES / 'llama3.2-1b/iphone15pro.yaml'}\nsource: {{path: ../../Llama-tiny}}\n"
        "export: {ane_lint: warn}\n")
    proc = doit(tmp_path, "export:mine/phone")
    assert executed(proc)[-1] == "export:mine/phone"
    export_dir = tmp_path / "artifacts/recipes/mine/phone/export"
    assert (export_dir / "model.pte").is_file() and (export_dir / "tokenizer.model").is_file()
    assert "100.0% of ops delegated" in (export_dir / "delegation.txt").read_text()


def test_the_instruct_model_is_used_through_its_chat_template_and_the_base_model_is_not():
    chat = {path.parent.name: recipe.load(path, RECIPES)["chat"] for path in recipe.discover(RECIPES)}
    assert chat == {"smollm2-135m": True, "llama3.2-1b": False}
