"""Importing polartensor (and its transformers integration) prints none of torchao's known
import noise on a CPU-only torch; other warnings still get through afterwards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from polartensor._quiet import quiet_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_prints_no_torchao_noise():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]))
    code = "import polartensor, polartensor.integrations.transformers"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    for noise in ("ScaleCalculationMode", "Failed to load"):
        assert noise not in res.stderr, res.stderr


def test_quiet_imports_restores_levels_and_warnings():
    lg = logging.getLogger("torchao")
    before = lg.level
    with quiet_imports():
        assert lg.level == logging.ERROR
    assert lg.level == before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("still shown", UserWarning, stacklevel=1)
    assert any("still shown" in str(w.message) for w in seen)
