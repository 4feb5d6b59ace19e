"""Tests for mrcnn.evaluation.CocoEvaluator.

The reference numbers come from pycocotools run by hand on json files, so the
evaluator is checked against the tool everyone quotes, not against itself.
"""

import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn import evaluation
from mrcnn.evaluation import STAT_NAMES, CocoEvaluator
from tests.helpers.host_syncs import SyncCounter, count_host_syncs, counting_host_syncs

KEYS = [f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES]
MAPPING = {1: 1, 2: 7, 3: 90}


# ------------------------------------------------------------------ synthetic data


def _ellipse(height, width, box):
    """uint8 [H, W] ellipse inscribed in box xyxy (so mask area < box area)."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1).astype(np.uint8)


def _random_box(rng, height, width, min_size=4):
    # Log-uniform side lengths cover COCO's small (<32^2), medium and large (>96^2).
    w = int(min(width - 1, math.exp(rng.uniform(math.log(min_size), math.log(width)))))
    h = int(min(height - 1, math.exp(rng.uniform(math.log(min_size), math.log(height)))))
    x1 = int(rng.integers(0, width - w))
    y1 = int(rng.integers(0, height - h))
    return [x1, y1, x1 + w, y1 + h]


def _boxes_from_masks(masks):
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def make_data(seed=0, num_images=7, empty_image=2, num_classes=3):
    """Random images with GT (some crowd) and noisy predictions (some false positives).

    Returns:
        list of (target, prediction) per image, image ids not contiguous.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(num_images):
        height, width = int(rng.integers(90, 140)), int(rng.integers(90, 140))
        image_id = 10 + 7 * index
        n = 0 if index == empty_image else int(rng.integers(1, 7))
        boxes = [_random_box(rng, height, width) for _ in range(n)]
        if n and index % 3 == 0:
            boxes[0] = [2, 3, width - 2, height - 1]  # a large object (area > 96^2)
        gt_masks = [_ellipse(height, width, box) for box in boxes]
        # Keep only masks that are not empty after rasterising.
        gt_masks = np.array([m for m in gt_masks if m.any()], dtype=np.uint8).reshape(-1, height, width)
        n = len(gt_masks)
        labels = rng.integers(1, num_classes + 1, size=n)
        iscrowd = (rng.random(n) < 0.15).astype(np.int64)
        target = {
            "boxes": _boxes_from_masks(gt_masks),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "masks": torch.as_tensor(gt_masks),
            "iscrowd": torch.as_tensor(iscrowd),
            "area": torch.as_tensor(gt_masks.sum(axis=(1, 2)), dtype=torch.float32),
            # Both forms of image_id occur in practice.
            "image_id": image_id if index % 2 else torch.tensor(image_id),
        }

        pred_masks, pred_labels = [], []
        for i in range(n):
            if rng.random() < 0.2:
                continue  # missed detection
            ys, xs = np.nonzero(gt_masks[i])
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            jitter = rng.integers(-3, 4, size=4)
            box = np.clip(np.array(box) + jitter, 0, [width, height, width, height])
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            pred_masks.append(_ellipse(height, width, box))
            label = labels[i] if rng.random() < 0.85 else rng.integers(1, num_classes + 1)
            pred_labels.append(label)
        for _ in range(int(rng.integers(1, 4))):  # false positives
            pred_masks.append(_ellipse(height, width, _random_box(rng, height, width)))
            pred_labels.append(rng.integers(1, num_classes + 1))
        keep = [i for i, m in enumerate(pred_masks) if m.any()]
        pred_masks = np.stack([pred_masks[i] for i in keep])
        pred_labels = [pred_labels[i] for i in keep]
        m = len(pred_masks)
        # Probabilities that binarise (at 0.5) back to the ellipses.
        inside, outside = rng.uniform(0.55, 1.0, pred_masks.shape), rng.uniform(0.0, 0.45, pred_masks.shape)
        probs = np.where(pred_masks, inside, outside)
        prediction = {
            "boxes": _boxes_from_masks(pred_masks) + torch.as_tensor(rng.uniform(-0.5, 0.5, (m, 4))).float(),
            "labels": torch.as_tensor(np.array(pred_labels), dtype=torch.int64),
            "scores": torch.as_tensor(rng.random(m), dtype=torch.float32),
            "masks": torch.as_tensor(probs, dtype=torch.float32)[:, None],
        }
        samples.append((target, prediction))
    return samples


def perfect_predictions(samples, mask_format="float"):
    """Predictions equal to the non-crowd GT, score 1."""
    out = []
    for target, _ in samples:
        keep = target["iscrowd"] == 0
        masks = target["masks"][keep]
        if mask_format == "float":
            masks = masks.float()[:, None]
        out.append(
            {
                "boxes": target["boxes"][keep],
                "labels": target["labels"][keep],
                "scores": torch.ones(int(keep.sum())),
                "masks": masks,
            }
        )
    return out


# ---------------------------------------------------------- reference via pycocotools


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_gt_json(samples, path, mapping=None):
    mapping = mapping or {1: 1, 2: 2, 3: 3}
    images, annotations = [], []
    for target, _ in samples:
        image_id = int(target["image_id"])
        height, width = target["masks"].shape[-2:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for box, label, mask, crowd, area in zip(
            target["boxes"].tolist(),
            target["labels"].tolist(),
            target["masks"].numpy(),
            target["iscrowd"].tolist(),
            target["area"].tolist(),
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": mapping[label],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": area,
                    "iscrowd": crowd,
                    "segmentation": _rle(mask),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in sorted(mapping.values())]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_results_json(samples, path, iou_type, mapping=None):
    mapping = mapping or {1: 1, 2: 2, 3: 3}
    results = []
    for target, pred in samples:
        image_id = int(target["image_id"])
        masks = (pred["masks"][:, 0] > 0.5).numpy()
        columns = (pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist(), masks)
        for box, label, score, mask in zip(*columns):
            result = {"image_id": image_id, "category_id": mapping[label], "score": score}
            if iou_type == "bbox":
                result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                result["segmentation"] = _rle(mask)
            results.append(result)
    path.write_text(json.dumps(results))
    return path


def reference_metrics(samples, tmp_path, mapping=None):
    gt_path = write_gt_json(samples, tmp_path / "gt.json", mapping)
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        for iou_type in ("bbox", "segm"):
            res_path = write_results_json(samples, tmp_path / f"res_{iou_type}.json", iou_type, mapping)
            coco_dt = coco_gt.loadRes(str(res_path))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for i, name in enumerate(STAT_NAMES):
                metrics[f"{iou_type}_{name}"] = float(ev.stats[i])
    return metrics


def evaluate(samples, batch_size=2, **kwargs):
    evaluator = CocoEvaluator(**kwargs)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        evaluator.update([p for _, p in batch], [t for t, _ in batch])
    return evaluator.compute(), evaluator


def assert_same(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-6), key


# -------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def samples():
    return make_data(seed=5)


@pytest.mark.parametrize("mask_format", ["float", "uint8"])
def test_perfect_predictions_give_ap_one(samples, mask_format):
    predictions = perfect_predictions(samples, mask_format)
    evaluator = CocoEvaluator()
    evaluator.update(predictions, [t for t, _ in samples])
    metrics = evaluator.compute()
    assert set(metrics) == set(KEYS)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0)
        for name in ("APs", "APm", "APl"):
            # -1 is pycocotools' "no ground truth of this size".
            assert metrics[f"{iou_type}_{name}"] in (pytest.approx(1.0), -1.0)


def test_false_positive_on_image_without_gt_counts(samples):
    # The empty image must be registered, or this detection would be dropped.
    predictions = perfect_predictions(samples)
    empty = next(i for i, (t, _) in enumerate(samples) if len(t["labels"]) == 0)
    h, w = samples[empty][0]["masks"].shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., 5:30, 5:30] = 1.0
    predictions[empty] = {
        "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([2.0]),  # ranked first
        "masks": mask,
    }
    evaluator = CocoEvaluator()
    evaluator.update(predictions, [t for t, _ in samples])
    metrics = evaluator.compute()
    assert metrics["bbox_AP"] < 1.0 and metrics["segm_AP"] < 1.0


def test_matches_pycocotools_on_json(samples, tmp_path):
    expected = reference_metrics(samples, tmp_path)
    actual, _ = evaluate(samples)
    assert_same(actual, expected)
    # The data must exercise the metrics, not just produce 0, 1 or -1 everywhere.
    assert 0.1 < expected["segm_AP"] < 0.95
    assert len({round(v, 6) for v in expected.values()}) > 4


def test_category_mapping_with_gaps(samples, tmp_path):
    unmapped, _ = evaluate(samples)
    mapped, evaluator = evaluate(samples, label_to_category_id=MAPPING, class_names=["a", "b", "c"])
    assert_same(mapped, unmapped)

    results = evaluator.results_json()
    assert {r["category_id"] for r in results} <= set(MAPPING.values())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert len(results) == sum(len(p["scores"]) for _, p in samples)
    # The results list survives json and is accepted by loadRes against a json GT.
    gt_path = write_gt_json(samples, tmp_path / "gt_mapped.json", MAPPING)
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(res_path))
    assert len(coco_dt.getAnnIds()) == len(results)


def test_coco_gt_with_mapping_and_no_targets(samples, tmp_path):
    # GT from a json with COCO-style gapped ids; predictions carry their image id.
    gt_path = write_gt_json(samples, tmp_path / "gt_mapped.json", MAPPING)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    evaluator = CocoEvaluator(label_to_category_id=MAPPING, coco_gt=coco_gt)
    evaluator.update([dict(p, image_id=t["image_id"]) for t, p in samples])
    assert_same(evaluator.compute(), reference_metrics(samples, tmp_path))


def test_coco_gt_evaluates_only_seen_images(samples, tmp_path):
    gt_path = write_gt_json(samples, tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    subset = samples[:4]
    evaluator = CocoEvaluator(coco_gt=coco_gt)
    evaluator.update([p for _, p in subset], [t for t, _ in subset])
    expected, _ = evaluate(subset)
    assert_same(evaluator.compute(), expected)


def test_no_predictions(samples):
    empty_predictions = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, *t["masks"].shape[-2:]),
        }
        for t, _ in samples
    ]
    evaluator = CocoEvaluator()
    evaluator.update(empty_predictions, [t for t, _ in samples])
    metrics = evaluator.compute()
    assert evaluator.results_json() == []
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[f"{iou_type}_{name}"] == 0.0


def test_nothing_updated_does_not_crash():
    with pytest.warns(UserWarning, match="called before the ``update`` method"):  # torchmetrics says so
        metrics = CocoEvaluator().compute()
    assert set(metrics) == set(KEYS) and set(metrics.values()) == {-1.0}


def test_update_same_image_twice_counts_once(samples):
    once, single = evaluate(samples)
    evaluator = CocoEvaluator()
    # DistributedSampler-style padding: the first images come again at the end.
    padded = samples + samples[:3]
    evaluator.update([p for _, p in padded], [t for t, _ in padded])
    assert_same(evaluator.compute(), once)
    assert len(evaluator.results_json()) == len(single.results_json())


def test_update_leaves_the_callers_boxes_as_they_were(samples):
    # float64 host boxes: the conversion to COCO's xywh copies nothing, so an in-place subtraction wrote into them.
    targets = [{**t, "boxes": t["boxes"].double()} for t, _ in samples]
    predictions = [{**p, "boxes": p["boxes"].double()} for _, p in samples]
    before = [(t["boxes"].clone(), p["boxes"].clone()) for t, p in zip(targets, predictions)]
    evaluator = CocoEvaluator()
    evaluator.update(predictions, targets)
    for (target_boxes, prediction_boxes), t, p in zip(before, targets, predictions):
        assert torch.equal(t["boxes"], target_boxes) and torch.equal(p["boxes"], prediction_boxes)
    assert_same(evaluator.compute(), evaluate(samples)[0])


def test_reset(samples):
    evaluator = CocoEvaluator()
    evaluator.update([p for _, p in samples], [t for t, _ in samples])
    evaluator.reset()
    evaluator.update([p for _, p in samples[:3]], [t for t, _ in samples[:3]])
    expected, _ = evaluate(samples[:3])
    assert_same(evaluator.compute(), expected)


def test_bbox_only():
    samples = make_data(seed=1)
    targets = [{k: v for k, v in t.items() if k != "masks"} for t, _ in samples]
    predictions = [{k: v for k, v in p.items() if k != "masks"} for _, p in samples]
    evaluator = CocoEvaluator(iou_types=("bbox",))
    evaluator.update(predictions, targets)
    metrics = evaluator.compute()
    full, _ = evaluate(samples)
    assert set(metrics) == {k for k in KEYS if k.startswith("bbox")}
    assert_same(metrics, {k: v for k, v in full.items() if k.startswith("bbox")})


def test_faster_coco_eval_backend_matches(samples, tmp_path):
    pytest.importorskip("faster_coco_eval")
    reference, _ = evaluate(samples)
    faster, _ = evaluate(samples, backend="faster_coco_eval")
    assert_same(faster, reference)
    # Also with a pycocotools COCO object as coco_gt, and with no predictions.
    gt_path = write_gt_json(samples, tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    evaluator = CocoEvaluator(coco_gt=coco_gt, backend="faster_coco_eval")
    evaluator.update([p for _, p in samples], [t for t, _ in samples])
    assert_same(evaluator.compute(), reference)
    evaluator.reset()
    evaluator.update([{k: v[:0] for k, v in p.items()} for _, p in samples], [t for t, _ in samples])
    metrics = evaluator.compute()
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0


# ------------------------------------------------------------------- distributed


def _distributed_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        samples = make_data(seed=5)
        # Overlapping shards, as DistributedSampler's padding produces.
        shard = samples[:5] if rank == 0 else samples[3:]
        evaluator = CocoEvaluator()
        for start in range(0, len(shard), 2):
            batch = shard[start : start + 2]
            evaluator.update([p for _, p in batch], [t for t, _ in batch])
        metrics = evaluator.compute()
        result = {"metrics": metrics, "num_results": len(evaluator.results_json())}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes(samples, tmp_path):
    expected, single = evaluate(samples)
    mp.spawn(_distributed_worker, args=(2, tmp_path / "dist_init", tmp_path), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Exactly the single-process numbers, on every rank.
        assert result["metrics"] == expected
        assert result["num_results"] == len(single.results_json())


# ------------------------------------------------------------------------ torchmetrics


def test_is_a_torchmetrics_metric_whose_states_reset_and_merge(samples):
    from torchmetrics import Metric

    evaluator = CocoEvaluator()
    assert isinstance(evaluator, Metric)
    evaluator.update([p for _, p in samples[:3]], [t for t, _ in samples[:3]])
    assert len(evaluator.record_bytes) == 3 and evaluator.record_bytes[0].dtype == torch.uint8
    # Not part of the LightningModule's checkpoint: state-dict keys stay the model's own.
    assert evaluator.state_dict() == {}
    # merge_state (what a DDP sync does with the states) gives the numbers of one pass over all images.
    other = CocoEvaluator()
    other.update([p for _, p in samples[3:]], [t for t, _ in samples[3:]])
    evaluator.merge_state(other)
    assert_same(evaluator.compute(), evaluate(samples)[0])
    evaluator.reset()
    assert evaluator.record_bytes == [] and evaluator.results_json() == []


def test_same_ap_as_torchmetrics_mean_average_precision_where_conventions_agree():
    """torchmetrics' MeanAveragePrecision (pycocotools backend) on the same images and predictions.

    They agree on every number when each ground-truth object carries its ``area`` and ``iscrowd``, the
    predicted masks are binary and MeanAveragePrecision gets pycocotools' IoU and recall thresholds. They
    differ where conventions differ: its default thresholds are float32 ``torch.linspace`` values (0.3 as
    float32 is above 0.3, so a recall of exactly 0.3 misses that recall bin and AP moves by up to about
    1/101 per class: 0.1621 vs pycocotools' 0.1631 box AP here); without ``area``, it takes the box area
    for box AP (ours takes the mask's, as COCO's files do); it wants boolean masks (ours thresholds
    probabilities at ``mask_threshold``); and it numbers images itself, so it cannot score against a
    dataset's json by its image and category ids.
    """
    from torchmetrics.detection import MeanAveragePrecision

    samples = make_data(seed=11, num_images=8)
    targets = [t for t, _ in samples]
    predictions = [dict(p, masks=p["masks"][:, 0] > 0.5) for _, p in samples]
    ours = CocoEvaluator()
    ours.update(predictions, targets)
    ours = ours.compute()

    theirs = MeanAveragePrecision(
        iou_type=("bbox", "segm"),
        backend="pycocotools",
        # pycocotools' own (float64) thresholds, not torchmetrics' float32 defaults.
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )
    theirs.update(
        predictions,
        [
            {k: t[k] if k != "masks" else t[k].bool() for k in ("boxes", "labels", "masks", "iscrowd", "area")}
            for t in targets
        ],
    )
    theirs = theirs.compute()
    names = {
        "AP": "map",
        "AP50": "map_50",
        "AP75": "map_75",
        "APs": "map_small",
        "APm": "map_medium",
        "APl": "map_large",
    }
    for iou_type in ("bbox", "segm"):
        for ours_name, their_name in names.items():
            assert ours[f"{iou_type}_{ours_name}"] == pytest.approx(
                float(theirs[f"{iou_type}_{their_name}"]), abs=1e-6
            ), (iou_type, ours_name)
    assert 0.1 < ours["segm_AP"] < 0.95 and 0.1 < ours["bbox_AP"] < 0.95  # neither trivial nor perfect


# ---------------------------------------------------------- reads of device tensors (issue 22)


def _as_if_on_a_gpu(monkeypatch):
    # On the CPU every tensor is a host tensor: treat each as a device tensor, so that the batched copy runs.
    monkeypatch.setattr(evaluation, "_on_device", lambda value: isinstance(value, torch.Tensor))


def test_on_host_copies_a_batch_in_one_read_and_keeps_every_value(monkeypatch):
    _as_if_on_a_gpu(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    records = [
        {
            "boxes": torch.rand(3, 4, generator=generator) * 50,
            "labels": torch.tensor([1, 3, 2]),
            "scores": torch.rand(3, generator=generator).bfloat16(),
            "masks": torch.rand(3, 1, 5, 7, generator=generator),
            "image_id": torch.tensor(7),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 5, 7),
            "image_id": torch.tensor(8),
            "file_name": "b.png",
        },
        None,
        {"masks": torch.tensor([[[0, 2], [1, 0]]], dtype=torch.uint8), "labels": torch.tensor([5])},
    ]
    out, counts = count_host_syncs(evaluation.on_host, records, 0.5)
    assert dict(counts) == {"Tensor.cpu": 1}, counts.report()  # one read, whatever the number of images
    assert out[2] is None and out[1]["file_name"] == "b.png"
    for record, copied in zip(records, out):
        if record is None:
            continue
        assert copied is not record and set(copied) == set(record)
        for key, value in record.items():
            if not isinstance(value, torch.Tensor):
                continue
            expected = (value > 0.5 if value.is_floating_point() else value != 0) if key == "masks" else value
            assert copied[key].dtype == expected.dtype and copied[key].shape == expected.shape, key
            assert torch.equal(copied[key], expected), key

    without_masks = evaluation.on_host(records, None)  # box AP: device masks are not copied
    assert all(copied["masks"] is record["masks"] for record, copied in zip(records, without_masks) if record)


def test_box_ap_on_device_targets_keeps_each_images_size_from_its_masks(samples, monkeypatch):
    _as_if_on_a_gpu(monkeypatch)
    evaluator = CocoEvaluator(iou_types=("bbox",))
    evaluator.update([p for _, p in samples[:2]], [t for t, _ in samples[:2]])
    records = evaluator._records()
    for target, _ in samples[:2]:
        record = records[int(target["image_id"])]
        assert (record["height"], record["width"]) == tuple(target["masks"].shape[-2:])


def test_the_evaluator_reads_a_batch_on_the_device_once_and_scores_what_it_scores_from_the_host(samples, monkeypatch):
    expected, _ = evaluate(samples, batch_size=3)

    _as_if_on_a_gpu(monkeypatch)
    copied = set()  # ids of the tensors the batched copies made
    on_host = evaluation.on_host

    def recording_on_host(records, mask_threshold):
        out = on_host(records, mask_threshold)
        copied.update(id(v) for r in out if r is not None for v in r.values() if isinstance(v, torch.Tensor))
        return out

    def reading_only_copies(method):
        def read(self, *args):
            record = args[-1]
            assert all(id(v) in copied for v in record.values() if isinstance(v, torch.Tensor)), method.__name__
            return method(self, *args)

        return read

    monkeypatch.setattr(evaluation, "on_host", recording_on_host)
    monkeypatch.setattr(CocoEvaluator, "_results", reading_only_copies(CocoEvaluator._results))
    monkeypatch.setattr(CocoEvaluator, "_gt_annotations", reading_only_copies(CocoEvaluator._gt_annotations))
    evaluator = CocoEvaluator()
    # What reads the copies runs on the host in a GPU run too.
    per_image = tuple(("/mrcnn/evaluation.py", name) for name in ("_image_id", "_results", "_gt_annotations"))
    for start in range(0, len(samples), 3):
        batch = samples[start : start + 3]
        counts = SyncCounter(per_image)
        with counting_host_syncs(counts):
            evaluator.update([p for _, p in batch], [t for t, _ in batch])
        assert dict(counts) == {"Tensor.cpu": 2}, counts.report()  # the predictions, then the targets
    assert_same(evaluator.compute(), expected)
