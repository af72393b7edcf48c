"""Shared fixtures: the repo root on sys.path, the demo checkpoint, and ../shared/data (skipped when absent)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.environ.get("EXPERTWEAVER_DATA", os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def demo_path():
    import model
    return model.demo_checkpoint()


@pytest.fixture(scope="session")
def data_dir():
    if not os.path.isdir(DATA):
        pytest.skip(f"calibration data not found at {DATA} (set EXPERTWEAVER_DATA)")
    return DATA
