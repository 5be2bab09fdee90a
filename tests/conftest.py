"""Shared fixtures: real MobileSAM weights, real photos, a predictor, and a local image server
(tools/harness/stub_label_studio.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Two cores: one torch thread per test process keeps the suite's timing stable beside Label Studio.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """The real, sha256-verified MobileSAM checkpoint (fetched once if missing)."""
    from tools import weights

    return weights.fetch("mobile_sam")


@pytest.fixture(scope="session")
def torch_predictor(mobile_sam_checkpoint):
    """MobileSAM on torch, CPU, real weights."""
    from advanced_sam import TorchSamPredictor

    return TorchSamPredictor.load("vit_t", mobile_sam_checkpoint, "cpu", model_version="MobileSAM-test")


# ---- real HTTP on loopback ------------------------------------------------------------------------------
import threading  # noqa: E402
from dataclasses import replace  # noqa: E402

from tools.harness.stub_label_studio import TOKEN as LS_TOKEN, FakeLabelStudio  # noqa: E402


class LiveServer:
    """The backend's WSGI app on a real loopback port (werkzeug, threaded)."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def fake_label_studio():
    """Label Studio's file serving on loopback: GET /data/upload/... with `Token <LS_TOKEN>` only."""
    server = FakeLabelStudio(LS_TOKEN)
    yield server
    server.close()


@pytest.fixture(scope="session")
def base_settings(fake_label_studio, mobile_sam_checkpoint):
    from sam_backend.settings import Settings

    # Refinement and zoom-in off: each answer is then a pure function of its prompt, which the tests recompute.
    return Settings(label_studio_url=fake_label_studio.url, label_studio_api_key=LS_TOKEN,
                    mobilesam_checkpoint=mobile_sam_checkpoint, device="cpu", refine_masks=False,
                    zoom_in=False)


@pytest.fixture(scope="session")
def live_backend(base_settings, torch_predictor):
    """The backend with MobileSAM on torch, over real HTTP, sharing the session's predictor."""
    server = make_live_backend(base_settings, torch_predictor)
    yield server
    server.close()


def make_live_backend(settings, predictor, **changes) -> LiveServer:
    """The app `_wsgi.build_app` would serve, composed here around an already loaded predictor."""
    from model import SamModel
    from sam_backend.http import create_app

    settings = replace(settings, **changes)
    return LiveServer(create_app(SamModel(predictor, settings), settings))


# ---- ONNX models of the real weights --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sam_model(mobile_sam_checkpoint):
    """The torch MobileSAM module (real weights, CPU) that the ONNX files are exported from."""
    import torch

    from advanced_sam import build_sam

    return build_sam("vit_t", mobile_sam_checkpoint, torch.device("cpu"))


def _reusable(paths: tuple[Path, ...], newer_than: list[Path], weights_digest: str, int8: bool) -> bool:
    """True when every file exists, is newer than everything in `newer_than`, and was built from these weights."""
    import onnx_sam

    if not all(path.is_file() for path in paths):
        return False
    oldest = min(path.stat().st_mtime for path in paths)
    if any(oldest <= source.stat().st_mtime for source in newer_than):
        return False
    for path, kind in zip(paths, ("encoder", "decoder")):
        try:
            meta = onnx_sam.metadata(onnx_sam.open_session(path, kind, threads=1))
        except onnx_sam.OnnxModelError:
            return False
        if meta.get(onnx_sam.META_WEIGHTS) != weights_digest or (onnx_sam.META_QUANTIZATION in meta) != int8:
            return False
    return True


@pytest.fixture(scope="session")
def onnx_files(mobile_sam_checkpoint, sam_model, tmp_path_factory) -> tuple[Path, Path]:
    """(encoder, decoder) float32 ONNX files of MobileSAM: models/ when fresh (`make onnx`), else exported for
    this session (about 20 s)."""
    import onnx_converter as oc
    import onnx_sam

    metadata = oc.model_metadata("vit_t", mobile_sam_checkpoint)
    paths = oc.onnx_paths(ROOT / "models", "vit_t")
    sources = [mobile_sam_checkpoint, ROOT / "onnx_converter.py", ROOT / "advanced_sam.py"]
    if _reusable(paths, sources, metadata[onnx_sam.META_WEIGHTS], int8=False):
        print(f"\nreusing {paths[0]} and {paths[1]}")
        return paths
    encoder, decoder = oc.onnx_paths(tmp_path_factory.mktemp("onnx"), "vit_t")
    oc.export_decoder(sam_model, decoder, metadata=metadata)
    oc.export_encoder(sam_model, encoder, metadata=metadata)
    print(f"\nexported {encoder} and {decoder}")
    return encoder, decoder


@pytest.fixture(scope="session")
def int8_files(onnx_files, tmp_path_factory) -> tuple[Path, Path]:
    """(encoder, decoder) int8 files: next to the float32 ones when fresh, else quantized for this session."""
    import onnx_converter as oc
    import onnx_sam

    paths = oc.onnx_paths(onnx_files[0].parent, "vit_t", int8=True)
    digest = onnx_sam.metadata(onnx_sam.open_session(onnx_files[1], "decoder", 1))[onnx_sam.META_WEIGHTS]
    sources = [*onnx_files, ROOT / "onnx_converter.py"]
    if _reusable(paths, sources, digest, int8=True):
        return paths
    folder = tmp_path_factory.mktemp("int8")
    return tuple(oc.quantize(source, target) for source, target in
                 zip(onnx_files, oc.onnx_paths(folder, "vit_t", int8=True)))


@pytest.fixture(scope="session")
def onnx_server_predictor(onnx_files):
    """MobileSAM on ONNX Runtime as the server loads it with RUN_ONNX_SAM=true."""
    from onnx_sam import OnnxSamPredictor

    return OnnxSamPredictor.load(*onnx_files, model_version="MobileSAM-onnx-test", threads=2)


# ---- markers by folder: tests/unit is the inner loop (`pytest tests/unit` or `pytest -m "not slow"`) -----------
_FOLDER_MARKERS = {"model": ("weights", "slow"), "service": ("weights", "slow"), "e2e": ("labelstudio", "slow")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        for name in _FOLDER_MARKERS.get(folder, ()):
            item.add_marker(name)
        if folder == "e2e" and "browser" in Path(str(item.fspath)).name:
            item.add_marker("browser")
