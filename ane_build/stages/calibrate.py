"""calibrate: canonical checkpoint + recipe ``calibrate:`` -> what each linear's weights matter for.

The fp32 reference reads ``windows`` windows of ``window_tokens`` tokens of the calibration text
(``quant.calibration_text``: Python's language reference less the evaluation text's chapters and
those quoting them, or the recipe's own file), and the entry keeps per linear the Fisher diagonal and the inputs' x^T x
(``statistics.safetensors``) under the checkpoint's names, with ``calibration.json`` saying what
was read and what it cost. Only recipes whose quantizers read it have this stage
(``recipe.needs_calibration``); it reads the checkpoint alone, so every device's recipe of a model
shares one entry. The quantize stage maps the statistics onto the rewritten (split) linears.
"""

import json
import logging
import time
from pathlib import Path

from ane_build.analysis import quality
from ane_build.checkpoint import canonical
from ane_build.model.reference import ReferenceLlama
from ane_build.quant import calibration, calibration_text
from ane_build.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)
REPORT_FILE = "calibration.json"


def run(inputs, params, out_dir):
    """inputs: {"convert": canonical checkpoint dir}; params: the recipe's ``calibrate:`` mapping."""
    ckpt_dir, out_dir = Path(inputs["convert"]), Path(out_dir)
    info = canonical.read_info(ckpt_dir)
    tokenizer = Tokenizer(ckpt_dir / info["tokenizer"])
    windows, digest = calibration_text.calibration_windows(tokenizer.encode, params["windows"],
                                                           params["window_tokens"], path=params.get("text"),
                                                           exclude=quality.held_out_topics())
    started = time.time()
    stats = calibration.statistics(ReferenceLlama.from_checkpoint(ckpt_dir), windows)
    seconds = round(time.time() - started, 1)
    log.info("calibrated %d linears on %d windows of %d tokens in %.1f s", len(stats), len(windows),
             params["window_tokens"], seconds)
    calibration.save(stats, out_dir / calibration.FILE)
    report = {"text": Path(params["text"]).name if params.get("text") else "pydoc_data.topics less the evaluation's",
              "sha256": digest, "windows": len(windows), "window_tokens": params["window_tokens"], "seconds": seconds}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return {"calibration_seconds": seconds, "calibration_tokens": sum(map(len, windows))}
