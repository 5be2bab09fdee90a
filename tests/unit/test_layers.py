"""The import directions of DEVELOPERS.md ("Layout") hold.

The packages (sam_backend, tools) are checked by import-linter's contracts in pyproject.toml; the top-level
modules, which import-linter cannot take as root packages, by reading their imports here (every import, also
those inside functions, since a lazy import is an import all the same).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: top-level module -> module prefixes it must never import
FORBIDDEN = {
    "model.py": ("torch", "torchvision", "onnxruntime", "flask", "werkzeug", "advanced_sam", "sam2_predictor",
                 "onnx_sam", "onnx_sam2", "onnx_converter", "sam_backend.sam.loading", "sam_backend.http", "tools", "tests", "_wsgi"),
    "advanced_sam.py": ("sam_backend.labelstudio", "sam_backend.images", "sam_backend.http", "sam_backend.cache",
                        "label_studio_sdk", "flask", "requests", "urllib3", "model", "onnx_sam", "tools", "tests"),
    "sam2_predictor.py": ("sam_backend.labelstudio", "sam_backend.images", "sam_backend.http", "sam_backend.cache",
                          "label_studio_sdk", "flask", "requests", "urllib3", "model", "onnx_sam", "tools", "tests"),
    "onnx_sam.py": ("torch", "torchvision", "segment_anything", "mobile_sam", "sam_backend.labelstudio",
                    "sam_backend.images", "sam_backend.http", "sam_backend.cache", "label_studio_sdk", "flask",
                    "requests", "urllib3", "model", "advanced_sam", "sam2_predictor", "sam2", "tools", "tests"),
    "onnx_sam2.py": ("torch", "torchvision", "sam2", "segment_anything", "mobile_sam", "sam_backend.labelstudio",
                     "sam_backend.images", "sam_backend.http", "sam_backend.cache", "label_studio_sdk", "flask",
                     "requests", "urllib3", "model", "advanced_sam", "sam2_predictor", "tools", "tests"),
    "onnx_converter.py": ("sam_backend.labelstudio", "sam_backend.images", "sam_backend.http", "flask", "model", "tools",
                          "tests"),
    "_wsgi.py": ("torch", "onnxruntime", "advanced_sam", "sam2_predictor", "onnx_sam", "onnx_sam2", "tools", "tests"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, by its full dotted name (`from a import b` counts as a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_modules(ROOT / module)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_top_level_modules_import_only_what_their_layer_may(module):
    assert not _violations(module, FORBIDDEN[module]), f"{module} imports {_violations(module, FORBIDDEN[module])}"


def test_the_check_sees_lazy_imports(tmp_path):
    """The check reads imports inside functions too (how torch would sneak into model.py)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.nn\n    from flask import Flask\n")
    assert imported_modules(probe) >= {"torch.nn", "flask", "flask.Flask"}


def test_package_contracts_hold():
    """import-linter over sam_backend and tools, with the contracts in pyproject.toml."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is not installed (requirements-dev.txt)"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "0 broken" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
