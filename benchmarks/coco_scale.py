"""COCO at full scale: how long the dataset takes to build, what it holds, and what DataLoader workers copy.

Generates a COCO-format json of COCO 2017 train's size (by default 118,287 images, ~860k annotations: 8-42-vertex
polygons, some in two parts, 1% crowd regions as uncompressed RLE, 1% images without annotations; 502 MiB, a
little more polygon text than ``instances_train2017.json``'s 448 MB) with every image file an empty placeholder, then measures:

- ``build_s``: the time ``CocoDataset`` takes to read, check and store the json (the training settings of
  ``configs/data/coco.yaml``: all classes, images without annotations left out, files checked);
- the main process's resident memory before and after the build (after ``gc.collect()``) and its peak;
- the private memory (``Private_Clean + Private_Dirty`` of ``/proc/<pid>/smaps_rollup``) of each DataLoader
  worker while they serve ``--serve`` shuffled images (one epoch by default): its growth per 1,000 images a
  worker served, between a quarter of the run and its end. A worker that copies the annotations as it reads them
  grows by the size of the records it read; one that reads them from a buffer it never writes stays flat;
- ``items_per_s``: images served per second by the workers: ``dataset[i]`` in full (record, polygon rasterising,
  masks, boxes, targets) except that the image read returns a zero array of the json's size (no file is
  decoded), and only the small target fields travel back (not the image and masks).

::

    python benchmarks/coco_scale.py --out benchmarks/coco_scale.json           # full size
    python benchmarks/coco_scale.py --images 2000 --serve 1000 --out small.json

The json is written once per ``--workdir`` and reused (``--regenerate`` writes it again). Generation runs in a child
process, so none of its memory shows in the main process's numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mrcnn.data.coco
from mrcnn.data.coco import CocoDataset

# COCO 2017's 80 category ids: 1..90 without the 10 ids it never used.
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
# (height, width) of the generated images and how often each occurs: COCO's common shapes.
IMAGE_SHAPES = [(480, 640), (427, 640), (640, 480), (640, 427), (640, 640), (375, 500)]
SHAPE_WEIGHTS = [0.40, 0.25, 0.15, 0.10, 0.05, 0.05]
# Vertices per polygon: uniform in [8, 42], 25 on average (COCO's text per annotation).
MIN_VERTICES, MAX_VERTICES = 8, 42
TWO_PART_FRACTION = 0.1  # objects whose polygon has two parts (occluded objects)
CROWD_FRACTION = 0.01  # crowd regions (uncompressed RLE), as in COCO train
EMPTY_IMAGE_FRACTION = 0.009  # images without annotations (COCO train: 1,021 of 118,287)
ANNOTATIONS_PER_CHUNK = 20_000  # the json is written in pieces of this many annotations
TIMELINE_POINTS = 8  # worker memory samples over the run (beside the quarter and the end)


# ---------------------------------------------------------------------------- generation


def _polygons(rng: np.random.Generator, count: int, heights: np.ndarray, widths: np.ndarray) -> list[list[float]]:
    """``count`` star-shaped polygons, polygon ``i`` inside a ``heights[i] x widths[i]`` image.

    Returns:
        ``count`` lists ``[x0, y0, x1, y1, ...]`` of 2-decimal numbers (COCO's precision).
    """
    vertices = rng.integers(MIN_VERTICES, MAX_VERTICES + 1, size=count)
    radius = np.exp(rng.uniform(np.log(4), np.log(0.4 * np.minimum(heights, widths)), size=count))
    cx, cy = rng.uniform(0, widths), rng.uniform(0, heights)
    owner = np.repeat(np.arange(count), vertices)  # polygon of each vertex
    step = np.arange(len(owner)) - np.repeat(np.cumsum(vertices) - vertices, vertices)  # vertex number
    # Increasing angles without sorting: vertex j lies in the j-th of k equal sectors.
    angles = 2 * np.pi * (step + rng.uniform(0, 0.8, size=len(owner))) / vertices[owner]
    r = radius[owner] * rng.uniform(0.6, 1.0, size=len(owner))
    xs = np.clip(cx[owner] + r * np.cos(angles), 0, widths[owner] - 1)
    ys = np.clip(cy[owner] + r * np.sin(angles), 0, heights[owner] - 1)
    flat = np.stack([xs, ys], axis=1).round(2).ravel()
    return [part.tolist() for part in np.split(flat, 2 * np.cumsum(vertices)[:-1])]


def _polygon_box_and_area(parts: list[list[float]]) -> tuple[list[float], float]:
    """The xywh box around all parts and their summed shoelace area."""
    coords = np.concatenate([np.asarray(p).reshape(-1, 2) for p in parts])
    low, high = coords.min(axis=0), coords.max(axis=0)
    area = 0.0
    for part in parts:
        x, y = np.asarray(part[0::2]), np.asarray(part[1::2])
        area += 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return [
        round(float(low[0]), 2),
        round(float(low[1]), 2),
        round(float(high[0] - low[0]), 2),
        round(float(high[1] - low[1]), 2),
    ], round(area, 2)


def _crowd_rle(rng: np.random.Generator, height: int, width: int) -> tuple[dict, list[int], int]:
    """A rectangular crowd region as COCO stores it (uncompressed RLE over column-major pixels).

    Returns:
        ``(segmentation, xywh box, area)``.
    """
    box_h, box_w = int(rng.integers(20, height // 2)), int(rng.integers(20, width // 2))
    y0, x0 = int(rng.integers(0, height - box_h)), int(rng.integers(0, width - box_w))
    # Zeros up to the first pixel, then per column box_h ones and height - box_h zeros, then the rest.
    counts = [x0 * height + y0] + [box_h, height - box_h] * (box_w - 1) + [box_h]
    counts.append(height * width - sum(counts))
    return {"size": [height, width], "counts": counts}, [x0, y0, box_w, box_h], box_h * box_w


def _image_entries(rng: np.random.Generator, num_images: int) -> tuple[list[dict], np.ndarray]:
    """COCO ``images`` entries (ids 1..N, all of COCO's fields) and their ``(height, width)`` int32 ``[N, 2]``."""
    shapes = np.asarray(IMAGE_SHAPES)[rng.choice(len(IMAGE_SHAPES), size=num_images, p=SHAPE_WEIGHTS)]
    images = []
    for i, (height, width) in enumerate(shapes.tolist()):
        name = f"{i + 1:012d}.jpg"
        images.append(
            {
                "license": int(rng.integers(1, 9)),
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                "height": height,
                "width": width,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm4.staticflickr.com/1/{i}_x.jpg",
                "id": i + 1,
            }
        )
    return images, shapes.astype(np.int32)


def _annotations(rng: np.random.Generator, image_ids: np.ndarray, shapes: np.ndarray, first_id: int) -> list[dict]:
    """COCO annotations for the images ``image_ids`` (one per entry; ``shapes`` their ``(height, width)``)."""
    heights, widths = shapes[:, 0].astype(np.float64), shapes[:, 1].astype(np.float64)
    polygons = _polygons(rng, len(image_ids), heights, widths)
    two_part = rng.random(len(image_ids)) < TWO_PART_FRACTION
    second = iter(_polygons(rng, int(two_part.sum()), heights[two_part], widths[two_part]))
    crowd = rng.random(len(image_ids)) < CROWD_FRACTION
    categories = rng.choice(COCO_CATEGORY_IDS, size=len(image_ids))
    annotations = []
    for k, image_id in enumerate(image_ids.tolist()):
        height, width = int(shapes[k, 0]), int(shapes[k, 1])
        if crowd[k]:
            segmentation, box, area = _crowd_rle(rng, height, width)
        else:
            segmentation = [polygons[k], next(second)] if two_part[k] else [polygons[k]]
            box, area = _polygon_box_and_area(segmentation)
        annotations.append(
            {
                "segmentation": segmentation,
                "area": area,
                "iscrowd": int(crowd[k]),
                "image_id": image_id,
                "bbox": box,
                "category_id": int(categories[k]),
                "id": first_id + k,
            }
        )
    return annotations


def write_coco_json(path: Path, num_images: int, annotations_per_image: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """Writes a COCO-train-like json to ``path``, in pieces (the whole text is never held at once).

    Args:
        path: the json to write.
        num_images: images; ids ``1..num_images``, files ``{id:012d}.jpg``.
        annotations_per_image: mean of the Poisson number of annotations of an image with annotations.
        seed: the generator's seed (same seed, same file).

    Returns:
        ``(shapes, annotations)``: ``(height, width)`` of every image, int32 ``[num_images, 2]`` (row
        ``id - 1``), and the number of annotations written.
    """
    rng = np.random.default_rng(seed)
    images, shapes = _image_entries(rng, num_images)
    counts = rng.poisson(annotations_per_image, size=num_images)
    counts[rng.random(num_images) < EMPTY_IMAGE_FRACTION] = 0
    owners = np.repeat(np.arange(num_images), counts)  # image index of each annotation, grouped by image
    rng.shuffle(owners)  # COCO's annotation list is not grouped by image
    categories = [{"supercategory": "thing", "id": c, "name": f"category_{c}"} for c in COCO_CATEGORY_IDS]
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"info": {"description": "generated by benchmarks/coco_scale.py"}, "licenses": [], "images": ')
        f.write(json.dumps(images))
        f.write(', "annotations": [')
        for start in range(0, len(owners), ANNOTATIONS_PER_CHUNK):
            chunk = owners[start : start + ANNOTATIONS_PER_CHUNK]
            text = json.dumps(_annotations(rng, chunk + 1, shapes[chunk], first_id=start + 1))
            f.write(("," if start else "") + text[1:-1])
        f.write('], "categories": ' + json.dumps(categories) + "}")
    return shapes, len(owners)


def write_placeholders(image_dir: Path, num_images: int) -> None:
    """One empty file per image (``{id:012d}.jpg``): the dataset's file check passes, nothing is decoded."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in range(1, num_images + 1):
        (image_dir / f"{image_id:012d}.jpg").touch()


def _generate(json_path: Path, sizes_path: Path, image_dir: Path, args: argparse.Namespace) -> None:
    shapes, annotations = write_coco_json(json_path, args.images, args.annotations_per_image, args.seed)
    write_placeholders(image_dir, args.images)
    np.savez(sizes_path, shapes=shapes, annotations=annotations)


def prepare_data(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path, np.ndarray, int]:
    """The json, image folder, image sizes and annotation count in ``workdir``; generated unless already there.

    Generation runs in a child process, which keeps its gigabytes of Python objects out of the measured one.
    """
    tag = f"coco_{args.images}_{args.annotations_per_image:g}_{args.seed}"
    json_path, sizes_path, image_dir = workdir / f"{tag}.json", workdir / f"{tag}_sizes.npz", workdir / "images"
    if args.regenerate or not (json_path.is_file() and sizes_path.is_file()):
        start = time.perf_counter()
        process = multiprocessing.get_context("fork").Process(
            target=_generate, args=(json_path, sizes_path, image_dir, args)
        )
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"generating {json_path} failed (exit code {process.exitcode})")
        mib = json_path.stat().st_size / 2**20
        print(f"generated {json_path} ({mib:.0f} MiB) in {time.perf_counter() - start:.0f} s")
    with np.load(sizes_path) as saved:
        return json_path, image_dir, saved["shapes"], int(saved["annotations"])


# ---------------------------------------------------------------------------- measuring


def _status_kib(pid: int | str, key: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size in MiB."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident set size (``VmHWM``) in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def private_mib(pid: int) -> float:
    """Memory only this process maps (``Private_Clean + Private_Dirty`` of ``smaps_rollup``, the USS) in MiB.

    Pages a forked worker still shares with its parent are not counted; pages it copied on write are.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def forked_children(parent: int) -> list[int]:
    """Pids of ``parent``'s child processes with its own command line (forked DataLoader workers)."""
    own = Path(f"/proc/{parent}/cmdline").read_bytes()
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and (entry / "cmdline").read_bytes() == own:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
    return sorted(children)


def placeholder_reader(sizes: np.ndarray):
    """A stand-in for ``read_image``: a zero image of the json's size for ``{id:012d}.jpg``, no file read.

    Args:
        sizes: int32 ``[N, 2]`` ``(height, width)`` of image id ``i + 1`` in row ``i`` (one array, so the
            workers share it without copying).
    """

    def read(path: str | os.PathLike, limits=None) -> np.ndarray:  # read_image's signature; no limits to check
        height, width = sizes[int(Path(path).stem) - 1]
        return np.zeros((height, width, 3), dtype=np.uint8)

    return read


class SmallTargets(torch.utils.data.Dataset):
    """``dataset[i]`` computed in full in the worker, only its small target fields sent back.

    The image (a zero placeholder) and the masks are dropped in the worker: sending megabytes of tensors
    through shared memory would time the transport, not the annotation handling.
    """

    KEYS = ("boxes", "labels", "iscrowd", "area", "image_id")

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        _, target = self.dataset[index]
        return {key: target[key] for key in self.KEYS}


def build(json_path: Path, image_dir: Path) -> tuple[CocoDataset, dict]:
    """Builds the training dataset as ``configs/data/coco.yaml`` does; its time and the main process's memory."""
    gc.collect()
    before = rss_mib()
    start = time.perf_counter()
    dataset = CocoDataset(image_dir, json_path, drop_images_without_annotations=True)
    build_s = time.perf_counter() - start
    gc.collect()
    after = rss_mib()
    return dataset, {
        "build_s": round(build_s, 2),
        "main_rss_before_build_mib": round(before, 1),
        "main_rss_after_build_mib": round(after, 1),
        "main_build_growth_mib": round(after - before, 1),
        "main_peak_rss_mib": round(peak_rss_mib(), 1),
    }


def serve(dataset: CocoDataset, num_items: int, workers: int, batch_size: int, seed: int) -> dict:
    """Serves ``num_items`` shuffled items with ``workers`` worker processes; their private memory along the way.

    Memory is sampled after the first batch, when the main process has received a quarter of the items, at
    ``TIMELINE_POINTS`` evenly spaced points and when the last batch has arrived (before the loader stops its
    workers). Workers take batches in turn, so each served about ``items / workers`` of the items between two
    samples.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (worker memory is what is measured), got {workers}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_items].tolist()
    loader = torch.utils.data.DataLoader(
        SmallTargets(dataset), batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=list
    )
    quarter_mark = num_items // 4
    marks = sorted({quarter_mark, num_items, *(num_items * k // TIMELINE_POINTS for k in range(1, TIMELINE_POINTS))})
    timeline, received, pids, start, elapsed = [], 0, [], 0.0, 0.0
    for targets in loader:
        received += len(targets)
        if not pids:  # the workers are up: time and measure from the first batch on
            start, pids = time.perf_counter(), forked_children(os.getpid())
            timeline.append((received, [private_mib(pid) for pid in pids]))
        while marks and received >= marks[0]:
            marks.pop(0)
            timeline.append((received, [private_mib(pid) for pid in pids]))
        if received == num_items:  # the last batch: the workers have served everything and still run
            elapsed = time.perf_counter() - start
    quarter_items, quarter = next((n, mib) for n, mib in timeline if n >= quarter_mark)
    end = timeline[-1][1]
    thousands_per_worker = (received - quarter_items) / len(pids) / 1000
    growth = [(e - q) / thousands_per_worker for e, q in zip(end, quarter)] if thousands_per_worker else []
    return {
        "items_served": received,
        "serve_s": round(elapsed, 2),
        "items_per_s": round((received - timeline[0][0]) / elapsed, 1) if elapsed > 0 else None,
        "workers_found": len(pids),
        "worker_private_mib_start": [round(m, 1) for m in timeline[0][1]],
        "worker_private_mib_quarter": [round(m, 1) for m in quarter],
        "worker_private_mib_end": [round(m, 1) for m in end],
        "worker_growth_mib_per_1000_images": [round(g, 2) for g in growth],
        "worker_growth_mib_per_1000_images_mean": round(float(np.mean(growth)), 2) if growth else None,
        "timeline": [{"items": n, "worker_private_mib": [round(m, 1) for m in mib]} for n, mib in timeline],
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _print_table(results: dict) -> None:
    r = results
    rows = [
        ("json", f"{r['images']:,} images, {r['annotations']:,} annotations, {r['json_mib']:.0f} MiB"),
        ("build", f"{r['build_s']:.1f} s"),
        (
            "main RSS after build",
            (
                f"{r['main_rss_after_build_mib']:.0f} MiB (+{r['main_build_growth_mib']:.0f} MiB; "
                f"peak {r['main_peak_rss_mib']:.0f} MiB)"
            ),
        ),
        ("served", f"{r['items_served']:,} images, {r['workers']} workers, {r['items_per_s']} images/s"),
        (
            "worker private MiB",
            (
                f"start {r['worker_private_mib_start']}, quarter {r['worker_private_mib_quarter']}, "
                f"end {r['worker_private_mib_end']}"
            ),
        ),
        (
            "worker growth / 1,000 images",
            (f"{r['worker_growth_mib_per_1000_images']} MiB (mean {r['worker_growth_mib_per_1000_images_mean']})"),
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=118_287, help="images in the json (COCO 2017 train: 118,287)")
    parser.add_argument(
        "--annotations-per-image",
        type=float,
        default=7.33,
        help="mean annotations of an image that has any (7.33: ~860k at full size)",
    )
    parser.add_argument("--serve", type=int, default=None, help="images the workers serve (default: one epoch)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the json and placeholders go (kept; default: a temporary folder)",
    )
    parser.add_argument("--regenerate", action="store_true", help="write the json again even if --workdir has it")
    parser.add_argument("--label", default="", help="a name for this run in the results (e.g. before / after)")
    parser.add_argument("--out", type=Path, default=None, help="write the results json here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        json_path, image_dir, sizes, num_annotations = prepare_data(workdir, args)
        # Worker processes inherit the stand-in (fork): no image file is opened, only annotations are handled.
        mrcnn.data.coco.read_image = placeholder_reader(sizes)
        dataset, built = build(json_path, image_dir)
        num_items = min(args.serve or len(dataset), len(dataset))
        served = serve(dataset, num_items, args.workers, args.batch_size, args.seed)
        results = {
            "label": args.label,
            "git_commit": _git_commit(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "images": args.images,
            "annotations": num_annotations,
            "json_mib": round(json_path.stat().st_size / 2**20, 1),
            "dataset_images": len(dataset),
            "workers": args.workers,
            "batch_size": args.batch_size,
            **built,
            **served,
            "main_rss_end_mib": round(rss_mib(), 1),
        }
    _print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
