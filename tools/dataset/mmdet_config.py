"""An optional mmdetection (3.x) Mask R-CNN config for the dataset folder, written from a small template.

Nothing here imports mmdetection: the file is text. It inherits mmdetection's own
`mask-rcnn_r50_fpn_1x_coco.py` through the `mmdet::` scope (found in an installed mmdet package, e.g.
`mim install mmdet`) and sets what the dataset decides: the classes (in category-id order), their number in
both heads, and the data root, annotation file and image folder for train, val and test (the same images: split
them yourself). Train with `python tools/train.py <folder>/mask_rcnn_config.py` in an mmdetection checkout, or
`mim train mmdet <folder>/mask_rcnn_config.py`.

Masks: the base config loads them as bitmaps (`LoadAnnotations(with_mask=True)`, poly2mask on), which reads the
default compressed RLE; a pipeline with `poly2mask=False` (PolygonMasks) ignores RLE instances, so export with
`--masks polygon` for one. Checked here only as Python (tests/model/test_export_dataset.py runs it and reads its
values), not loaded by mmengine or trained.
"""
from __future__ import annotations

from pathlib import Path
from string import Template

FILE_NAME = "mask_rcnn_config.py"
TEMPLATE = Template('''\
# mmdetection 3.x Mask R-CNN config written by tools/export_coco.py --dataset --mmdet-config
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"

data_root = $data_root
metainfo = dict(classes=$classes)
num_classes = $num_classes

model = dict(
    roi_head=dict(
        bbox_head=dict(num_classes=num_classes),
        mask_head=dict(num_classes=num_classes)))

dataset = dict(data_root=data_root, metainfo=metainfo, ann_file="annotations/ann.json",
               data_prefix=dict(img="images/"))
train_dataloader = dict(batch_size=2, dataset=dataset)
val_dataloader = dict(dataset=dataset)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/ann.json", metric=["bbox", "segm"])
test_evaluator = val_evaluator
''')


def render(classes: list[str], data_root: Path) -> str:
    """The config text for `classes` (in category-id order) and the dataset folder `data_root` (absolute)."""
    root = str(data_root.resolve()).rstrip("/") + "/"
    return TEMPLATE.substitute(data_root=repr(root), classes=repr(tuple(classes)), num_classes=len(classes))
