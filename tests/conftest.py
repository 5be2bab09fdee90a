"""Shared fixtures: real MobileSAM weights, real photos, a predictor, and a local image server."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

# Two cores: one torch thread per test process keeps the suite's timing stable beside Label Studio.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """The real, sha256-verified MobileSAM checkpoint (fetched once if missing)."""
    import weights

    return weights.fetch("mobile_sam")


@pytest.fixture(scope="session")
def torch_predictor(mobile_sam_checkpoint):
    """MobileSAM on torch, CPU, real weights."""
    from advanced_sam import TorchSamPredictor

    return TorchSamPredictor.load("vit_t", mobile_sam_checkpoint, "cpu", model_version="MobileSAM-test")
