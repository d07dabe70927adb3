import subprocess
import sys

SCRIPT = """
import logging, os
from ane_build import logs
logs.show_progress()
ours, theirs = logging.getLogger("ane_build.stages.export"), logging.getLogger("coremltools")
for i in range(3):
    ours.info("lowering %d", i)
    theirs.info("Removing op %d", i)
    theirs.warning("Core ML ignores output_dtype")
theirs.warning("another notice")
print(os.environ["TQDM_DISABLE"])
"""


def test_our_progress_shows_and_other_libraries_warn_once_each():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert done.stderr.splitlines() == ["lowering 0", "Core ML ignores output_dtype", "lowering 1", "lowering 2",
                                        "another notice"]
    assert done.stdout.strip() == "1"  # no progress bars from tqdm
