"""Which predictor to serve: the one place that picks `advanced_sam` (torch SAM / MobileSAM), `sam2_predictor`
(torch SAM 2.1), `onnx_sam` or `onnx_sam2` (ONNX Runtime).

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
    if catalog.is_sam2(settings.model_type):
        if settings.run_onnx_sam:
            from onnx_sam2 import OnnxSam2Predictor

            encoder, decoder = settings.onnx_paths
            version = f"{settings.model_name}-onnx-{_short_digest(decoder)}"
            return OnnxSam2Predictor.load(encoder, decoder, model_version=version, threads=settings.ort_threads)
        from sam2_predictor import Sam2Predictor

        version = f"{settings.model_name}-{_short_digest(settings.checkpoint)}"
        return Sam2Predictor.load(catalog.sam2_size(settings.model_type), settings.checkpoint, settings.device,
                                  model_version=version, threads=settings.torch_threads)
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
