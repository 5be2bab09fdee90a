"""The numbers in words: statistics of samples, the machine they were taken on, each target of issue #5
met or missed (`evaluate`), and the tables (`report`)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.plan import (RECORDED_ENV, ROOT, TARGET_EMBED_INT8_S, TARGET_EMBED_ONNX_S, TARGET_P95_8_USERS_MS,
                              TARGET_PREWARM_OVER_WARM, TARGET_RSS_ONNX_MB, TARGET_WARM_ONNX_MS, TARGET_WARM_OVER_BARE,
                              TARGET_WARM_OVER_REFERENCE)


# ---- statistics and machine ---------------------------------------------------------------------------------------
def summary(samples_ms: list[float]) -> dict[str, float | int | None]:
    """n, median, p95, min and max of samples in milliseconds (None for an empty list)."""
    if not samples_ms:
        return {"n": 0, "p50": None, "p95": None, "min": None, "max": None}
    values = np.asarray(samples_ms, dtype=float)
    return {"n": int(values.size), "p50": round(float(np.median(values)), 2),
            "p95": round(float(np.percentile(values, 95)), 2), "min": round(float(values.min()), 2),
            "max": round(float(values.max()), 2)}


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(part.split("=") for part in line.split()[1:])["avg60"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


#: the CPU flags that change which kernels torch and ONNX Runtime run (int8 and float alike)
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                "neon", "asimd")


def vector_extensions() -> list[str]:
    """The VECTOR_FLAGS this machine's CPU has (from /proc/cpuinfo), e.g. ["avx2", "fma", "avx512f"]."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value and not value.isdigit():
                    cpu_model = value
                    break
    except OSError:
        pass
    memory = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                memory[key] = round(int(value.split()[0]) / 1024)
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for name in ("numpy", "torch", "onnxruntime", "opencv-python-headless", "gunicorn", "flask"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed (an ONNX-only install has no torch)
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_model": cpu_model, "cpu_vector_extensions": vector_extensions(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_mb": memory, "loadavg_start": load(),
            "cpu_pressure_avg60_start": cpu_pressure(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "commit": commit,
            "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ}}


# ---- report ---------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def evaluate(results: dict) -> list[dict]:
    """Each target of issues #5 and #16: measured value, limit, met or missed and by how much."""
    targets = []

    def add(name: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            return
        targets.append({"target": name, "value": round(value, 3), "limit": limit, "unit": unit,
                        "met": value <= limit, "excess": round(value - limit, 3),
                        "ratio_to_limit": round(value / limit, 2) if limit else None})

    for mode, run in results["modes"].items():
        if "http" not in run:
            continue
        http, local = run["http"], run["in_process"]
        main = results["main_size"]
        warm = http["warm_ms"].get(main, {}).get("p50")
        bare = local["sizes"].get(main, {}).get("bare", {}).get("p50")
        if warm and bare:
            add(f"{mode}: warm click {main} p50 / bare decoder p50", warm / bare, TARGET_WARM_OVER_BARE, "x")
        reference = local["sizes"].get(main, {}).get("reference", {}).get("p50")
        if warm and reference:
            add(f"{mode}: warm click {main} p50 / SamPredictor.predict p50", warm / reference,
                TARGET_WARM_OVER_REFERENCE, "x")
        if mode.startswith("onnx"):
            add(f"{mode}: warm click {main} p50", warm, TARGET_WARM_ONNX_MS, "ms")
        prewarmed = http["prewarmed_first_click_ms"]["p50"]
        if warm and prewarmed:
            add(f"{mode}: prewarmed first click p50 / warm click p50", prewarmed / warm, TARGET_PREWARM_OVER_WARM, "x")
        embed = local["sizes"].get(main, {}).get("embed_ms", {}).get("p50")
        if mode == "onnx" and embed:
            add("onnx: embedding (in-process)", embed / 1000, TARGET_EMBED_ONNX_S, "s")
        if mode == "onnx-int8" and embed:
            add("onnx-int8: embedding (in-process)", embed / 1000, TARGET_EMBED_INT8_S, "s")
        if mode.startswith("onnx"):
            most = max(http["rss_cached_mb"], key=int, default=None)
            if most is not None:
                add(f"{mode}: RSS with {http['rss_cached_mb'][most]['cached_images']} cached images",
                    http["rss_cached_mb"][most]["VmRSS"], TARGET_RSS_ONNX_MB, "MiB")
        users = max(http["concurrent_ms"], key=int)
        add(f"{mode}: {users} concurrent users warm p95", http["concurrent_ms"][users]["p95"],
            TARGET_P95_8_USERS_MS, "ms")
    return targets


def report(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    main = results["main_size"]
    add(f"Machine: {m['cpu_model']} ({', '.join(m.get('cpu_vector_extensions') or []) or 'no AVX2'}), {m['cpus_usable']}/{m['cpus']} CPUs, {m['memory_mb'].get('MemTotal', '?')} MiB;"
        f" load {m['loadavg_start']} at start, {results['loadavg_end']} at end (CPU pressure avg60"
        f" {fmt(m['cpu_pressure_avg60_start'])}% / {fmt(results['cpu_pressure_avg60_end'])}%); commit {m['commit']};"
        f" {'QUICK' if results['quick'] else 'full'} run in {results['duration_s']:.0f} s")
    env = {**m["env"], **results["extra_env"]}
    add(f"Server: gunicorn -c gunicorn.conf.py {results['app']}, WORKERS=1 THREADS=8, {env or 'default settings'}")
    modes = [mode for mode, run in results["modes"].items() if "http" in run]
    for mode, run in results["modes"].items():
        if "skipped" in run:
            add(f"{mode}: skipped ({run['skipped']})")
    add("")
    add("Warm one-click /predict over HTTP (ms) vs the bare predictor.decode of the same prompts in-process;"
        " CPU: the worker's CPU ms per click (/proc) vs the bare decode's")
    add(f"{'mode':<10} {'size':<10} {'warm p50':>8} {'p95':>7} {'bare p50':>8} {'ratio':>6} {'target':>20}"
        f" {'CPU srv':>7} {'bare':>6} {'ratio':>5} {'GETs':>4}  load / CPU pressure")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            warm, bare = http["warm_ms"][size], local["sizes"][size]["bare"]
            ratio = warm["p50"] / bare["p50"] if bare["p50"] else None
            cpu_server, cpu_bare = http["server_cpu_ms_per_warm_click"][size], local["sizes"][size]["bare_cpu"]["p50"]
            target = ""
            if size == main:
                target = f"<= {TARGET_WARM_OVER_BARE}x" + (f", {TARGET_WARM_ONNX_MS:.0f} ms" if mode != "torch" else "")
            add(f"{mode:<10} {size:<10} {fmt(warm['p50']):>8} {fmt(warm['p95']):>7} {fmt(bare['p50']):>8}"
                f" {fmt(ratio, 2):>6} {target:>20} {fmt(cpu_server):>7} {fmt(cpu_bare):>6}"
                f" {fmt(cpu_server / cpu_bare if cpu_bare else None, 2):>5}"
                f" {fmt(http['downloads_per_warm_click'][size], 1):>4}"
                f"  {http['loadavg_before'][0]} / {fmt(http['cpu_pressure_avg60_before'])}%")
    add("  (GETs: image downloads from Label Studio per warm click)")
    for mode in modes:
        local = results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            reference = local["sizes"][size].get("reference", {}).get("p50")
            warm = results["modes"][mode]["http"]["warm_ms"][size]["p50"]
            if reference and warm:
                add(f"{mode}: warm click {size} over HTTP {fmt(warm)} ms vs the model's own SamPredictor.predict "
                    f"(multimask, default threads, in-process) {fmt(reference)} ms: {fmt(warm / reference, 2)}x"
                    + (f" (target <= {TARGET_WARM_OVER_REFERENCE}x)" if size == main else ""))
    add("")
    add("Breakdown of a warm click (ms). In-process medians of the same prompts, each taken between two HTTP"
        " clicks: bare decode (the first after a pause, as the server's), of which decoder and mask upscaling"
        " (each run right after another decode), rle.encode, JSON of the answer, image download from Label Studio"
        " and its sha256. app: the server's own mean time per warm click (/metrics, Flask before_request to"
        " after_request); rest = app - bare - rle - json - fetch - sha256 (parsing, prompts, memory, Flask);"
        " outside = HTTP p50 - app (gunicorn, sockets, client)")
    add(f"{'mode':<10} {'size':<10} {'bare':>6} {'decoder':>7} {'upscale':>7} {'rle':>5} {'json':>5} {'fetch':>5}"
        f" {'sha256':>6} {'app':>6} {'rest':>5} {'HTTP':>6} {'outside':>7} {'answer KB':>9}")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            s = local["sizes"][size]
            parts = [s["bare"]["p50"], s["decoder"]["p50"], s["upscale"]["p50"], s["rle"]["p50"], s["json"]["p50"],
                     s["fetch_ms"], s["sha256_ms"]]
            spent = parts[0] + sum(parts[3:])
            app = http["app_ms_per_warm_click"][size]
            warm = http["warm_ms"][size]["p50"]
            add(f"{mode:<10} {size:<10} " + " ".join(f"{fmt(p):>{w}}" for p, w in zip(parts, (6, 7, 7, 5, 5, 5, 6)))
                + f" {fmt(app):>6} {fmt(app - spent):>5} {fmt(warm):>6} {fmt(warm - app):>7}"
                  f" {s['answer_bytes'] / 1024:>9.1f}")
    add("")
    for mode in modes:
        s = results["modes"][mode]["in_process"]["sizes"][main]
        if "bare_fp32_features" in s:
            add(f"{mode}: bare decode {main} from the cached float16 features p50 {fmt(s['bare']['p50'])} ms,"
                f" from the same values as float32 {fmt(s['bare_fp32_features']['p50'])} ms (each after a pause)")
    add("")
    add("Cold first click on a new image over HTTP (ms) and its parts in-process (ms)")
    add(f"{'mode':<10} {'size':<10} {'n':>3} {'cold p50':>8} {'max':>7} {'fetch':>6} {'decode':>6} {'embed':>7}"
        f" {'bare':>6} {'parts':>7}")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            c, s = http["cold_ms"][size], local["sizes"][size]
            parts = [s["fetch_ms"] + s["sha256_ms"], s["image_decode_ms"], s["embed_ms"]["p50"],
                     s["bare"]["p50"]]
            add(f"{mode:<10} {size:<10} {c['n']:>3} {fmt(c['p50']):>8} {fmt(c['max']):>7} {fmt(parts[0]):>6}"
                f" {fmt(parts[1]):>6} {fmt(parts[2]):>7} {fmt(parts[3]):>6} {fmt(sum(parts)):>7}")
    add("")
    delay = results["modes"][modes[0]]["http"]["prewarm_delay_s"] if modes else "?"
    add(f"First click on a task opened {delay} s earlier (context-less /predict), {main} (ms)")
    add(f"{'mode':<10} {'n':>3} {'open p50':>8} {'click p50':>9} {'max':>7} {'warm p50':>8} {'ratio':>6}"
        f" {'target':>8}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        p, w = http["prewarmed_first_click_ms"], http["warm_ms"][main]["p50"]
        add(f"{mode:<10} {p['n']:>3} {fmt(http['open_task_ms']['p50']):>8} {fmt(p['p50']):>9} {fmt(p['max']):>7}"
            f" {fmt(w):>8} {fmt(p['p50'] / w if w else None, 2):>6} {'<= ' + str(TARGET_PREWARM_OVER_WARM) + 'x':>8}")
    add("")
    add(f"Image embedding in-process, {main} (ms; preprocessing included)")
    add(f"{'mode':<10} {'n':>3} {'p50':>7} {'min':>7} {'preproc':>7} {'target':>8}")
    for mode, run in results["modes"].items():
        if "in_process" not in run:
            continue
        s = run["in_process"]["sizes"][main]
        target = {"onnx": f"<= {TARGET_EMBED_ONNX_S * 1000:.0f}", "onnx-int8": f"<= {TARGET_EMBED_INT8_S * 1000:.0f}"}
        add(f"{mode:<10} {s['embed_ms']['n']:>3} {fmt(s['embed_ms']['p50']):>7} {fmt(s['embed_ms']['min']):>7}"
            f" {fmt(s['preprocess_ms']):>7} {target.get(mode, ''):>8}")
    rle_cmp = results.get("rle")
    if rle_cmp and rle_cmp["masks"]:
        add("")
        add(f"RLE of real {main} SAM masks: rle.encode vs label_studio_sdk mask2rle")
        for row in rle_cmp["masks"]:
            add(f"  coverage {row['coverage']:.3f}, {row['rle_bytes']} bytes: rle.encode {row['rle_encode_ms']} ms,"
                f" mask2rle {row['sdk_mask2rle_ms']} ms ({row['sdk_mask2rle_ms'] / max(row['rle_encode_ms'], 1e-3):.0f}x),"
                f" identical: {row['identical']}")
    add("")
    add("Worker RSS (MiB; VmRSS / peak VmHWM)")
    checkpoints = sorted({c for mode in modes for c in results["modes"][mode]["http"]["rss_cached_mb"]}, key=int)
    add(f"{'mode':<10} {'start-up':>9} " + " ".join(f"{c + ' imgs':>15}" for c in checkpoints)
        + f" {'end':>15} {'target':>15}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        cells = [f"{http['rss_cached_mb'][c]['VmRSS']:.0f}/{http['rss_cached_mb'][c]['VmHWM']:.0f}"
                 if c in http["rss_cached_mb"] else "-" for c in checkpoints]
        end = f"{http['rss_end_mb']['VmRSS']:.0f}/{http['rss_end_mb']['VmHWM']:.0f}"
        target = f"<= {TARGET_RSS_ONNX_MB:.0f} at 32" if mode != "torch" else ""
        add(f"{mode:<10} {http['rss_startup_mb']['VmRSS']:>9.0f} " + " ".join(f"{c:>15}" for c in cells)
            + f" {end:>15} {target:>15}")
    add("")
    add(f"Concurrent users, each clicking on its own cached {main} image (ms over HTTP)")
    add(f"{'mode':<10} {'users':>5} {'n':>4} {'p50':>7} {'p95':>7} {'max':>7} {'masks = alone':>13} {'target':>10}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        for users, c in http["concurrent_ms"].items():
            target = f"p95 <= {TARGET_P95_8_USERS_MS:.0f}" if users == max(http["concurrent_ms"], key=int) else ""
            add(f"{mode:<10} {users:>5} {c['n']:>4} {fmt(c['p50']):>7} {fmt(c['p95']):>7} {fmt(c['max']):>7}"
                f" {str(c['masks_equal_alone']):>13} {target:>10}")
        if http["concurrent_embeddings_computed"]:
            add(f"  note: {http['concurrent_embeddings_computed']} embeddings were computed during the concurrent runs")
    retried = {mode: results["modes"][mode]["http"]["connection_retries"] for mode in modes}
    if any(retried.values()):
        add(f"  note: requests resent on a new connection after a reset of an idle keep-alive one: {retried}")
    if "torch" in modes:
        http = results["modes"]["torch"]["http"]
        add("")
        add(f"Issue #2, default (torch) mode, {main}:")
        rss = http["rss_cached_mb"]
        twenty = rss.get("20", rss.get(min(rss, key=int))) if rss else None
        add(f"  cold click p50 {fmt(http['cold_ms'][main]['p50'])} ms (n={http['cold_ms'][main]['n']}),"
            f" warm click p50 {fmt(http['warm_ms'][main]['p50'])} ms (n={http['warm_ms'][main]['n']});"
            f" RSS {http['rss_startup_mb']['VmRSS']:.0f} MiB after start-up,"
            f" {fmt(twenty['VmRSS'], 0) if twenty else '-'} MiB after"
            f" {twenty['cached_images'] if twenty else '-'} images")
    add("")
    add("Targets (issue #5)")
    for t in results["targets"]:
        verdict = "met" if t["met"] else f"MISSED by {t['excess']:+g} {t['unit']} ({t['ratio_to_limit']}x the limit)"
        add(f"  {t['target']}: {t['value']:g} {t['unit']} (limit {t['limit']:g}) {verdict}")
    return "\n".join(lines)
