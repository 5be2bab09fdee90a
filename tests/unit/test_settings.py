"""Settings from the environment and from the seeds' `--with key=value` options."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sam_backend import settings
from sam_backend.settings import Settings, from_environment, with_options

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_serve_mobilesam_on_the_best_device():
    config = from_environment({})
    assert config.model_name == "MobileSAM" and config.model_type == "vit_t"
    assert config.checkpoint.name == "mobile_sam.pt" and config.device == "auto"
    assert not config.run_onnx_sam


def test_seed_environment_variables():
    config = from_environment({"SAM_CHOICE": "SAM", "VITH_CHECKPOINT": "/w/h.pth", "RUN_ONNX_SAM": "True"})
    assert config.model_name == "SAM-vit_h" and str(config.checkpoint) == "/w/h.pth" and config.run_onnx_sam
    assert config.onnx_paths[1].name == "vit_h.decoder.onnx"


@pytest.mark.parametrize("variable,value,message", [
    ("SAM_CHOICE", "GigaSAM", "SAM_CHOICE"),
    ("SAM_MODEL_TYPE", "vit_x", "SAM_MODEL_TYPE"),
    ("EMBEDDING_CACHE_SIZE", "many", "EMBEDDING_CACHE_SIZE"),
    ("RUN_ONNX_SAM", "perhaps", "RUN_ONNX_SAM"),
    ("BASIC_AUTH_USER", "alice", "BASIC_AUTH_PASS"),
])
def test_bad_values_are_named(variable, value, message):
    environ = {"SAM_CHOICE": "SAM"} if variable == "SAM_MODEL_TYPE" else {}
    with pytest.raises(ValueError, match=message):
        from_environment({**environ, variable: value})


def test_with_options_of_the_openmmlab_seed():
    config = with_options(Settings(), {"sam_config": "vit_b", "sam_checkpoint_file": "./sam_vit_b_01ec64.pth",
                                       "device": "cpu", "out_poly": "True", "out_bbox": "false"})
    assert config.model_name == "SAM-vit_b" and config.checkpoint == Path("sam_vit_b_01ec64.pth")
    assert config.device == "cpu" and config.out_poly and not config.out_bbox
    assert with_options(config, {"sam_config": "vit_t"}).model_name == "MobileSAM"
    with pytest.raises(ValueError, match="unknown --with option"):
        with_options(Settings(), {"sam_configg": "vit_b"})


def test_every_setting_has_an_environment_variable():
    fields = {f for f in Settings.__dataclass_fields__}
    assert set(settings.ENVIRONMENT.values()) == fields


def test_wsgi_cli_rejects_bad_options_before_loading_anything():
    answer = subprocess.run([sys.executable, "_wsgi.py", "--with", "sam_config=vit_q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2 and "SAM_MODEL_TYPE='vit_q'" in answer.stderr
    answer = subprocess.run([sys.executable, "_wsgi.py", "--with", "nokey"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 2 and "is not key=value" in answer.stderr


def test_sam2_choice_and_sizes():
    from sam_backend import catalog

    default = settings.from_environment({"SAM_CHOICE": "SAM2"})
    assert default.model_type == "sam2.1_tiny" and default.model_name == "SAM2.1-tiny"
    assert default.checkpoint == catalog.MODELS_DIR / "sam2.1_hiera_tiny.pt"
    large = settings.from_environment({"SAM_CHOICE": "sam2", "SAM2_SIZE": "large", "DEVICE": "cuda:1"})
    assert large.model_type == "sam2.1_large" and large.device == "cuda:1"
    assert catalog.CHECKPOINTS["sam2.1_base_plus"].url.endswith("/092824/sam2.1_hiera_base_plus.pt")
    with pytest.raises(ValueError, match="SAM2_SIZE='huge': use tiny, small, base_plus, large"):
        settings.from_environment({"SAM_CHOICE": "SAM2", "SAM2_SIZE": "huge"})


def test_sam2_checkpoints_without_a_checksum_must_be_complete_archives(tmp_path):
    import zipfile

    from sam_backend import catalog
    from sam_backend.errors import ChecksumError

    checkpoint = catalog.BY_NAME["sam2.1_small"]
    whole = tmp_path / "whole.pt"
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 1000)
    catalog.verify(whole, checkpoint)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:600])
    with pytest.raises(ChecksumError, match="not a complete PyTorch archive"):
        catalog.verify(cut, checkpoint)


def test_sam2_on_onnx_names_its_files_and_the_export_command(tmp_path):
    from sam_backend.errors import OnnxModelError
    from sam_backend.sam import loading

    chosen = Settings(sam_choice="SAM2", sam2_size="small", run_onnx_sam=True, onnx_encoder=tmp_path / "none.onnx")
    assert chosen.onnx_paths[1].name == "sam2.1_small.decoder.onnx"
    with pytest.raises(OnnxModelError, match="none.onnx does not exist; write it with `python onnx_converter.py"):
        loading.load(chosen)
