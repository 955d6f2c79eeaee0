"""Shared test set-up: hypothesis profiles, and this folder on sys.path (``zoo``, ``helpers``,
``model_catalog`` import as plain modules from every test file).

Hypothesis profiles (``HYPOTHESIS_PROFILE=...``):

* ``ci`` (default): derandomized, so a red run reproduces exactly; every failure found is then
  pinned with ``@example`` in its test;
* ``dev``: fresh random examples on every run, the same budgets;
* ``deep``: fresh examples and ten times the budgets, to run by hand before a release:
  ``HYPOTHESIS_PROFILE=deep python -m pytest -q tests -k properties``;
* ``mutation``: the ``ci`` examples without shrinking (benchmarks/mutation.py: a mutant only
  has to make a test fail, and shrinking each failure made most of the run's time).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).parent))

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("dev", **_COMMON)
settings.register_profile("deep", **_COMMON)
# benchmarks/mutation.py: the ci examples, without shrinking a failure (a mutant only needs to fail)
settings.register_profile("mutation", derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
