"""Batched embedding (a project job on a GPU), device-agnostic: on the CPU here, a batch must give the embeddings
and masks its images give one by one, and `SamModel.embed_tasks` must store them as `embed_task` would."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sam_backend.labelstudio import label_config
from sam_backend.sam.types import Prompt
from tools.quality import GRABCUT20, folder_items, loose_box

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Object"/></RectangleLabels></View>"""


@pytest.fixture(scope="module")
def photos():
    if not GRABCUT20.is_dir():
        pytest.fail(f"{GRABCUT20} is missing (../shared/datasets beside the repository)")
    return folder_items(GRABCUT20, names=["106024", "124084", "153077"])


def test_a_batch_gives_the_embeddings_of_its_images_one_by_one(torch_predictor, photos):
    half = photos[1].image[::2, ::2].copy()  # another size in the same batch: a reduced copy of a large image
    batch = torch_predictor.embed_batch([(photos[0].image, None), (half, photos[1].image.shape[:2])])
    singles = [torch_predictor.embed(photos[0].image), torch_predictor.embed(half, photos[1].image.shape[:2])]
    assert torch_predictor.batch_size == 1  # on the CPU a job embeds one image at a time
    for got, expected, item in zip(batch, singles, photos[:2]):
        assert got.features.shape == (1, 256, 64, 64) and got.features.dtype == np.float32
        assert (got.original_size, got.input_size) == (expected.original_size, expected.input_size)
        np.testing.assert_allclose(got.features, expected.features, atol=2e-4, rtol=1e-3)
        box = loose_box(item.truth, 0.05)
        prompt = Prompt(points=np.zeros((0, 2), np.float32), labels=np.zeros(0, np.int32), box=box)
        a, b = torch_predictor.decode(got, prompt).mask, torch_predictor.decode(expected, prompt).mask
        assert np.logical_xor(a, b).mean() < 1e-4


class GpuLike:
    """The torch predictor as a GPU would drive it: batches of two (the arithmetic is the CPU's)."""

    def __init__(self, predictor):
        self._predictor = predictor
        self.batch_size = 2
        self.batches: list[int] = []

    def embed_batch(self, images):
        self.batches.append(len(images))
        return self._predictor.embed_batch(images)

    def __getattr__(self, name):
        return getattr(self._predictor, name)


def test_embed_tasks_stores_what_embed_task_would(torch_predictor, photos, base_settings, fake_label_studio, tmp_path):
    from model import SamModel

    config = label_config.parse(CONFIG)
    tasks = []
    for index, item in enumerate(photos, start=1):
        path = fake_label_studio.add_image(f"/data/upload/9/batch-{item.name}.jpg", item.image)
        tasks.append({"id": index, "data": {"image": path}})
    tasks.append({"id": 9, "data": {"image": "/data/upload/9/missing.jpg"}})
    settings = replace(base_settings, state_store=f"disk:{tmp_path}")
    gpu = GpuLike(torch_predictor)
    batched = SamModel(gpu, settings)
    found = batched.embed_tasks(tasks, config)
    assert gpu.batches == [2, 1] and batched.cache.computed == 3
    assert getattr(found[3], "status", None) == 404, found[3]  # the missing image: its error, in its place
    single = SamModel(torch_predictor, replace(settings, state_store="memory"))
    for task, embedding in zip(tasks[:3], found[:3]):
        expected = single.embed_task(task, config)
        np.testing.assert_allclose(embedding.features.astype(np.float32), expected.features.astype(np.float32),
                                   atol=2e-3)
    again = SamModel(torch_predictor, settings)  # another process on the same store: found there, not computed
    assert all(e is not None for e in again.embed_tasks(tasks[:3], config)) and again.cache.computed == 0
    assert again.cache.store_hits == 3
