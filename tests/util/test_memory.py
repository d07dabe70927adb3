import subprocess
import sys

from ane_build.util.memory import release_memory


def test_release_memory_frees_dropped_cycles():
    import gc
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gc.disable()
    try:
        watch = weakref.ref(a)
        del a, b
        release_memory()
        assert watch() is None
    finally:
        gc.enable()


def test_release_memory_imports_nothing():
    code = "import sys; from ane_build.util.memory import release_memory; release_memory(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
