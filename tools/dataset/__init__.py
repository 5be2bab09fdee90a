"""A training set from a Label Studio export: the dataset folder `tools/export_coco.py --dataset` writes.

    <folder>/
      annotations/ann.json   COCO instance segmentation (tools.export_coco.convert; file_name = images/ name)
      images/                the task images, as fetched (bytes unchanged), one per task with objects
      classes.txt            the class names, one a line, in category-id order (COCO id 1 first = YOLO class 0)
      labels/, data.yaml     with --yolo: YOLO segmentation labels (yolo_labels.py)
      mask_rcnn_config.py    with --mmdet-config: an mmdetection Mask R-CNN config (mmdet_config.py)

Modules: images.py (fetching with the server's image rules and credentials), yolo_labels.py, mmdet_config.py,
folder.py (the whole folder, written under a temporary name and renamed when complete).
"""
