"""sam.cpu_binding (TORCH_BIND_THREADS=true): torch's OpenMP threads bound to cores, the caller pinned beside them
only for a decode after a rest, and every request thread free to run on every CPU afterwards. Each case is a fresh
process (OpenMP reads its settings once, as torch loads it) decoding a real photo with the real MobileSAM weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT.parent / "shared" / "datasets" / "GrabCut_BSDS20" / "images" / "37073.jpg"

def _cores() -> int:
    from sam_backend.sam import cpu_binding

    return cpu_binding.physical_cores(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0


pytestmark = pytest.mark.skipif(_cores() < 2, reason="binding threads to cores needs Linux and at least 2 cores "
                                                     "(two hyperthreads of one core are one OpenMP place)")

PROBE = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

cpus = sorted(os.sched_getaffinity(0))
from advanced_sam import TorchSamPredictor
from sam_backend.sam import cpu_binding
from sam_backend.sam.types import Prompt

report = {"cpus": cpus, "after_import": sorted(os.sched_getaffinity(0)), "bound": cpu_binding.is_bound(),
          "env_left": [name for name in cpu_binding.BINDING if name in os.environ]}
predictor = TorchSamPredictor.load("vit_t", sys.argv[1], "cpu", threads=2, decode_threads=2)
embedding = predictor.embed(cv2.cvtColor(cv2.imread(sys.argv[2]), cv2.COLOR_BGR2RGB))
prompt = Prompt(np.array([[200.0, 200.0]], np.float32), np.array([1], np.int32))
inside = []
decode_low_res = predictor._decode_low_res
predictor._decode_low_res = lambda e, p: (inside.append(sorted(os.sched_getaffinity(0))), decode_low_res(e, p))[1]

def decode(rest):
    time.sleep(rest)
    low_res, _ = predictor.decode_low_res(embedding, prompt)
    return low_res, sorted(os.sched_getaffinity(0))

def whole_click(rest):
    time.sleep(rest)
    predictor.decode(embedding, prompt)  # the mask's upscaling too
    return sorted(os.sched_getaffinity(0))

with ThreadPoolExecutor(1) as pool:  # a request thread: not the one that imported torch
    answers = [pool.submit(decode, rest).result() for rest in (0.2, 0.2, 0.0)]
    report["after_whole_click"] = pool.submit(whole_click, 0.2).result()
report["inside"] = inside[:3]
report["after"] = [after for _, after in answers]
report["encoder_lane"] = sorted(predictor.lane.run(lambda: os.sched_getaffinity(0)))
np.save(sys.argv[3], answers[-1][0])

def narrow(tid):
    try:
        return len(os.sched_getaffinity(int(tid))) < len(cpus)
    except OSError:  # a thread that ended meanwhile
        return False

report["narrow_threads"] = sum(narrow(tid) for tid in os.listdir("/proc/self/task"))
print(json.dumps(report))
"""


def probe(checkpoint: Path, out: Path, **env: str) -> dict:
    from sam_backend.sam import cpu_binding

    # the test's own settings only: a CI's OpenMP placement (KMP_AFFINITY, ...) would turn the binding off
    environment = {k: v for k, v in os.environ.items() if k not in (*cpu_binding.USER_SETTINGS, cpu_binding.SETTING)}
    environment.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, str(checkpoint), str(PHOTO), str(out)], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_decode_after_a_rest_runs_beside_bound_workers_and_leaves_its_thread_free(mobile_sam_checkpoint, tmp_path):
    bound = probe(mobile_sam_checkpoint, tmp_path / "bound.npy", TORCH_BIND_THREADS="true")
    everything = bound["cpus"]
    assert bound["bound"] is True
    assert bound["after_import"] == everything  # the importing thread got its CPUs back
    assert bound["env_left"] == []  # child processes do not inherit the binding
    assert bound["narrow_threads"] >= 1  # OpenMP's workers, on a core each
    first, rested, back_to_back = bound["inside"]
    assert first == everything  # OpenMP binds the thread as its first team starts; that block learns the core
    assert set(rested) < set(everything)  # pinned after a rest
    assert back_to_back == everything  # straight after another decode: not pinned
    assert bound["after"] == [everything] * 3  # and the request thread is free after every decode
    assert bound["after_whole_click"] == everything and bound["encoder_lane"] == everything

    free = probe(mobile_sam_checkpoint, tmp_path / "free.npy")  # the default
    assert free["bound"] is False
    assert free["inside"] == [everything] * 3 and free["after_whole_click"] == everything
    assert free["narrow_threads"] == 0
    theirs = probe(mobile_sam_checkpoint, tmp_path / "theirs.npy", TORCH_BIND_THREADS="true", OMP_PROC_BIND="false")
    assert theirs["bound"] is False  # the user's own OpenMP setting wins
    # the same threads and the same arithmetic: the same logits
    np.testing.assert_allclose(np.load(tmp_path / "bound.npy"), np.load(tmp_path / "free.npy"), atol=1e-4)
