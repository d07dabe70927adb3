"""The package's layout: each module imports only from its own layer or those below, and no two
modules import each other, directly or around a loop. The layers, lowest first, are the map of
README.md's "How it is built"."""

from ane_build.cache import import_graph

LAYERS = (
    ("util",),  # errors, logs, memory, worker processes, how a command ends
    ("cache",),  # stage keys, the store, the remote cache
    ("sources",),  # downloads and the Hugging Face Hub
    ("recipe", "schema"),  # the recipe language
    ("checkpoint",),  # checkpoint formats -> the canonical checkpoint
    ("model",),  # the ANE-friendly Llama and its rewrites
    ("quant", "programs"),  # weight quantization; exported programs and their lowering
    ("runtime",),  # the runner: .pte loading, KV cache, sampling, tokenizer
    ("analysis",),  # Neural Engine rules, lint, decode cost, quality scores
    ("bundle",),  # the release bundle: README, verify
    ("stages",),  # one module per pipeline stage
    ("pipeline", "plans"),  # the stage table, keys chained; every recipe's plan
    ("tasks",),  # doit's tasks
    ("cli",),  # the ane-build commands
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(module):
    """The top-level package or module of ``ane_build`` that ``module`` belongs to."""
    return module.split(".")[1]


def test_every_module_is_in_a_layer():
    assert {_part(m) for m in import_graph.modules() if m != "ane_build"} == set(RANK)


def test_no_module_imports_from_a_higher_layer():
    upward = [(m, target) for m in import_graph.modules() if m != "ane_build"
              for target in import_graph.imports(m)[0] if target != "ane_build"
              and RANK[_part(target)] > RANK[_part(m)]]
    assert not upward


def test_no_import_cycle():
    edges = {m: {t for t in import_graph.imports(m)[0] if t != "ane_build"} for m in import_graph.modules()}
    reaching = {}  # module: every module it reaches

    def reach(module, seen):
        for target in edges[module] - seen:
            seen.add(target)
            reach(target, seen)
        return seen

    for module in edges:
        reaching[module] = reach(module, set())
    assert not [m for m in edges if m in reaching[m]]
