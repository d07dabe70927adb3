"""bundle_readme: the README is a function of the manifest as written, whatever order it was built in."""

import json
import re

import pytest

from ane_build.bundle import readme as bundle_readme
from ane_build.bundle import runner_sources
from tests.stages.tiny_export import bundle


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return json.loads((bundle(tmp_path_factory) / "manifest.json").read_text())


def test_a_manifest_read_back_sorted_renders_the_same_readme(manifest):
    """release writes the manifest with sorted keys; verify renders the README from that."""
    two_methods = {**manifest, "methods": {"prefill": 8, "forward": 1},
                   "runner_metadata": dict(reversed(manifest["runner_metadata"].items()))}
    decode_cost = manifest["decode_cost"]["methods"]["forward"]
    two_methods["decode_cost"] = {"methods": {"prefill": decode_cost, "forward": decode_cost}, "bound": None}
    read_back = json.loads(json.dumps(two_methods, sort_keys=True))
    assert list(read_back["methods"]) != list(two_methods["methods"])
    assert bundle_readme.render(read_back) == bundle_readme.render(two_methods)


def test_the_readme_verify_checks_is_the_one_release_wrote(manifest, tmp_path_factory):
    assert (bundle(tmp_path_factory) / "README.md").read_text() == bundle_readme.render(manifest)


def run_it(readme):
    """The README's "Run it" section, and the Swift code in it."""
    section = readme.split("\n## Run it\n", 1)[1].split("\n## ", 1)[0]
    return section, section.split("```swift\n", 1)[1].split("```", 1)[0]


def header():
    """{function: its parameter count}, {enum constant}, {struct: [its fields]} of runner/include/ane_runner.h."""
    text = (runner_sources.ROOT / "include/ane_runner.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    functions = {name: len([p for p in params.split(",") if p.strip() not in ("", "void")])
                 for name, params in re.findall(r"ANE_RUNNER_API[^;(]*?\b(ane_runner_\w+)\(([^)]*)\);", text, re.S)}
    constants = set(re.findall(r"^\s*(ANE_RUNNER_[A-Z_]+)\s*=", text, re.M))
    structs = {name: re.findall(r"\b(\w+);", body)
               for body, name in re.findall(r"typedef struct \w+ \{(.*?)\} (\w+);", text, re.S)}
    return functions, constants, structs


def calls(swift):
    """[(C function, its argument count)] of each call in ``swift``."""
    found = []
    for match in re.finditer(r"\b(ane_runner_\w+)\(", swift):
        depth, args, i = 1, 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(swift[i], 0)
            args += swift[i] == "," and depth == 1
            i += 1
        found.append((match[1], args if swift[match.end():i - 1].strip() else 0))
    return found


def test_the_readme_says_how_to_run_the_bundle_with_its_runner(manifest, tmp_path_factory):
    section, swift = run_it((bundle(tmp_path_factory) / "README.md").read_text())
    executorch = manifest["toolchain"]["executorch"]
    for said in (f"branch `swiftpm-{executorch}`", "`executorch` and `backend_coreml`", "`-all_load`",
                 "`-force_load`", "-DANE_RUNNER_COREML=ON", "`runner/src` and `runner/include`", "import ANERunner",
                 f"`promptIds` is the prompt encoded with `{manifest['tokenizer']}`",
                 "This loop cannot be compiled or run on Linux", "Mac job builds `runner/`"):
        assert said in section, said
    assert f"let stopIds: [Int32] = {json.dumps(manifest['runner_metadata']['eos_ids'])}" in swift
    assert 'Bundle.main.path(forResource: "model", ofType: "pte")' in swift


def test_the_swift_loop_calls_the_c_abi_as_the_header_declares_it(tmp_path_factory):
    _, swift = run_it((bundle(tmp_path_factory) / "README.md").read_text())
    functions, constants, structs = header()
    called = [(name, n_args) for name, n_args in calls(swift) if name not in structs]  # not its initializer
    assert {name for name, _ in called} == {"ane_runner_open", "ane_runner_last_error", "ane_runner_close",
                                            "ane_runner_set_stop_ids", "ane_runner_set_sampling",
                                            "ane_runner_prefill", "ane_runner_next"}
    for name, n_args in called:
        assert functions[name] == n_args, name
    assert set(re.findall(r"\bANE_RUNNER_\w+", swift)) == {"ANE_RUNNER_OK", "ANE_RUNNER_STOPPED",
                                                          "ANE_RUNNER_CONTEXT_FULL"} <= constants
    # C structs come to Swift with a memberwise initializer, its labels the fields in order.
    labels = re.findall(r"ane_runner_sampling\(((?:\w+: [^,)]+(?:, )?)+)\)", swift)
    assert [label.split(":")[0] for label in labels[0].split(", ")] == structs["ane_runner_sampling"]
    assert "ane_runner_status" in (runner_sources.ROOT / "include/ane_runner.h").read_text()
    # Every other ane_runner name it uses is the header's too (the status type, the module).
    assert set(re.findall(r"\bane_runner_\w+", swift)) - set(functions) == {"ane_runner_sampling", "ane_runner_status"}


def test_a_bundle_from_before_the_runner_says_nothing_of_it(manifest):
    old = {**manifest, "files": {name: f for name, f in manifest["files"].items() if not name.startswith("runner/")}}
    readme = bundle_readme.render(old)
    assert "## Run it" not in readme and "| `runner/` |" not in readme
    assert "| `runner/` |" in bundle_readme.render(manifest)
