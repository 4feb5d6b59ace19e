"""Small datasets the tests generate in the real COCO and Cityscapes layouts, a dataset of bare ids, and a batch of
the built-in shapes."""

import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image

from mrcnn.data.shapes import ShapesDataset

# ---- COCO ---------------------------------------------------------------------------------

# Category ids with gaps and out of order, like COCO's 1..90.
CATEGORIES = [
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
# (height, width) per image: landscape, portrait and square; image 4 has no annotations; the last one
# also has a medium and a large object (COCO's area ranges: < 32^2, < 96^2, above).
IMAGE_SIZES = [(48, 64), (64, 48), (40, 40), (56, 72), (48, 64), (72, 40), (120, 160)]


def _polygon(rng, height, width):
    """A random star-shaped polygon (a list of x, y numbers) inside the image."""
    cx, cy = rng.uniform(8, width - 8), rng.uniform(8, height - 8)
    radius = rng.uniform(4, min(height, width) / 3)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(3, 9)))
    r = radius * rng.uniform(0.5, 1.0, size=len(angles))
    xs = np.clip(cx + r * np.cos(angles), 0, width)
    ys = np.clip(cy + r * np.sin(angles), 0, height)
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def make_coco_split(root, split="val2017", seed=0, image_sizes=IMAGE_SIZES, categories=CATEGORIES, fmt="JPEG"):
    """Writes ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json`` (the COCO layout).

    Every image but the fifth has 2-5 objects (polygons, some with two parts, one
    compressed RLE), every other image a crowd region (uncompressed RLE, as COCO
    stores them). ``area`` and ``bbox`` are the mask's, as in COCO's own files.

    Returns:
        (json path, image folder)
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i, (height, width) in enumerate(image_sizes):
        image_id = 100 + 7 * i  # not 1..N: ids come from the json
        file_name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / file_name, format=fmt)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if i == 4:
            continue
        polygons = [[_polygon(rng, height, width)] for _ in range(rng.integers(2, 6))]
        polygons[1].append(_polygon(rng, height, width))  # an object in two parts
        if min(height, width) >= 100:
            cx, cy, angles = width / 2, height / 2, np.linspace(0, 2 * np.pi, 12, endpoint=False)
            circle = np.stack([cx + 30 * np.cos(angles), cy + 30 * np.sin(angles)], axis=1)
            polygons.append([circle.ravel().round(2).tolist()])  # medium (~2700 pixels)
            polygons.append([[5, 5, width - 5, 5, width - 5, height - 5, 5, height - 5]])  # large
        for k, segmentation in enumerate(polygons):
            category = categories[rng.integers(len(categories))]["id"]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            if k == 2:  # a compressed RLE with str counts
                segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        if i % 2 == 0:
            crowd = np.zeros((height, width), dtype=np.uint8)
            crowd[2:20, 3:30] = 1
            rle = mask_utils.encode(np.asfortranarray(crowd))
            annotations.append(
                {
                    "image_id": image_id,
                    "category_id": categories[i % len(categories)]["id"],
                    "segmentation": uncompressed_rle(crowd),
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 1,
                }
            )
    for n, annotation in enumerate(annotations, start=1):
        annotation["id"] = 1000 + n
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    json_path = root / "annotations" / f"instances_{split}.json"
    json_path.write_text(json.dumps(data))
    return json_path, image_dir


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [len(flat)]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


# ---- Cityscapes ---------------------------------------------------------------------------

CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH = 32, 64


def cityscapes_instance_ids(seed):
    """A small instanceIds map: stuff, two cars, a person, a car group, a caravan, a bicycle."""
    rng = np.random.default_rng(seed)
    ids = np.full((CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH), 7, dtype=np.int32)  # road (a stuff class)
    ids[:4] = 23  # sky
    ids[5:15, 2:12] = 26001  # car, instance 1
    ids[5:15, 14:20] = 26003  # car, instance 3 (instance numbers need not be contiguous)
    ids[16:30, 22:26] = 24000  # person, instance 0
    ids[20:28, 30:40] = 26  # a group of cars: crowd region
    ids[20:28, 42:50] = 29002  # caravan: has instances but is not evaluated
    ids[2:10, 50 + seed % 4 : 60] = 33001  # bicycle
    ids[rng.integers(0, CITYSCAPES_HEIGHT), 0] = 0  # unlabeled
    return ids


def write_cityscapes(root, instance_ids, splits=("train", "val"), cities=("aachen", "bremen"), per_city=2, seed=0):
    """Writes Cityscapes' official layout: ``leftImg8bit`` images and 16-bit ``gtFine`` instanceIds PNGs.

    Args:
        instance_ids: ``(city index, image index, rng) -> int [H, W]`` instanceIds map of one image.

    Returns:
        The root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, city in enumerate(cities):
            image_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for k in range(per_city):
                stem = f"{city}_{c:06d}_{k:06d}"
                ids = instance_ids(c, k, rng)
                pixels = rng.integers(0, 255, size=(*ids.shape, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(image_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(ids.astype(np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    return root


def make_cityscapes(root, splits=("train", "val"), cities=("aachen", "bremen"), per_city=2):
    """The official layout with the fixed :func:`cityscapes_instance_ids` maps; returns the root."""
    return write_cityscapes(root, lambda c, k, rng: cityscapes_instance_ids(c * 10 + k), splits, cities, per_city)


# ---- ids only -----------------------------------------------------------------------------


class IdsDataset(torch.utils.data.Dataset):
    """Items that are only their image id; one in three portrait (for aspect-ratio grouping)."""

    class_names = ["thing"]

    def __init__(self, num_images):
        self.image_sizes = [(48, 32) if i % 3 == 0 else (32, 48) for i in range(num_images)]

    def __len__(self):
        return len(self.image_sizes)

    def __getitem__(self, index):
        return torch.zeros(1), {"image_id": index + 1}


class ParentIdsDataset(IdsDataset):
    """An :class:`IdsDataset` whose targets also hold ``parent``: the id of the process that started the one reading
    the item (a loader worker's parent)."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        return image, {**target, "parent": os.getppid()}


def random_cityscapes_instance_ids(rng, height=96, width=192):
    """An instanceIds map with instances of 40-1200 pixels (the official evaluation ignores those under 100).

    Road and sky, an ego-vehicle strip (void: ignored in the official evaluation), 5-8 instances of 7 of the
    8 classes (no train: a class without ground truth), later ones occluding earlier ones, a car group (crowd)
    and a caravan (not evaluated).
    """
    ids = np.full((height, width), 7, dtype=np.int32)  # road
    ids[: height // 10] = 23  # sky
    ids[-height // 16 :] = 1  # ego vehicle (void)
    label_ids = [24, 25, 26, 27, 28, 32, 33]
    for k in range(int(rng.integers(5, 9))):
        label_id = int(rng.choice(label_ids))
        h, w = int(rng.integers(6, 30)), int(rng.integers(6, 40))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        ids[y : y + h, x : x + w] = label_id * 1000 + k
    y, x = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 20))
    ids[y : y + 12, x : x + 20] = 26  # a group of cars
    ids[2:10, 2:12] = 29001  # caravan
    return ids


def make_cityscapes_sized(root, splits=("train", "val"), cities=("aachen", "bremen"), per_city=2, seed=0):
    """The official layout (16-bit instanceIds) with :func:`random_cityscapes_instance_ids` maps; returns the root."""
    return write_cityscapes(root, lambda c, k, rng: random_cityscapes_instance_ids(rng), splits, cities, per_city, seed)


def coco_format_overrides(train_json, train_images, val_json, val_images) -> list[str]:
    """``data=coco_format`` on the given splits, with loaders in the main process (tests stay small and fast)."""
    return [
        "data=coco_format",
        f"data.train_json={train_json}",
        f"data.train_images={train_images}",
        f"data.val_json={val_json}",
        f"data.val_images={val_images}",
        "data.datamodule.num_workers=0",
        "data.datamodule.persistent_workers=false",
    ]


# ---- the built-in shapes ------------------------------------------------------------------


def shapes_batch(count=2, seed=1, device="cpu", image_size=64):
    """``count`` shapes images of ``image_size`` pixels (a list of ``[3, H, W]``) and their targets, on ``device``."""
    dataset = ShapesDataset(num_images=count, image_size=image_size, seed=seed)
    images, targets = zip(*(dataset[i] for i in range(count)))
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return [image.to(device) for image in images], targets
