"""COCO-format data: loading, the data contract, AP equal to pycocotools on the json (bad input: test_bad_input.py)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data.coco import CocoDataset
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.data.transforms import train_transforms
from mrcnn.evaluation import STAT_NAMES, CocoEvaluator
from tests.helpers.data import CATEGORIES, IMAGE_SIZES, make_coco_split


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    return make_coco_split(tmp_path_factory.mktemp("coco"))


def _json(path):
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------- contract


def test_labels_categories_and_contract(coco_split):
    json_path, image_dir = coco_split
    data = _json(json_path)
    dataset = CocoDataset(image_dir, json_path)
    # Categories sorted by id -> labels 1..K; the map goes back to the json's ids.
    assert dataset.class_names == ["person", "car", "dog", "toothbrush"]
    assert dataset.label_to_category_id == {1: 1, 2: 3, 3: 18, 4: 90}
    assert dataset.num_classes == 4 and len(dataset) == len(IMAGE_SIZES)
    assert dataset.image_ids == [im["id"] for im in data["images"]]
    assert dataset.image_sizes == list(IMAGE_SIZES)
    assert not dataset.skipped and not dataset.repaired

    names = {c["id"]: c["name"] for c in CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_path)
    for index, info in enumerate(data["images"]):
        image, target = dataset[index]
        height, width = info["height"], info["width"]
        assert image.shape == (3, height, width) and image.dtype == torch.float32
        assert target["image_id"] == info["id"]
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        n = len(anns)
        # Training targets: no crowd region, json order, masks equal to pycocotools' own decoding.
        assert target["masks"].shape == (n, height, width) and target["masks"].dtype == torch.uint8
        assert (target["iscrowd"] == 0).all()
        assert [dataset.class_names[label - 1] for label in target["labels"].tolist()] == [
            names[a["category_id"]] for a in anns
        ]
        for mask, ann in zip(target["masks"], anns):
            assert np.array_equal(mask.numpy(), coco.annToMask(ann))
        boxes = target["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        # Boxes are the masks' tight boxes, which here are the json's (mask) boxes.
        expected = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(n, 4)
        expected[:, 2:] += expected[:, :2]
        assert torch.equal(boxes, expected)
        assert torch.equal(target["area"], torch.tensor([a["area"] for a in anns], dtype=torch.float32))


def test_include_crowd_and_classes_subset(coco_split):
    json_path, image_dir = coco_split
    data = _json(json_path)
    with_crowd = CocoDataset(image_dir, json_path, include_crowd=True)
    _, target = with_crowd[0]
    crowd = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"] and a["iscrowd"]]
    assert int(target["iscrowd"].sum()) == len(crowd) == 1

    subset = CocoDataset(image_dir, json_path, classes=["dog", "person"])
    assert subset.class_names == ["dog", "person"]
    assert subset.label_to_category_id == {1: 18, 2: 1}
    others = sum(a["category_id"] not in (1, 18) for a in data["annotations"])
    assert subset.skipped == {"category not in classes": others}
    assert {c["id"] for c in subset.coco_gt.dataset["categories"]} == {1, 18}
    with pytest.raises(ValueError, match="unicorn"):
        CocoDataset(image_dir, json_path, classes=["dog", "unicorn"])


def test_drop_images_without_annotations(coco_split):
    json_path, image_dir = coco_split
    dataset = CocoDataset(image_dir, json_path, drop_images_without_annotations=True)
    assert len(dataset) == len(IMAGE_SIZES) - 1
    assert dataset.skipped_images == {"no usable non-crowd annotation": 1}
    # The evaluation ground truth still lists every image.
    assert len(dataset.coco_gt.dataset["images"]) == len(IMAGE_SIZES)


def test_hflip_keeps_crowd_flags_in_step(coco_split):
    json_path, image_dir = coco_split
    plain = CocoDataset(image_dir, json_path, include_crowd=True)
    flipped = CocoDataset(image_dir, json_path, include_crowd=True, transforms=train_transforms(hflip_prob=1.0))
    for index in range(len(plain)):
        (image, target), (image_f, target_f) = plain[index], flipped[index]
        assert torch.equal(image_f, image.flip(-1))
        assert torch.equal(target_f["masks"], target["masks"].flip(-1))
        assert torch.equal(target_f["iscrowd"], target["iscrowd"])
        assert torch.equal(target_f["labels"], target["labels"])


# ------------------------------------------------------------------- evaluation


def _predictions(json_path, seed=1):
    """Noisy detections in the json's category ids: shifted GT masks, wrong classes, false positives, hits on crowds."""
    rng = np.random.default_rng(seed)
    data = _json(json_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_path)
    category_ids = [c["id"] for c in data["categories"]]
    results = []
    for info in data["images"]:
        height, width = info["height"], info["width"]
        masks, categories = [], []
        for ann in coco.imgToAnns[info["id"]]:
            mask = coco.annToMask(ann)
            if ann["iscrowd"]:
                mask = np.zeros_like(mask)
                mask[4:12, 5:20] = 1  # a detection inside the crowd region: ignored, not a false positive
            elif rng.random() < 0.2:
                continue  # missed
            dy, dx = rng.integers(-1, 2, size=2)
            masks.append(np.roll(mask, (dy, dx), axis=(0, 1)))
            categories.append(ann["category_id"] if rng.random() < 0.85 else int(rng.choice(category_ids)))
        for _ in range(rng.integers(1, 3)):  # false positives, also on the image without annotations
            mask = np.zeros((height, width), dtype=np.uint8)
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
            mask[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = 1
            masks.append(mask)
            categories.append(int(rng.choice(category_ids)))
        for mask, category in zip(masks, categories):
            if not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask))
            box = mask_utils.toBbox(rle).tolist()
            box[2] += float(rng.integers(0, 2))  # box and mask predictions differ a little
            rle["counts"] = rle["counts"].decode("ascii")
            score = float(np.float32(rng.uniform(0.05, 1.0)))
            results.append(
                {
                    "image_id": info["id"],
                    "category_id": category,
                    "segmentation": rle,
                    "bbox": box,
                    "score": score,
                    "mask": mask,
                }
            )
    return results


def _pycocotools_stats(json_path, results):
    """pycocotools run directly on the json file."""
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        for iou_type, key in (("bbox", "bbox"), ("segm", "segmentation")):
            dts = gt.loadRes(
                [
                    {"image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"]}
                    for r in results
                ]
            )
            evaluator = COCOeval(gt, dts, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats.update({f"{iou_type}_{name}": float(evaluator.stats[i]) for i, name in enumerate(STAT_NAMES)})
    return stats


def _to_model_outputs(results, class_names):
    """Results in category ids -> per image_id model-style predictions in labels 1..K (mapped by name)."""
    names = {c["id"]: c["name"] for c in CATEGORIES}
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    outputs = {}
    for image_id, rs in by_image.items():
        boxes = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        outputs[image_id] = {
            "boxes": boxes.float(),
            "labels": torch.tensor([class_names.index(names[r["category_id"]]) + 1 for r in rs]),
            "scores": torch.tensor([r["score"] for r in rs], dtype=torch.float32),
            "masks": torch.from_numpy(np.stack([r["mask"] for r in rs])),
        }
    return outputs


def _evaluate_through_datamodule(datamodule, results):
    outputs = _to_model_outputs(results, datamodule.val_dataset.class_names)
    evaluator = CocoEvaluator(**datamodule.evaluator_kwargs("val"))
    for _, targets in datamodule.val_dataloader():
        evaluator.update([outputs[t["image_id"]] for t in targets], list(targets))
    return evaluator


@pytest.mark.parametrize("ground_truth", ["json", "targets"])
def test_ap_equals_pycocotools_on_the_json(coco_split, ground_truth):
    """json -> dataset -> targets -> CocoEvaluator gives pycocotools' numbers on the json itself.

    The data has crowd regions (with detections on them), an image without
    annotations and category ids with gaps. ``json``: the evaluator uses the
    dataset's json ground truth (COCO, coco_format). ``targets``: it builds the
    ground truth from targets that keep crowd regions (Cityscapes' path); equal here
    because this json's areas and boxes are the masks'.
    """
    json_path, image_dir = coco_split
    results = _predictions(json_path)
    val = CocoDataset(image_dir, json_path, include_crowd=ground_truth == "targets")
    if ground_truth == "targets":
        val.coco_gt = None  # evaluate from the targets
    datamodule = InstanceDataModule(train_dataset=val, val_dataset=val, batch_size=2, val_batch_size=4)
    evaluator = _evaluate_through_datamodule(datamodule, results)
    ours = evaluator.compute()
    reference = _pycocotools_stats(json_path, results)
    # Non-trivial numbers (neither 0 nor perfect), so a mismatch in any detail would show.
    assert 0.1 < reference["segm_AP"] < 0.9 and 0.1 < reference["bbox_AP"] < 0.9, reference
    assert set(ours) == set(reference)
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], abs=1e-6), key


def test_results_json_uses_the_datasets_category_ids(coco_split, tmp_path):
    json_path, image_dir = coco_split
    results = _predictions(json_path)
    val = CocoDataset(image_dir, json_path)
    datamodule = InstanceDataModule(train_dataset=val, val_dataset=val, batch_size=2)
    evaluator = _evaluate_through_datamodule(datamodule, results)
    out = evaluator.results_json()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(out))
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = COCO(str(json_path)).loadRes(str(path))
    assert len(loaded.anns) == len(results)
    expected = sorted((r["image_id"], r["category_id"], round(r["score"], 6)) for r in results)
    got = sorted((r["image_id"], r["category_id"], round(r["score"], 6)) for r in out)
    assert got == expected
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(out[0])


def test_detections_in_evaluation_do_not_depend_on_the_batch_size(coco_split):
    # Padding to a batch's largest image reaches GroupNorm's statistics (model=tiny normalises with it): evaluation
    # batches images of one size, so each image's detections are those of a batch of one, whatever the batch size.
    from mrcnn.data.samplers import SameSizeBatches
    from mrcnn.engine.build import build_module
    from tests.helpers.config import TINY_MODEL, compose_config

    torch.manual_seed(0)
    # At 128 px the split's landscape 48x64 images become 96x128, its portrait ones 128x96.
    model = build_module(compose_config([*TINY_MODEL, "data.image_size=128", "model.num_classes=3"])).model.eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model's detections, all of them
    json_path, image_dir = coco_split
    dataset = CocoDataset(image_dir, json_path)

    def detections(datamodule):
        found = {}
        with torch.no_grad():
            for images, targets in datamodule.val_dataloader():
                for target, output in zip(targets, model(list(images))[0]):
                    found[int(target["image_id"])] = output
        return found

    alone, grouped = (
        detections(InstanceDataModule(dataset, dataset, batch_size=1, val_batch_size=n, num_workers=0)) for n in (1, 4)
    )
    assert isinstance(
        InstanceDataModule(dataset, dataset, val_batch_size=4).val_dataloader().batch_sampler, SameSizeBatches
    )
    assert alone.keys() == grouped.keys() == set(dataset.image_ids)
    for image_id, output in alone.items():
        # Compared as sorted lists: two near-equal scores may swap places with the last bit of a sum.
        for key in ("scores", "labels"):
            torch.testing.assert_close(grouped[image_id][key].sort()[0], output[key].sort()[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grouped[image_id]["boxes"].sum(0), output["boxes"].sum(0), rtol=1e-4, atol=1e-2)
    # The premise: a landscape image in a batch with a portrait one, both padded to a square, is detected otherwise.
    images = [dataset[i][0] for i in (0, 1)]
    with torch.no_grad():
        mixed, _ = model(images)
    assert not torch.allclose(mixed[0]["scores"][:10], alone[dataset.image_ids[0]]["scores"][:10], atol=1e-3)
