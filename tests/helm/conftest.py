"""Fixtures of the Helm chart tests (chart_helpers.py holds the rendering and schema checks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules import chart_helpers.py by name (pytest's importlib mode adds no test folder).
sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra (make setup installs it)")
