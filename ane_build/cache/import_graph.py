"""The code a stage can run, read from the source: the ``ane_build`` modules its module imports,
transitively, and the third-party distributions those modules import.

Static analysis, never a hand-kept list: every ``import`` statement counts, at the top of a
module or inside a function (a lazy import runs too), and a module brings its packages'
``__init__`` files with it. Nothing is imported to find this out, so doit plans without torch.
"""

import ast
import hashlib
import re
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE = "ane_build"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Modules that cannot change what a stage writes, so an edit to them rebuilds nothing. Their own
# imports are not followed either. Each with the reason it cannot.
NO_OUTPUT = {
    "ane_build.util.errors": "the exception for a user's mistake: a stage that raises publishes nothing",
    "ane_build.util.logs": "where a stage's printing goes (console or log file), never what it writes",
    "ane_build.util.memory": "gives a finished stage's freed memory back to the system",
}

# The code every stage runs under, whatever it imports: in every stage's closure (its own imports
# are not followed; pipeline's lazy ones reach each stage's modules, which their keys hold).
HARNESS = {
    "ane_build.pipeline": "hands each stage the recipe slices and inputs it runs on (run_params)",
    "ane_build.cache.store": "publishes each stage's entry and writes its manifest",
}


@lru_cache(maxsize=None)
def modules(root=None):
    """{module name: file} for every module of the package at ``root`` (default: this one)."""
    root = root or PACKAGE_ROOT
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@lru_cache(maxsize=None)
def imports(module, root=None):
    """(the package's modules ``module`` imports, the top-level names of the others it imports)."""
    path = modules(root)[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            # ``from a import b``: b is a submodule or a name in a; whichever exists counts.
            names.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    ours = {name for name in names if name in modules(root)}
    others = {name.split(".")[0] for name in names if name.split(".")[0] != PACKAGE}
    return frozenset(ours), frozenset(others - set(sys.stdlib_module_names) - {"__future__"})


def _absolute(node, package):
    if not node.level:
        return node.module
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def closure(module, root=None):
    """Every package module ``module`` can run, itself and its packages' ``__init__`` included,
    less ``NO_OUTPUT``, plus ``HARNESS``: sorted names."""
    seen, todo = set(HARNESS), [module, *(parent for name in HARNESS for parent in _parents(name))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name in NO_OUTPUT:  # its packages' __init__ still run
            todo.extend(_parents(name))
            continue
        seen.add(name)
        todo.extend(_parents(name))
        todo.extend(imports(name, root)[0])
    return tuple(sorted(seen))


def _parents(name):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@lru_cache(maxsize=None)
def fingerprint(module, root=None):
    """{file relative to the package's parent: sha256 of its bytes} over ``closure(module)``."""
    files = modules(root)
    top = files[PACKAGE].parent.parent
    return {files[name].relative_to(top).as_posix(): hashlib.sha256(files[name].read_bytes()).hexdigest()
            for name in closure(module, root)}


@lru_cache(maxsize=None)
def libraries(module, root=None):
    """{distribution: version} of every third-party distribution ``closure(module)`` imports; an
    import no installed distribution provides (an optional one) is listed under its own name, None."""
    provided_by = _distributions_by_import_name()
    versions = {}
    for top in sorted({top for name in closure(module, root) for top in imports(name, root)[1]}):
        for dist in provided_by.get(top, [None]):
            if dist is None:
                versions[top] = None
            else:
                versions[_normalized(dist)] = metadata.version(dist)
    return versions


@lru_cache(maxsize=None)
def _distributions_by_import_name():
    return metadata.packages_distributions()


def _normalized(dist):
    return re.sub(r"[-_.]+", "-", dist).lower()  # PEP 503: PyYAML and pyyaml are one distribution
