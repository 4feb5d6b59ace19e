"""Images per second of the COCO data pipeline: JPEG decode + polygon masks + augmentation + collate.

Generates a COCO-format dataset of COCO-sized images (640x480 JPEGs with ~7 polygon
instances each, some with two parts, one crowd region in every third image) in a
temporary folder, then times the training DataLoader of ``InstanceDataModule``::

    python benchmarks/data_pipeline.py                     # 2 workers, hflip, batch 2
    python benchmarks/data_pipeline.py --workers 0 --augmentation scale_jitter

The first batches (worker start-up) are not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from mrcnn.data import transforms as T
from mrcnn.data.coco import CocoDataset
from mrcnn.data.datamodule import InstanceDataModule

AUGMENTATIONS = {
    "none": T.identity_transforms,
    "hflip": T.train_transforms,
    "photometric": T.photometric_transforms,
    "random_crop": T.random_crop_transforms,
    "scale_jitter": lambda: T.scale_jitter_transforms(size=800),
}


def _polygon(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A star-shaped polygon of 8-30 vertices, 10-200 pixels across."""
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    radius = np.exp(rng.uniform(np.log(5), np.log(100)))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(8, 31)))
    r = radius * rng.uniform(0.6, 1.0, size=len(angles))
    xs = np.clip(cx + r * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + r * np.sin(angles), 0, height - 1)
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def make_dataset(folder: Path, num_images: int, width: int = 640, height: int = 480, seed: int = 0) -> Path:
    """Writes ``folder/images/*.jpg`` and ``folder/instances.json``; returns the json path."""
    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    # A smooth colour field plus noise: JPEG sizes and decode times like photographs (~100 kB).
    base = rng.integers(0, 255, size=(height // 16, width // 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR), dtype=np.int16)
    images, annotations = [], []
    for i in range(num_images):
        noise = rng.integers(-40, 40, size=(height, width, 3), dtype=np.int16)
        pixels = np.clip(np.roll(base, i * 7, axis=1) + noise, 0, 255).astype(np.uint8)
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for k in range(int(rng.integers(5, 10))):  # ~7 instances per image, as in COCO
            segmentation = [_polygon(rng, width, height)]
            if k % 4 == 3:
                segmentation.append(_polygon(rng, width, height))
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 4)),
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": c, "name": name} for c, name in ((1, "a"), (2, "b"), (3, "c"))]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images in the generated dataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the dataset to time")
    parser.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), default="hflip")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        json_path = make_dataset(folder, args.images)
        print(f"generated {args.images} 640x480 JPEGs in {time.perf_counter() - start:.1f} s")
        dataset = CocoDataset(folder / "images", json_path, transforms=AUGMENTATIONS[args.augmentation]())
        datamodule = InstanceDataModule(
            dataset,
            dataset,
            batch_size=args.batch_size,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
        )
        loader = datamodule.train_dataloader()
        warmup = 2 * max(1, args.workers)  # batches while the workers start
        count, timed_images, start = 0, 0, None
        for _ in range(args.epochs):
            for images, targets in loader:  # noqa: B007 (the last batch is read below)
                count += 1
                if count == warmup:
                    start = time.perf_counter()
                elif count > warmup:
                    timed_images += len(images)
        elapsed = time.perf_counter() - start
        per_image = sum(len(t["labels"]) for t in targets) / max(1, len(targets))
        print(
            f"{timed_images / elapsed:.1f} images/s  ({timed_images} images in {elapsed:.2f} s; "
            f"workers={args.workers}, batch={args.batch_size}, augmentation={args.augmentation}, "
            f"~{per_image:.1f} instances/image in the last batch)"
        )


if __name__ == "__main__":
    main()
