"""The file names of a dataset's images: from every kind of task image reference, safe and unique by stem."""
from __future__ import annotations

import base64

from tools.dataset.images import unique_names
from tools.export_coco import _file_name


def test_file_names_from_each_kind_of_reference():
    assert _file_name("/data/upload/3/1a2b-cat.jpg") == "1a2b-cat.jpg"
    assert _file_name("/data/local-files/?d=photos/2024/dog%201.png") == "dog 1.png"
    uri = base64.urlsafe_b64encode(b"s3://bucket/deep/key/bird.webp").decode().rstrip("=")
    assert _file_name(f"/tasks/5/presign/?fileuri={uri}") == "bird.webp"
    assert _file_name("gs://bucket/x/y.tif") == "y.tif"
    assert _file_name("https://example.com/img?id=3") == "img"


def test_names_are_safe_and_unique_by_stem():
    names = unique_names([(1, "cat.jpg"), (2, "cat.png"), (3, "CAT.jpg"), (4, "a b/..c.jpg"), (5, "..")])
    assert names == {1: "cat.jpg", 2: "2_cat.png", 3: "3_CAT.jpg", 4: "a_b_..c.jpg", 5: "task5"}
