"""Kernel-test helpers: with POLARTENSOR_FAILLOG=<path>, every failure's report is appended
to that file as soon as it happens (useful when a GPU run is cut off by a time limit)."""

from __future__ import annotations

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("POLARTENSOR_FAILLOG")
    if path and report.failed:
        with open(path, "a") as fh:
            fh.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")

