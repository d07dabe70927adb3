"""doit entry point: every recipe under recipes/ becomes one task per pipeline stage.

    doit                      build the default recipe
    doit list                 every <stage>:<recipe> task
    doit convert:smollm2-135m/iphone15pro

ANE_BUILD_RECIPES / ANE_BUILD_ARTIFACTS override the recipes and artifacts folders; ane-build.toml
here (or ANE_BUILD_CONFIG) and ANE_BUILD_CACHE name a remote cache.
This file imports no torch, so listing tasks stays fast.
"""

import os
import sys
from pathlib import Path

from ane_build import tasks
from ane_build.cache import config
from ane_build.util.errors import UserError

HERE = Path(__file__).resolve().parent
RECIPES = Path(os.environ.get("ANE_BUILD_RECIPES", HERE / "recipes"))
ARTIFACTS = Path(os.environ.get("ANE_BUILD_ARTIFACTS", HERE / "artifacts"))
DEFAULT_RECIPE = os.environ.get("ANE_BUILD_DEFAULT", "smollm2-135m/iphone15pro")
CONFIG = config.default_path(HERE)

DOIT_CONFIG = tasks.doit_config(ARTIFACTS, DEFAULT_RECIPE)


def task_ane_build():
    try:
        yield from tasks.generate(RECIPES, ARTIFACTS, CONFIG)
    except UserError as e:
        sys.exit(f"error: {e}")
