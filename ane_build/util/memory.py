"""Memory a finished step dropped, handed back before the next one starts.

One process runs many stages (doit, ``ane-build export``): without this the next stage
starts on top of what the last one no longer uses.
"""

import contextlib
import ctypes
import gc
import os
import sys


def release_memory():
    """Hand the memory of dropped programs back to the system before the next big step.

    Imports nothing: the caches it clears exist only where their modules were loaded."""
    # Both caches keep graphs lowered (weights and all) alive: ExecuTorch's is_same_node
    # remembers the nodes it compared, fake-tensor dispatch keys hold the delegates they ran.
    utils, fake = (sys.modules.get(name) for name in ("executorch.exir.backend.utils",
                                                      "torch._subclasses.fake_tensor"))
    for clear in (getattr(getattr(utils, "is_same_node", None), "cache_clear", None),
                  getattr(getattr(fake, "FakeTensorMode", None), "cache_clear", None)):
        if clear:
            clear()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed small blocks otherwise


def available_bytes():
    """Memory the system can give now without swapping (Linux's MemAvailable), else its physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
