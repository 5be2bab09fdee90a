"""ONNX SAM (issue #3): one exported decoder serves every image size and prompt mix, agrees with torch, and
serves without torch.

Real MobileSAM weights (models/mobile_sam.pt, fetched if missing) and real photos (skimage.data), resized and
cropped to 640x480, 1920x1080, a 720x1080 portrait and a 512x512 square (`onnx_converter.SAMPLES`).

The session fixture `onnx_files` (conftest.py) reuses models/vit_t.{encoder,decoder}.onnx when they are newer
than the checkpoint and the code that builds them, and were built from these weights; otherwise it exports both
into a temporary folder (about 20 s). `int8_files` does the same for the *.int8.onnx files.

Numbers (embedding differences, IoUs) are printed: run with `-s` to see them. The ViT-B export smoke test is
opt-in (ONNX_TEST_VIT_B=1): a ViT-B forward alone takes 15-40 s on this machine's CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402  (the reference; this test file needs it, the ONNX predictor does not)
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

import onnx_converter as oc  # noqa: E402
import onnx_sam  # noqa: E402
from sam_backend.sam import transforms  # noqa: E402
from advanced_sam import TorchSamPredictor, build_sam  # noqa: E402
from onnx_sam import OnnxModelError, OnnxSamPredictor  # noqa: E402
from sam_backend.sam.types import Embedding, Prompt  # noqa: E402

MODELS = ROOT / "models"
THREADS = 2
MIN_IOU = 0.99  # ONNX float32 vs torch
INT8_MIN_IOU = 0.9  # int8 vs ONNX float32
INT8_CURVE_DELTA = 0.02  # |int8 - fp32| of a mean mIoU over clicks (measured <= 0.005 on GrabCut20)
INT8_NOC_DELTA = 0.25  # clicks per object (5 more clicks over the 20 objects; measured -0.05..0)
PROMPT_KINDS = ("point", "points+negative", "box", "box+points", "refine: mask+points", "refine: mask only")
SAMPLE_IDS = [sample.name.replace(" ", "-") for sample in oc.SAMPLES]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def checkpoint(mobile_sam_checkpoint) -> Path:
    return mobile_sam_checkpoint


@pytest.fixture(scope="session")
def torch_sam(sam_model) -> TorchSamPredictor:
    return TorchSamPredictor(sam_model, "MobileSAM-torch", torch.device("cpu"))


@pytest.fixture(scope="session")
def onnx_predictor(onnx_files) -> OnnxSamPredictor:
    return OnnxSamPredictor.load(*onnx_files, model_version="MobileSAM-onnx", threads=THREADS)


class EmbeddingCache:
    """Each sample photo embedded once per predictor per session."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.cache: dict[oc.Sample, Embedding] = {}
        self.lock = threading.Lock()

    def __call__(self, sample: oc.Sample) -> Embedding:
        with self.lock:
            if sample not in self.cache:
                self.cache[sample] = self.predictor.embed(image_of(sample))
            return self.cache[sample]


_images: dict[oc.Sample, np.ndarray] = {}


def image_of(sample: oc.Sample) -> np.ndarray:
    if sample not in _images:
        _images[sample] = oc.sample_image(sample)
    return _images[sample]


@pytest.fixture(scope="session")
def torch_embedding(torch_sam) -> EmbeddingCache:
    return EmbeddingCache(torch_sam)


@pytest.fixture(scope="session")
def onnx_embedding(onnx_predictor) -> EmbeddingCache:
    return EmbeddingCache(onnx_predictor)


def prompts_of(sample: oc.Sample, torch_sam: TorchSamPredictor, embedding: Embedding) -> dict[str, Prompt]:
    """The converter's sample prompts plus the two refinements, fed torch's earlier logits."""
    prompts = oc.sample_prompts(sample)
    earlier = torch_sam.decode(embedding, prompts["points+negative"])
    prompts.update(oc.refinement_prompts(sample, earlier.low_res_logits))
    assert tuple(prompts) == PROMPT_KINDS
    return prompts


# ------------------------------------------------------------------------------------------------ the files


def test_decoder_file_has_no_image_size_and_a_dynamic_point_count(onnx_files):
    session = onnx_sam.open_session(onnx_files[1], "decoder", threads=1)
    inputs = {arg.name: arg.shape for arg in session.get_inputs()}
    assert set(inputs) == {"image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"}
    assert isinstance(inputs["point_coords"][1], str) and inputs["point_coords"][1] == inputs["point_labels"][1]
    assert {arg.name: arg.shape for arg in session.get_outputs()} == {
        "low_res_masks": [1, 4, 256, 256], "iou_predictions": [1, 4]}
    meta = onnx_sam.metadata(session)
    assert meta[onnx_sam.META_MODEL_TYPE] == "vit_t" and meta[onnx_sam.META_PART] == "decoder"


# ------------------------------------------------------------------------------------------------ float32 vs torch


@pytest.mark.parametrize("sample", oc.SAMPLES, ids=SAMPLE_IDS)
def test_one_decoder_matches_torch_on_every_size_and_prompt(sample, torch_sam, onnx_predictor, torch_embedding):
    """The ONNX decoder on torch's embedding: same four low-res outputs, same mask, for every prompt kind."""
    embedding = torch_embedding(sample)
    height, width = image_of(sample).shape[:2]
    report = []
    for kind, prompt in prompts_of(sample, torch_sam, embedding).items():
        expected_low, expected_iou = torch_sam.decode_low_res(embedding, prompt)
        got_low, got_iou = onnx_predictor.decode_low_res(embedding, prompt)
        assert got_low.shape == (4, 256, 256) and got_iou.shape == (4,)
        np.testing.assert_allclose(got_low, expected_low, atol=2e-3, err_msg=kind)
        np.testing.assert_allclose(got_iou, expected_iou, atol=1e-4, err_msg=kind)
        expected = transforms.best_prediction(expected_low, expected_iou, prompt, embedding)
        got = onnx_predictor.decode(embedding, prompt)
        assert got.mask.shape == (height, width) and got.mask.dtype == bool
        if kind not in oc.INT8_UNCOUNTED:  # SAM's answer to a mask without clicks may well be empty
            assert got.mask.any(), f"{kind}: empty mask on {sample.name}"
        iou = oc.mask_iou(expected.mask, got.mask)
        report.append(f"{kind} {iou:.4f}")
        assert iou >= MIN_IOU, f"{sample.name}, {kind}: IoU {iou:.4f} < {MIN_IOU}"
        assert abs(got.score - expected.score) < 1e-4
    print(f"\n{sample.name} decoder IoU vs torch: " + ", ".join(report))


@pytest.mark.parametrize("sample", oc.SAMPLES, ids=SAMPLE_IDS)
def test_encoder_matches_torch(sample, torch_sam, onnx_predictor, torch_embedding, onnx_embedding):
    expected, got = torch_embedding(sample), onnx_embedding(sample)
    assert got.features.shape == (1, 256, 64, 64) and got.features.dtype == np.float32
    assert (got.original_size, got.input_size) == (expected.original_size, expected.input_size)
    diff = float(np.abs(got.features - expected.features).max())
    print(f"\n{sample.name}: embedding max |ONNX - torch| = {diff:.2e} "
          f"(values up to {np.abs(expected.features).max():.2f})")
    assert diff < 1e-4  # measured about 2e-6
    for kind, prompt in prompts_of(sample, torch_sam, expected).items():
        iou = oc.mask_iou(torch_sam.decode(expected, prompt).mask, onnx_predictor.decode(got, prompt).mask)
        assert iou >= MIN_IOU, f"{sample.name}, {kind}: end-to-end IoU {iou:.4f} < {MIN_IOU}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 5000), width=st.integers(1, 5000), data=st.data())
def test_any_size_and_prompt_mix_matches_torch(height, width, data, torch_sam, onnx_predictor, torch_embedding):
    """Random image sizes (1 px to 5000 px, any aspect) and prompts: 0-12 clicks, a box or not, a mask or not."""
    # Past about 2000:1 the short side scales to 0 px in SAM's resize (transforms.input_size, as
    # ResizeLongestSide): no model can serve that, so such sizes are left to the server's own checks.
    assume(min(transforms.input_size((height, width))) >= 1)
    features = torch_embedding(oc.SAMPLES[0]).features  # what the decoder sees of the image: sizes are metadata
    embedding = Embedding(features, (height, width), transforms.input_size((height, width)))
    count = data.draw(st.integers(0, 12))
    fractions = np.array(data.draw(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=count,
                                            max_size=count)), dtype=np.float32).reshape(-1, 2)
    points = fractions * np.array([width, height], dtype=np.float32)
    labels = np.array(data.draw(st.lists(st.sampled_from([0, 1]), min_size=count, max_size=count)), np.int32)
    box = None
    if data.draw(st.booleans()):
        x0, x1 = sorted(data.draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        y0, y1 = sorted(data.draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
        box = np.array([x0 * width, y0 * height, x1 * width, y1 * height], dtype=np.float32)
    mask_input = None
    if data.draw(st.booleans()):
        mask_input = np.random.default_rng(data.draw(st.integers(0, 99))).normal(0, 4, (1, 256, 256)).astype(np.float32)
    prompt = Prompt(points, labels, box, mask_input)
    expected_low, expected_iou = torch_sam.decode_low_res(embedding, prompt)
    got_low, got_iou = onnx_predictor.decode_low_res(embedding, prompt)
    np.testing.assert_allclose(got_low, expected_low, atol=2e-3)
    np.testing.assert_allclose(got_iou, expected_iou, atol=1e-4)
    got = onnx_predictor.decode(embedding, prompt)
    expected = transforms.best_prediction(expected_low, expected_iou, prompt, embedding)
    assert got.mask.shape == (height, width)
    # Masks may differ only where torch's own logits are within the models' difference of the threshold.
    logits = transforms.upscale_logits(expected.low_res_logits[0], embedding.input_size, (height, width))
    assert not np.any((got.mask != expected.mask) & (np.abs(logits) > 2e-3))


def test_onnx_decoder_with_torch_encoder_object(onnx_files, torch_sam, torch_embedding, tmp_path):
    """No encoder.onnx: an object with `embed` (here the torch predictor) embeds, the ONNX decoder decodes."""
    predictor = OnnxSamPredictor.load(tmp_path / "vit_t.encoder.onnx", onnx_files[1], "hybrid", THREADS,
                                      encoder=torch_sam)
    sample = oc.SAMPLES[0]
    embedding = predictor.embed(image_of(sample))
    np.testing.assert_array_equal(embedding.features, torch_embedding(sample).features)
    prompt = oc.sample_prompts(sample)["box+points"]
    assert oc.mask_iou(predictor.decode(embedding, prompt).mask, torch_sam.decode(embedding, prompt).mask) >= MIN_IOU


def test_concurrent_calls_give_the_sequential_results(onnx_predictor, onnx_embedding):
    """One predictor, many threads, different images and prompts at once: no per-image state leaks."""
    jobs = [(sample, kind, prompt) for sample in oc.SAMPLES for kind, prompt in oc.sample_prompts(sample).items()]
    sequential = [onnx_predictor.decode(onnx_embedding(sample), prompt) for sample, _, prompt in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda job: onnx_predictor.decode(onnx_embedding(job[0]), job[2]), jobs * 2))
    for index, got in enumerate(concurrent):
        expected = sequential[index % len(jobs)]
        np.testing.assert_allclose(got.low_res_logits, expected.low_res_logits, atol=1e-4)
        assert oc.mask_iou(got.mask, expected.mask) >= 0.999
    with ThreadPoolExecutor(max_workers=2) as pool:
        embeddings = list(pool.map(lambda sample: onnx_predictor.embed(image_of(sample)), oc.SAMPLES[:2]))
    for sample, embedding in zip(oc.SAMPLES[:2], embeddings):
        np.testing.assert_allclose(embedding.features, onnx_embedding(sample).features, atol=1e-5)


# ------------------------------------------------------------------------------------------------ without torch

TORCH_FREE_SCRIPT = textwrap.dedent("""
    import json, sys
    BLOCKED = ("torch", "torchvision", "segment_anything", "mobile_sam", "timm")
    for name in BLOCKED:
        sys.modules[name] = None  # `import torch` now raises ImportError
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from onnx_sam import OnnxSamPredictor
    from sam_backend.sam.types import Prompt
    encoder, decoder, image, prompt_file, out = sys.argv[2:7]
    predictor = OnnxSamPredictor.load(encoder, decoder, "torch-free", threads=2)
    spec = json.load(open(prompt_file))
    prompt = Prompt(np.array(spec["points"], np.float32).reshape(-1, 2), np.array(spec["labels"], np.int32),
                    None if spec["box"] is None else np.array(spec["box"], np.float32))
    prediction = predictor.decode(predictor.embed(np.load(image)), prompt)
    np.save(out, prediction.mask)
    try:
        import torch
        torch_importable = True
    except ImportError:
        torch_importable = False
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    print(json.dumps({"score": prediction.score, "torch_modules": loaded, "torch_importable": torch_importable}))
""")


@pytest.mark.parametrize("kind", ["points+negative", "box+points"])
def test_serves_in_a_process_where_torch_cannot_be_imported(kind, onnx_files, torch_sam, torch_embedding, tmp_path):
    sample = oc.SAMPLES[1]  # 1920x1080
    prompt = oc.sample_prompts(sample)[kind]
    np.save(tmp_path / "image.npy", image_of(sample))
    (tmp_path / "prompt.json").write_text(json.dumps({
        "points": prompt.points.tolist(), "labels": prompt.labels.tolist(),
        "box": None if prompt.box is None else prompt.box.tolist()}))
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_SCRIPT, str(ROOT), str(onnx_files[0]), str(onnx_files[1]),
         str(tmp_path / "image.npy"), str(tmp_path / "prompt.json"), str(tmp_path / "mask.npy")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch_modules"] == [] and report["torch_importable"] is False
    mask = np.load(tmp_path / "mask.npy")
    expected = torch_sam.decode(torch_embedding(sample), prompt)
    iou = oc.mask_iou(mask, expected.mask)
    print(f"\ntorch-free process, {sample.name} {kind}: IoU vs torch {iou:.4f}, score {report['score']:.3f}")
    assert iou >= MIN_IOU and abs(report["score"] - expected.score) < 1e-3


# ------------------------------------------------------------------------------------------------ int8


def test_int8_masks_against_float32(int8_files, onnx_files, onnx_predictor, onnx_embedding, torch_sam,
                                     torch_embedding):
    """Int8 encoder + int8 decoder against float32 ONNX, judged by what users get, on any x86-64 CPU.

    * Prompts that pin the object down (several clicks, a box, box + clicks, a refinement with clicks): the int8
      mask is the float32 one (IoU >= INT8_MIN_IOU) on every sample photo.
    * A lone click is ambiguous: SAM answers with the best of three masks by predicted IoU, and two of them are
      often within 0.01 of each other, so a small numeric difference may pick the other one. What matters there
      is the quality users get, so the click simulation of tools/quality.py (GrabCut20's 20 real photos, click
      after click through the server, with and without refinement) must give int8 the quality of float32: the
      mean mIoU over clicks 1..5 and 1..20 within INT8_CURVE_DELTA, NoC@85/90 within INT8_NOC_DELTA, no more
      failures. Not mIoU@k one k at a time: float32 itself jumps on 12-17 of the 20 objects (an added click
      may pick another of the three masks), and one such flip moves one mIoU@k by 0.04-0.07 either way
      (measured: int8 - fp32 at @2 +0.027 on GrabCut20, -0.039 on the six scenes; the curve means within 0.005
      on GrabCut20). The lone clicks on the photos are printed, not asserted.
    * The mask-only refinement is reported only: SAM's own float32 answer to it is a guess.

    The int8 files use unsigned weights (U8U8 kernels), whose results do not depend on the CPU's vector
    extensions; the signed recipe (U8S8) flipped the chelsea click to IoU 0.03 on AVX2-only CPUs (onnx_converter).
    """
    from tools import quality
    from sam_backend.settings import Settings

    int8 = OnnxSamPredictor.load(*int8_files, model_version="MobileSAM-int8", threads=THREADS)
    sizes = {path.name: round(path.stat().st_size / 1e6, 1) for path in (*onnx_files, *int8_files)}
    lines, pinned, lone = [], [], []
    for sample in oc.SAMPLES:
        fp32_embedding, int8_embedding = onnx_embedding(sample), int8.embed(image_of(sample))
        diff = float(np.abs(int8_embedding.features - fp32_embedding.features).max())
        ious = {}
        for kind, prompt in prompts_of(sample, torch_sam, torch_embedding(sample)).items():
            ious[kind] = oc.mask_iou(onnx_predictor.decode(fp32_embedding, prompt).mask,
                                     int8.decode(int8_embedding, prompt).mask)
            if kind == "point":
                lone.append((sample.name, ious[kind]))
            elif kind not in oc.INT8_UNCOUNTED:
                pinned.append((sample.name, kind, ious[kind]))
        lines.append(f"{sample.name}: embedding max |int8 - fp32| {diff:.3f}; "
                     + ", ".join(f"{kind} {iou:.3f}" for kind, iou in ious.items()))
    print("\nint8 vs fp32 (sizes MB: %s)\n" % sizes + "\n".join(lines))
    worst = min(pinned, key=lambda row: row[2])
    print(f"int8 worst pinned prompt: {worst}; lone clicks (not asserted): {lone}")
    assert worst[2] >= INT8_MIN_IOU, f"int8 mask IoU vs float32 {worst}"

    items = quality.folder_items(quality.GRABCUT20)
    for refine in (True, False):
        settings = Settings(device="cpu", refine_masks=refine)
        fp32, got = (quality.benchmark(predictor, items, 20, settings, log=lambda line: None)["summary"]
                     for predictor in (onnx_predictor, int8))
        print(f"click simulation on GrabCut20, refine={refine}:\n  fp32 {fp32}\n  int8 {got}")
        for first, last in ((1, 5), (1, 20)):
            means = [np.mean([s[f"mIoU@{k}"] for k in range(first, last + 1)]) for s in (fp32, got)]
            assert abs(means[1] - means[0]) <= INT8_CURVE_DELTA, (refine, f"mean mIoU@{first}..{last}", means)
        for name in ("85", "90"):
            assert got[f"NoC@{name}"] <= fp32[f"NoC@{name}"] + INT8_NOC_DELTA, (refine, name, got, fp32)
            assert got[f"failed@{name}"] <= fp32[f"failed@{name}"], (refine, name, got, fp32)
    assert all(sizes[path.name] < 0.6 * sizes[source.name] for path, source in zip(int8_files, onnx_files))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file_names_the_build_command(onnx_files, tmp_path):
    with pytest.raises(OnnxModelError, match=r"does not exist.*python onnx_converter\.py --model-type vit_t"):
        OnnxSamPredictor.load(tmp_path / "vit_t.encoder.onnx", onnx_files[1], "x")
    with pytest.raises(OnnxModelError, match=r"decoder .*vit_h\.decoder\.onnx does not exist.*--model-type vit_h"):
        OnnxSamPredictor.load(onnx_files[0], tmp_path / "vit_h.decoder.onnx", "x")


def test_swapped_paths_are_named(onnx_files):
    with pytest.raises(OnnxModelError, match="swapped"):
        OnnxSamPredictor.load(onnx_files[1], onnx_files[0], "x")


def test_not_an_onnx_file(onnx_files, checkpoint, tmp_path):
    with pytest.raises(OnnxModelError, match="cannot load ONNX encoder"):
        OnnxSamPredictor.load(checkpoint, onnx_files[1], "x")
    broken = tmp_path / "vit_t.decoder.onnx"
    broken.write_bytes(onnx_files[1].read_bytes()[:100_000])  # a half-copied file
    with pytest.raises(OnnxModelError, match="cannot load ONNX decoder"):
        OnnxSamPredictor.load(onnx_files[0], broken, "x")


def test_encoder_and_decoder_of_different_weights_are_refused(onnx_files, tmp_path):
    other = tmp_path / "vit_t.decoder.onnx"
    other.write_bytes(onnx_files[1].read_bytes())
    oc._stamp(other, {onnx_sam.META_WEIGHTS: "0123456789abcdef"})
    with pytest.raises(OnnxModelError, match="different models"):
        OnnxSamPredictor.load(onnx_files[0], other, "x")


def test_bad_embedding_shape_is_refused(onnx_predictor):
    embedding = Embedding(np.zeros((1, 256, 32, 32), np.float32), (100, 100), (1024, 1024))
    with pytest.raises(ValueError, match="shape"):
        onnx_predictor.decode(embedding, Prompt(np.array([[1.0, 1.0]], np.float32), np.array([1], np.int32)))


# ------------------------------------------------------------------------------------------------ the converter


def test_converter_cli_exports_a_decoder_and_checks_it(checkpoint, tmp_path):
    """`--parts decoder`: only the decoder is written; the check embeds with torch and passes."""
    code = oc.main(["--model-type", "vit_t", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path),
                    "--parts", "decoder", "--check-images", "1", "--threads", str(THREADS)])
    assert code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["vit_t.decoder.onnx"]  # no temporary leftovers


def test_converter_check_fails_below_the_threshold(torch_sam, onnx_files):
    """The check that passes in the test above fails when the bar is out of reach (the CLI then exits 1)."""
    assert not oc.check(torch_sam, *onnx_files, oc.SAMPLES[:1], min_iou=1.0001, threads=THREADS)


def test_converter_help_runs():
    result = subprocess.run([sys.executable, str(ROOT / "onnx_converter.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--quantize" in result.stdout and "--random-weights" in result.stdout


@pytest.mark.skipif(os.environ.get("ONNX_TEST_VIT_B") != "1",
                    reason="opt-in (ONNX_TEST_VIT_B=1): ViT-B random-init export, about 2-3 minutes on 2 cores")
def test_vit_b_random_weights_export(tmp_path):
    """SAM ViT-B with random weights: the export path of the big models works and matches torch."""
    torch.manual_seed(0)
    model = build_sam("vit_b", None, torch.device("cpu"))
    metadata = oc.model_metadata("vit_b", None)
    encoder, decoder = oc.onnx_paths(tmp_path, "vit_b")
    oc.export_decoder(model, decoder, metadata=metadata)
    oc.export_encoder(model, encoder, metadata=metadata)
    reference = TorchSamPredictor(model, "vit_b-random", torch.device("cpu"))
    predictor = OnnxSamPredictor.load(encoder, decoder, "vit_b-random", threads=THREADS)
    sample = oc.SAMPLES[0]
    expected, got = reference.embed(image_of(sample)), predictor.embed(image_of(sample))
    diff = float(np.abs(got.features - expected.features).max())
    print(f"\nViT-B random: embedding max |diff| {diff:.2e} (values up to {np.abs(expected.features).max():.2f})")
    assert diff < 1e-3 * max(1.0, float(np.abs(expected.features).max()))
    for kind, prompt in oc.sample_prompts(sample).items():
        expected_low, _ = reference.decode_low_res(expected, prompt)
        got_low, _ = predictor.decode_low_res(expected, prompt)
        np.testing.assert_allclose(got_low, expected_low, atol=1e-3 * max(1.0, float(np.abs(expected_low).max())),
                                   err_msg=kind)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_encoder_pool_runs_at_lower_priority_and_the_decoder_has_no_pool(onnx_files, onnx_predictor):
    """Clicks before embeddings (issue #16): the encoder session is opened on its lane, so ONNX Runtime's pool
    threads inherit ENCODER_NICE; the decoder with DECODE_THREADS=1 runs in its caller's thread only. Masks are
    those of the default session options."""
    def threads() -> dict[int, int]:
        nice = {}
        for task in os.listdir("/proc/self/task"):
            try:
                nice[int(task)] = int(open(f"/proc/self/task/{task}/stat").read().rsplit(")", 1)[1].split()[16])
            except OSError:
                pass
        return nice

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = set(threads())
    predictor = OnnxSamPredictor.load(*onnx_files, model_version="lanes", threads=3, decode_threads=1,
                                      encoder_nice=7)
    new = {tid: nice for tid, nice in threads().items() if tid not in before}
    # the lane's thread and the encoder's 2 pool threads (3 intra-op threads: the caller is the third), no more
    assert sorted(new.values()) == [min(base + 7, 19)] * 3
    assert predictor.decoder_single is None
    adaptive = OnnxSamPredictor.load(*onnx_files, model_version="adaptive", threads=1, decode_threads=0)
    assert adaptive.decoder_single is not None  # every core for a lone click, one thread each when they overlap
    from tools.harness.recordings import CHELSEA

    image = np.ascontiguousarray(CHELSEA)
    embedding = predictor.embed(image)
    point = Prompt(points=np.array([[200.0, 150.0]], np.float32), labels=np.ones(1, np.int32))
    reference = onnx_predictor.decode(onnx_predictor.embed(image), point).mask
    assert np.array_equal(predictor.decode(embedding, point).mask, reference)
    assert np.array_equal(adaptive.decode(embedding, point).mask, reference)  # alone: the parallel session
    with adaptive._decodes.running():  # another click in flight: the one-thread session
        assert np.array_equal(adaptive.decode(embedding, point).mask, reference)


def _thread_ids() -> set[int]:
    return {int(task) for task in os.listdir("/proc/self/task")}


def _cpu_ns(threads: set[int]) -> int:
    """On-CPU nanoseconds of these threads of this process so far (/proc/self/task/<tid>/schedstat)."""
    total = 0
    for tid in threads:
        try:
            total += int(open(f"/proc/self/task/{tid}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _idle_cpu_ns_after_decodes(open_decoder, embedding: Embedding, point: Prompt, reference: np.ndarray) -> int:
    """CPU the threads that `open_decoder()` starts take in the 0.5 s after three decodes."""
    before = _thread_ids()
    decoder = open_decoder()
    threads = _thread_ids() - before
    for _ in range(3):
        assert np.array_equal(decoder.decode(embedding, point).mask, reference)
    started = _cpu_ns(threads)
    time.sleep(0.5)
    return _cpu_ns(threads) - started


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread CPU times are Linux's")
def test_the_decoders_pool_spins_only_while_a_decode_runs(onnx_files, onnx_predictor):
    """The lone click's decoder pool threads spin between its ~300 operators instead of sleeping and being woken
    for each, but stop when the decode returns (`session.force_spinning_stop`): between clicks the server takes
    no CPU from the embeddings. A control session that spins without the stop (~30-50 ms of CPU after each run
    on 2 cores of an AMD EPYC) shows that the measurement would see it."""
    from tools.harness.recordings import CHELSEA

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: no decoder pool")
    image = np.ascontiguousarray(CHELSEA)
    embedding = onnx_predictor.embed(image)
    point = Prompt(points=np.array([[200.0, 150.0]], np.float32), labels=np.ones(1, np.int32))
    reference = onnx_predictor.decode(embedding, point).mask

    def spinning_on() -> OnnxSamPredictor:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "0")
        session = ort.InferenceSession(str(onnx_files[1]), options, providers=["CPUExecutionProvider"])
        return OnnxSamPredictor(onnx_predictor.encoder, session, "spin-control")

    limit = 10_000_000  # 10 ms of CPU in 0.5 s
    control = _idle_cpu_ns_after_decodes(spinning_on, embedding, point, reference)
    if control < 2 * limit:
        pytest.skip(f"ONNX Runtime's spin after a run took only {control / 1e6:.1f} ms of CPU here: too short to tell")
    served = _idle_cpu_ns_after_decodes(
        lambda: OnnxSamPredictor.load(*onnx_files, model_version="spin", threads=1, decode_threads=0),
        embedding, point, reference)
    assert served < limit, f"{served / 1e6:.1f} ms of CPU in 0.5 s after the decodes (spinning control: " \
                           f"{control / 1e6:.1f} ms)"
