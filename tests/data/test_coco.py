"""COCO-format data: loading, the data contract, bad input, and AP equal to pycocotools on the json."""

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
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
                {"image_id": info["id"], "category_id": category, "segmentation": rle, "bbox": box, "score": score,
                 "mask": mask}
            )
    return results


def _pycocotools_stats(json_path, results):
    """pycocotools run directly on the json file."""
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        for iou_type, key in (("bbox", "bbox"), ("segm", "segmentation")):
            dts = gt.loadRes([{"image_id": r["image_id"], "category_id": r["category_id"], key: r[key],
                               "score": r["score"]} for r in results])
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


# -------------------------------------------------------------------- bad input


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_missing_empty_and_malformed_json(coco_split, tmp_path):
    _, image_dir = coco_split
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(image_dir, tmp_path / "nope.json")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.json is empty"):
        CocoDataset(image_dir, empty)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        CocoDataset(image_dir, broken)
    no_annotations = _write_json(tmp_path / "no_ann.json", {"images": [], "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(ValueError, match=r"no_ann\.json has no 'annotations' list"):
        CocoDataset(image_dir, no_annotations)
    bad_image = _write_json(
        tmp_path / "bad_image.json",
        {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": [{"id": 1, "name": "a"}]},
    )
    with pytest.raises(ValueError, match=r"bad_image\.json.*lacks \['height', 'width'\]"):
        CocoDataset(image_dir, bad_image)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoDataset(tmp_path / "missing_dir", coco_split[0])


def test_bad_annotations_are_skipped_counted_and_reported(coco_split, tmp_path, caplog):
    json_path, image_dir = coco_split
    data = _json(json_path)
    image = data["images"][0]
    good = dict(data["annotations"][0])
    base = {"image_id": image["id"], "category_id": 1, "iscrowd": 0, "area": 10.0,
            "segmentation": [[1, 1, 10, 1, 10, 10]], "bbox": [1, 1, 9, 9]}
    bad = [
        dict(base, id=9001, bbox=[5, 5, 0, 4]),  # zero width
        dict(base, id=9002, bbox=[5, 5, 3, 0]),  # zero height
        dict(base, id=9003, bbox=[500, 5, 3, 3]),  # right of the image
        dict(base, id=9004, segmentation=[[1, 1, 10, 10]]),  # 2 points (pycocotools would read a box)
        dict(base, id=9005, image_id=123456),  # unknown image
        dict(base, id=9006, category_id=2),  # unknown category (2 is one of the gaps)
        dict(base, id=9007, bbox=[1, 2]),  # malformed box
        dict(base, id=9008, segmentation={"size": [3, 3], "counts": "abc"}),  # RLE of another size
    ]
    repaired = dict(base, id=9009, segmentation=[[1, 1, 10, 1, 10, 10], [3, 3, 4, 4]])
    data["annotations"] = [good, *bad, repaired]
    path = _write_json(tmp_path / "bad_annotations.json", data)
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        dataset = CocoDataset(image_dir, path)
    assert dataset.skipped == {
        "zero-area box": 2,
        "box outside the image": 1,
        "polygon with fewer than 3 points": 1,
        "unknown image id": 1,
        "unknown category id": 1,
        "missing or malformed bbox": 1,
        "RLE size differs from the image size": 1,
    }
    assert dataset.repaired == {"polygon part with fewer than 3 points removed": 1}
    message = caplog.text
    assert "bad_annotations.json" in message and "skipped 8 annotations" in message
    assert "2 zero-area box (e.g. annotation id 9001, 9002)" in message
    assert "1 polygon with fewer than 3 points (e.g. annotation id 9004)" in message
    assert dataset.skip_report in message
    # The usable annotations remain, and the image still loads.
    _, target = dataset[0]
    assert len(target["labels"]) == 2
    assert len(dataset.coco_gt.dataset["annotations"]) == 2


def test_missing_image_file_stops_at_construction(coco_split, tmp_path):
    json_path, _ = coco_split
    data = _json(json_path)
    data["images"][2]["file_name"] = "gone.jpg"
    path = _write_json(tmp_path / "missing_file.json", data)
    with pytest.raises(FileNotFoundError, match=r"1 of 7 image files.*gone\.jpg"):
        CocoDataset(coco_split[1], path)
    # Without the up-front check, reading the item names the file.
    dataset = CocoDataset(coco_split[1], path, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        dataset[2]


def test_corrupt_truncated_and_resized_images_raise_with_the_path(tmp_path):
    json_path, image_dir = make_coco_split(tmp_path, split="train2017", image_sizes=[(48, 64)] * 3)
    first, second, third = sorted(image_dir.iterdir())
    first.write_bytes(b"this is not a jpeg")
    second.write_bytes(second.read_bytes()[:200])  # truncated
    Image.new("RGB", (30, 20)).save(third, format="JPEG")  # another size than the json's
    dataset = CocoDataset(image_dir, json_path)
    with pytest.raises(ValueError, match=f"cannot read image .*{first.name}"):
        dataset[0]
    with pytest.raises(ValueError, match=f"cannot read image .*{second.name}"):
        dataset[1]
    with pytest.raises(ValueError, match=rf"{third.name} is 30x20 \(WxH\) but .* says 64x48"):
        dataset[2]


def test_annotation_ids_zero_are_renumbered_for_evaluation(coco_split, tmp_path, caplog):
    json_path, image_dir = coco_split
    data = _json(json_path)
    data["annotations"][0]["id"] = 0
    path = _write_json(tmp_path / "id0.json", data)
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        dataset = CocoDataset(image_dir, path)
    assert "renumbering" in caplog.text
    ids = [a["id"] for a in dataset.coco_gt.dataset["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
