import io
import subprocess
import sys
import time

from ane_build.util import logs

SCRIPT = """
import logging, os
from ane_build.util import logs
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


STAGE = """
import logging, os, sys, warnings
from pathlib import Path
from ane_build.util import logs
with logs.stage_output(Path(sys.argv[1]), "export:tiny/a"):
    print("print from python")
    os.write(1, b"native stdout\\n")
    os.write(2, b"[cpuinfo_utils.cpp:71] native stderr\\n")
    logging.getLogger("ane_build.stages.export").info("lowering")
    logging.getLogger("ane_build.stages.export").warning("our warning")
    for _ in range(2):
        logging.getLogger("coremltools").warning("Torch version 2.13.0 has not been tested")
        logging.getLogger("coremltools").error("Core ML could not convert op")
        warnings.warn("deprecated thing", FutureWarning)
print("after the stage")
"""


def test_a_stage_logs_everything_to_its_file_and_shows_our_warnings_and_library_errors_once(tmp_path):
    log = tmp_path / "logs" / "export.log"
    done = subprocess.run([sys.executable, "-c", STAGE, str(log)], capture_output=True, text=True, check=True)
    assert done.stderr.splitlines() == ["WARNING: our warning", "ERROR: Core ML could not convert op"]
    assert done.stdout == "after the stage\n"  # print() inside the stage went to the log
    text = log.read_text()
    for line in ("print from python", "native stdout", "native stderr", "lowering", "our warning",
                 "has not been tested", "deprecated thing"):
        assert line in text


def test_the_progress_bar_fills_towards_the_last_builds_time():
    bar = logs.ProgressBar.__new__(logs.ProgressBar)
    bar.title, bar.expected = "export:tiny/a", 80.0
    assert bar.line(40.0) == "export:tiny/a  [############............]  40 s of ~80 s"
    assert bar.line(200.0).count("#") == logs.ProgressBar.WIDTH
    bar.expected = None
    assert bar.line(7.4) == "export:tiny/a  7 s"


def test_the_progress_bar_redraws_in_place_and_clears_itself(monkeypatch):
    monkeypatch.setattr(logs.ProgressBar, "DELAY", 0.0)
    console = io.StringIO()
    bar = logs.ProgressBar(console, "smoke:tiny/a", 10.0)
    time.sleep(0.2)
    bar.stop()
    drawn = console.getvalue()
    assert drawn.startswith("\r\033[Ksmoke:tiny/a  [") and drawn.endswith("\r\033[K")
