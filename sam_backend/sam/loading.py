"""Which predictor to serve: the one place that picks `advanced_sam` (torch) or `onnx_sam` (ONNX Runtime).

The predictors live at the top level (the design card names them), so this is the library's one upward import,
and a lazy one: an ONNX-only install never imports torch.
"""
from __future__ import annotations

from pathlib import Path

from sam_backend import catalog
from sam_backend.sam.types import Predictor
from sam_backend.settings import Settings


def load(settings: Settings) -> Predictor:
    """The predictor `settings` ask for, loaded once; raises ModelError on a missing or damaged model.

    Imports torch only for the torch predictor, so an ONNX-only install never needs it.
    """
    if settings.run_onnx_sam:
        from onnx_sam import OnnxSamPredictor

        encoder, decoder = settings.onnx_paths
        version = f"{settings.model_name}-onnx-{_short_digest(decoder)}"
        return OnnxSamPredictor.load(encoder, decoder, model_version=version, threads=settings.ort_threads,
                                     decode_threads=settings.decode_threads, encoder_nice=settings.encoder_nice,
                                     encoder_workers=settings.max_concurrent_embeddings)
    from advanced_sam import TorchSamPredictor

    version = f"{settings.model_name}-{_short_digest(settings.checkpoint)}"
    return TorchSamPredictor.load(settings.model_type, settings.checkpoint, settings.device, model_version=version,
                                  threads=settings.torch_threads, decode_threads=settings.decode_threads,
                                  encoder_nice=settings.encoder_nice,
                                  encoder_workers=settings.max_concurrent_embeddings)


def _short_digest(path: Path) -> str:
    return catalog.sha256_of(Path(path))[:8] if Path(path).is_file() else "missing"
