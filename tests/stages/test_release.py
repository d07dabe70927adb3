import hashlib
import json
import shutil
import tarfile

import pytest
from executorch.runtime import Runtime

from ane_build import pipeline, recipe
from ane_build.analysis import cost
from ane_build.bundle import runner_sources, verify
from ane_build.cache import keys
from ane_build.cache.filehash import sha256_file
from ane_build.model import io, rewrites
from ane_build.util.errors import UserError, display_path
from tests.stages.tiny_export import (
    CHAT_TEMPLATE,
    CORE_ML_STAND_IN,
    STAGE_KEYS,
    chat_entries,
    read_json,
    released,
    run_release,
    run_smoke,
    tiny_recipe,
)

NAME = "tiny-phone"  # the recipe tiny/phone
FILES = ["README.md", "delegation.txt", "manifest.json", "model.pte", "params.json", "smoke.md", "tokenizer.model"]
RUNNER = [f"runner/{rel}" for rel in runner_sources.files()]  # the native runner's sources, beside the package


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return released(tmp_path_factory)


@pytest.fixture
def inputs(built):
    return {"export": built["export"], "smoke": built["smoke"]}


def test_the_bundle_holds_what_the_device_needs_and_no_twin(built):
    assert sorted(p.name for p in built["release"].iterdir()) == [NAME]
    assert sorted(p.name for p in (built["release"] / NAME).iterdir()) == sorted([*FILES, "runner", f"{NAME}.tar.gz"])
    assert (built["release"] / NAME / "model.pte").read_bytes() == CORE_ML_STAND_IN
    # The model's params, as upstream's runners read them (``--params``).
    assert read_json(built["release"] / NAME / "params.json") == read_json(built["export"] / "spec.json")["params"]


def test_the_manifest_hashes_every_file_and_says_how_it_was_made(built):
    bundle = built["release"] / NAME
    manifest = read_json(bundle / "manifest.json")
    assert manifest["files"] == {name: {"sha256": hashlib.sha256((bundle / name).read_bytes()).hexdigest(),
                                        "size": (bundle / name).stat().st_size}
                                 for name in [*FILES, *RUNNER] if name != "manifest.json"}
    assert (manifest["bundle"], manifest["device"]) == (NAME, "Tiny Phone")
    assert manifest["stage_keys"] == STAGE_KEYS
    assert manifest["toolchain"] == keys.toolchain_versions()
    summary = read_json(built["smoke"] / "smoke.json")["summary"]
    assert manifest["smoke"] == {**{k: v for k, v in summary.items() if "tokens_per_second" not in k},
                                 "arithmetic": "fp32"}
    assert manifest["smoke"]["min_top1_agreement"] == 1.0


def test_the_manifest_records_the_recipe_without_host_paths(built):
    recorded = read_json(built["release"] / NAME / "manifest.json")["recipe"]
    expected = tiny_recipe()
    del expected["path"]
    assert recorded == {**expected, "source": {"path": "tiny"}}


def test_the_archive_is_the_same_bytes_every_time(built, inputs, tmp_path):
    run_release(inputs, tmp_path / "again")
    assert (tmp_path / "again" / NAME / f"{NAME}.tar.gz").read_bytes() == \
        (built["release"] / NAME / f"{NAME}.tar.gz").read_bytes()


def test_the_archive_is_the_bundle_folder_without_host_details(built):
    archive = built["release"] / NAME / f"{NAME}.tar.gz"
    assert archive.read_bytes()[4:8] == bytes(4)  # gzip's mtime
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        folders = {rel.rpartition("/")[0] for rel in RUNNER} | {"runner"}  # runner/ and what it holds
        in_order = sorted([*FILES, *RUNNER, *folders], key=lambda rel: rel.split("/"))
        assert [m.name for m in members] == [NAME] + [f"{NAME}/{rel}" for rel in in_order]
        assert [m.name for m in members if m.isdir()] == [NAME] + [f"{NAME}/{rel}" for rel in sorted(folders)]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
        assert tar.extractfile(f"{NAME}/model.pte").read() == CORE_ML_STAND_IN


def test_the_archive_compresses_blocks_side_by_side_into_one_gzip_stream(built, inputs, tmp_path, monkeypatch):
    """Small blocks: many gzip members, read as one stream, the same bytes run after run."""
    import gzip

    from ane_build.stages import release

    single = (built["release"] / NAME / f"{NAME}.tar.gz").read_bytes()
    monkeypatch.setattr(release.GzipMembers, "BLOCK", 1000)
    for run in ("a", "b"):
        run_release(inputs, tmp_path / run)
    blocks = [(tmp_path / run / NAME / f"{NAME}.tar.gz").read_bytes() for run in ("a", "b")]
    assert blocks[0] == blocks[1] != single
    assert gzip.decompress(blocks[0]) == gzip.decompress(single)
    with tarfile.open(tmp_path / "a" / NAME / f"{NAME}.tar.gz") as tar:
        assert tar.extractfile(f"{NAME}/model.pte").read() == CORE_ML_STAND_IN


def test_an_empty_stream_is_one_empty_gzip_member(tmp_path):
    import gzip

    from ane_build.stages import release

    with open(tmp_path / "empty.gz", "wb") as raw, release.GzipMembers(raw):
        pass
    assert gzip.decompress((tmp_path / "empty.gz").read_bytes()) == b""


def test_release_name_names_the_bundle(inputs, tmp_path):
    run_release(inputs, tmp_path / "named", tiny_recipe(name="tiny-1.0"))
    assert read_json(tmp_path / "named" / "tiny-1.0" / "manifest.json")["bundle"] == "tiny-1.0"
    assert (tmp_path / "named" / "tiny-1.0" / "tiny-1.0.tar.gz").is_file()


def test_a_release_name_that_is_a_path_is_refused(inputs, tmp_path):
    with pytest.raises(UserError) as error:
        run_release(inputs, tmp_path / "out", tiny_recipe(name="../up"))
    assert str(error.value) == "release.name: expected a file name (no / or \\); got '../up'"


def test_the_readme_tells_an_app_developer_what_the_manifest_says(built):
    bundle = built["release"] / NAME
    readme, manifest = (bundle / "README.md").read_text(), read_json(bundle / "manifest.json")
    meta, smoke = manifest["runner_metadata"], manifest["smoke"]
    assert manifest["methods"] == {"forward": meta["seq_length"]} and manifest["tokenizer"] == "tokenizer.model"
    program = Runtime.get().load_program(built["export"] / "twin.pte")
    logits_shape = [1, meta["vocab_size"]]
    assert list(program.metadata("forward").output_tensor_meta(0).sizes()) == logits_shape
    cache, n_kv, hd = meta["cache_size"], meta["n_kv_heads"], meta["head_dim"]
    for said in ("iOS/iPadOS 18, macOS 15 or later", "`CPU_AND_NE` (the CPU and the Neural Engine)",
                 f"swiftpm-{keys.toolchain_versions()['executorch']}", "`backend_coreml`", "-all_load",
                 'Module(filePath:', 'try module.load("forward")', "The tokenizer is `tokenizer.model`",
                 "`run_static_llm_multifunction.py` drives it with `params.json` and the tokenizer",
                 f"`forward` ({meta['seq_length']} tokens per call)", "`tokens` `[1, S]` int32",
                 f"`mask` `[1, S, {cache} + S]`", f"`freqs_cos` and `freqs_sin` `[S, {hd // 2}]`",
                 f"{meta['n_layers']} key caches, then {meta['n_layers']} value caches, each "
                 f"`[1, {n_kv}, {cache}, {hd}]`", "`last_valid_token_pos` `[1]` int64",
                 f"`{logits_shape}`", f"new value rows, `[1, {n_kv}, S, {hd}]` per layer",
                 f"`freqs_cos`, `freqs_sin` `[{meta['max_seq_length']}, {hd // 2}]`, the rotary table",
                 f"`cache_size` = {meta['cache_size']}",
                 f'`dtype` = "{meta["dtype"]}"', f"`eos_ids` = {meta['eos_ids']}",
                 f"on {smoke['eval_positions']} positions", f"top-1 agreement {smoke['eval_top1_agreement']:.3f}",
                 f"mean KL divergence {smoke['eval_mean_kld']:.4f}"):
        assert said in readme, said
    for name in FILES:
        if name not in ("README.md", "manifest.json"):
            assert f"| `{name}` | {manifest['files'][name]['size']:,} |" in readme


def test_the_manifest_and_readme_carry_the_decode_cost(built):
    bundle = built["release"] / NAME
    manifest, readme = read_json(bundle / "manifest.json"), (bundle / "README.md").read_text()
    methods = cost.costs(read_json(built["export"] / "spec.json"))
    assert manifest["decode_cost"] == {"methods": methods, "bound": None}  # no bandwidth known for a Tiny Phone
    forward = methods["forward"]
    assert (f"| `forward` | {forward['tokens_per_call']} | {forward['bytes_per_decoded_token'] / 1e6:.1f} |"
            in readme) and "tokens/s at most" not in readme


def test_the_logits_are_flat_whatever_the_lm_heads_split(built):
    """The manifest no longer states a logits shape: every program returns [1, vocab], its LM head's
    chunks joined in the graph (the tiny export's head is cut in several)."""
    spec = read_json(built["export"] / "spec.json")
    vocab, ane = spec["params"]["vocab_size"], spec["ane"]
    assert rewrites.split_count(vocab, ane["target_split_size"], ane["max_splits"]) > 1
    assert "logits_shape" not in read_json(built["release"] / NAME / "manifest.json")
    program = Runtime.get().load_program(built["export"] / "twin.pte")
    for method in io.methods(ane):
        assert list(program.metadata(method).output_tensor_meta(0).sizes()) == [1, vocab], method


def test_the_bundle_carries_the_exports_lint(inputs, tmp_path):
    export = shutil.copytree(inputs["export"], tmp_path / "export")
    found = {"clean": False, "by_rule": {"rank": 2}, "allowlisted": 3}
    (export / "lint.json").write_text(json.dumps({**found, "findings": 2, "items": []}))
    (export / "lint.md").write_text("# lint\n")
    run_release({**inputs, "export": export}, tmp_path / "release")
    bundle = tmp_path / "release" / NAME
    manifest, readme = read_json(bundle / "manifest.json"), (bundle / "README.md").read_text()
    assert manifest["ane_lint"] == found and (bundle / "lint.md").read_text() == "# lint\n"
    assert "lint.md" in manifest["files"] and "rank (2) (3 allowlisted findings: `lint.md`)" in readme


def test_a_build_without_the_lint_says_so(built):
    bundle = built["release"] / NAME
    assert read_json(bundle / "manifest.json")["ane_lint"] is None and not (bundle / "lint.md").exists()
    assert "The Neural Engine lint was off for this build." in (bundle / "README.md").read_text()


def test_a_chat_models_bundle_ships_its_chat_template_beside_the_tokenizer(tmp_path_factory, tmp_path):
    inputs = {"export": chat_entries(tmp_path_factory)["export"], "smoke": tmp_path / "smoke"}
    run_smoke(chat_entries(tmp_path_factory), inputs["smoke"], chat=True)
    run_release(inputs, tmp_path / "release", tiny_recipe(chat=True))
    bundle = tmp_path / "release" / NAME
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*FILES, "chat_template.jinja", "runner",
                                                               f"{NAME}.tar.gz"])
    assert (bundle / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    manifest, readme = read_json(bundle / "manifest.json"), (bundle / "README.md").read_text()
    assert manifest["chat_template"] == "chat_template.jinja" and "chat_template.jinja" in manifest["files"]
    assert "`chat_template.jinja` is the checkpoint's chat template" in readme and "ane-build run --chat" in readme
    assert verify.verify(bundle) == [] and verify.verify(bundle / f"{NAME}.tar.gz") == []


def test_a_bundle_without_a_chat_template_says_nothing_of_one(built):
    bundle = built["release"] / NAME
    assert read_json(bundle / "manifest.json")["chat_template"] is None
    assert "chat template" not in (bundle / "README.md").read_text()


def test_the_bundle_carries_the_runner_sources_listed_and_archived(built):
    bundle = built["release"] / NAME
    sources = runner_sources.files()
    assert {"CMakeLists.txt", "README.md", "include/ane_runner.h", "include/module.modulemap", "src/kv_ring.cpp",
            "tools/ane_runner_cli.cpp"} <= set(sources)
    assert not [rel for rel in sources if rel.split("/")[0] in ("build", "python") or rel.endswith(".gitignore")]
    copied = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "runner").rglob("*") if p.is_file())
    assert copied == RUNNER
    manifest = read_json(bundle / "manifest.json")
    for rel, source in sources.items():
        assert (bundle / "runner" / rel).read_bytes() == source.read_bytes(), rel
        assert manifest["files"][f"runner/{rel}"] == {"sha256": sha256_file(source), "size": source.stat().st_size}
    with tarfile.open(bundle / f"{NAME}.tar.gz") as tar:
        assert tar.extractfile(f"{NAME}/runner/src/kv_ring.cpp").read() == sources["src/kv_ring.cpp"].read_bytes()
    assert verify.verify(bundle) == [] and verify.verify(bundle / f"{NAME}.tar.gz") == []


@pytest.fixture
def runner_copy(tmp_path, monkeypatch):
    """A copy of runner/ (its build and all) that the test may edit, standing in for the real one."""
    root = shutil.copytree(runner_sources.ROOT, tmp_path / "runner")
    monkeypatch.setattr(runner_sources, "ROOT", root)
    return root


def test_an_edit_to_a_runner_source_changes_the_release_key_alone(runner_copy, write):
    write("ckpt.gguf", "GGUF-bytes")
    rec = recipe.load(write("tiny.yaml", "source: {path: ckpt.gguf}\n"))

    def planned():
        return {name: key for name, (key, _) in pipeline.plan(rec, sha256_file).items()}

    before = planned()
    kv_ring = runner_copy / "src/kv_ring.cpp"
    kv_ring.write_text(kv_ring.read_text() + "\n// an edit\n")
    edited = planned()
    assert {name for name in before if edited[name] != before[name]} == {"release"}
    kv_ring.rename(runner_copy / "src/kv_ring2.cpp")  # the same bytes under another name
    assert planned()["release"] not in (before["release"], edited["release"])
    kv_ring2 = runner_copy / "src/kv_ring2.cpp"
    kv_ring2.rename(kv_ring)
    (runner_copy / "python/notes.txt").write_text("not a source the bundle carries")
    (runner_copy / "build").mkdir(exist_ok=True)
    (runner_copy / "build/CMakeCache.txt").write_text("a host's build")
    assert planned() == edited


def test_a_missing_runner_folder_is_one_clear_error(inputs, runner_copy, tmp_path):
    shutil.rmtree(runner_copy / "src")
    (runner_copy / "CMakeLists.txt").unlink()
    assert runner_sources.sha256() is None  # every stage still plans; the release alone cannot build
    with pytest.raises(UserError) as error:
        run_release(inputs, tmp_path / "out")
    assert str(error.value) == (f"{display_path(runner_copy)}: missing CMakeLists.txt, src/: a release bundle "
                                "carries the native runner's sources, read from runner/ beside the ane_build "
                                "package; install ane-build from a clone of its repository (pip install -e .), "
                                "not from a wheel or sdist")
    assert list((tmp_path / "out").iterdir()) == []
