"""Each Neural Engine rule on a tiny Core ML program built to break it, and on one as close as can be
without breaking it (tests/mil_programs.py); the allowlist; the rule table itself."""

import os

import pytest

from ane_build.analysis import ane_rules
from ane_build.programs import coreml_program
from tests import mil_programs

# rule -> (program breaking it, the op type and detail of its first finding, a program that does not)
CASES = {
    "rank": ("rank5", "reshape", "rank 5: [2, 3, 4, 2, 32]", "rank4"),
    "fp32": ("fp32_softmax", "input", "float32 [4, 64]", "fp16_softmax"),
    "int-arithmetic": ("int_positions", "add", "int32 output", "const_ints"),
    "dynamic-shape": ("open_dim", "input", "open dimension: [1, ?]", "static_dim"),
    "dynamic-slice": ("runtime_slice", "slice_by_size", "begin computed at run time", "const_slice"),
    "axis-65536": ("wide_70000", "input", "axis 1 is 70000 in [1, 70000]", "channels_65536"),
    "axis-16384": ("wide_16385", "input", "axis 1 is 16385 in [1, 16385]", "wide_16384"),
    "gather": ("row_gather", "gather", "from [8, 64] at run-time indices", "const_gather"),
    "scatter": ("scatter", "scatter", "scatter", "slice_update"),
    "sort": ("topk", "topk", "topk", "reduce_max"),
    "rnn": ("lstm", "lstm", "lstm", "linear"),
    "cpu-op": ("cumsum", "cumsum", "cumsum", "reduce_sum"),
    "state": ("state", "input", "a state input", "cache_io"),
    "fused-attention": ("sdpa", "scaled_dot_product_attention", "scaled_dot_product_attention", "attention"),
    "last-axis": ("row_48", "input", "last axis 48 x 2 bytes = 96 bytes in [1, 48]", "static_dim"),
    "blockwise-scales": ("per_block_scales", "constexpr_blockwise_shift_scale", "scales [64, 2] for weights [64, 64]",
                         "per_channel_scales"),
    "palette-bits": ("palette_3bit", "constexpr_lut_to_dense", "a palette of 8 entries", "palette_4bit"),
}
# Programs that break nothing but come close to one rule while breaking another (which is not asserted on).
NEAR_MISSES_OF_ONE_RULE = {"last-axis": "row_32_fp32", "axis-16384": "wide_70000"}


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    """findings(program name) -> its Findings; each program is built once per module."""
    folder, done = tmp_path_factory.mktemp("mil"), {}

    def get(name):
        if name not in done:
            done[name] = lint_package(mil_programs.save(name, folder))
        return done[name]
    return get


def lint_package(path):
    return ane_rules.lint_program(coreml_program.read(path))


@pytest.mark.parametrize("rule", CASES)
def test_a_program_breaking_the_rule_is_flagged(findings, rule):
    breaking, op, detail, _ = CASES[rule]
    flagged = [f for f in findings(breaking) if f.rule == rule]
    assert flagged and not any(f.allowed for f in flagged)
    assert (flagged[0].op, flagged[0].detail) == (op, detail)
    assert flagged[0].function == "main" and flagged[0].tensors


@pytest.mark.parametrize("rule", CASES)
def test_a_program_short_of_breaking_the_rule_is_clean(findings, rule):
    assert findings(CASES[rule][3]) == []


@pytest.mark.parametrize("rule", NEAR_MISSES_OF_ONE_RULE)
def test_near_misses_of_one_rule(findings, rule):
    program = NEAR_MISSES_OF_ONE_RULE[rule]
    assert findings(program) and not [f for f in findings(program) if f.rule == rule]


def test_every_op_of_a_rule_is_flagged_with_its_tensors(findings):
    rank = [(f.op, [t.shape for t in f.tensors]) for f in findings("rank5") if f.rule == "rank"]
    assert rank == [("reshape", [(2, 3, 4, 2, 32)]), ("relu", [(2, 3, 4, 2, 32)])]
    fp32 = {f.op for f in findings("fp32_softmax") if f.rule == "fp32"}
    assert "softmax" in fp32 and "add" not in fp32  # the fp16 pass kept only the softmax in fp32


def test_an_embedding_lookup_and_its_index_arithmetic_are_allowlisted(findings):
    found = findings("embedding")
    assert {f.rule for f in found} == {"gather", "int-arithmetic"}
    assert all(f.allowed == "input-lookups" for f in found)
    assert [f.detail for f in found if f.rule == "gather"] == ["from [512, 64] at run-time indices"]


def test_a_gather_from_an_activation_is_not_allowlisted(findings):
    found = findings("row_gather")
    assert {f.rule for f in found} == {"gather", "int-arithmetic"} and not any(f.allowed for f in found)


def test_the_logits_row_of_the_calling_convention_is_allowed_past_65536(findings):
    found = findings("logits_70016")
    assert {f.rule for f in found} == {"axis-65536"}
    assert all(f.allowed == "upstream-convention" for f in found)
    # The same row where no function takes the convention's mask is anybody's tensor: flagged.
    assert not any(f.allowed for f in findings("wide_70000"))


def test_weights_over_1gb_in_one_model(findings, tmp_path):
    package = mil_programs.save("linear", tmp_path)
    assert lint_package(package) == []
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    # Past the weights the program reads, sparse: the size the device would load, without the disk.
    os.truncate(weights, ane_rules.MAX_WEIGHT_BYTES + 1)
    (found,) = lint_package(package)
    assert (found.rule, found.op, found.function, found.allowed) == ("weights-1gb", "model", None, None)
    assert found.detail == "1.00 GB of weights"


def test_the_rule_table():
    assert len({r.id for r in ane_rules.RULES}) == len(ane_rules.RULES)
    for rule in ane_rules.RULES:
        assert rule.reason and "\n" not in rule.reason and rule.sources, rule.id
        assert rule.evidence in (ane_rules.DOCUMENTED, ane_rules.COMMUNITY), rule.id
        assert rule.severity in ("reject", "fallback", "slow", "numerics", "check"), rule.id
    # Every rule checked on the program is tested above; the other two look at the model or ask Core ML.
    assert set(ane_rules.CHECKS) == set(CASES)
    assert set(ane_rules.BY_ID) - set(CASES) == {"weights-1gb", "planned-off-ane"}
