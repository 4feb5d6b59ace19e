"""Official Cityscapes AP: our numbers are cityscapesscripts' own on the same predictions."""

import json
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from mrcnn.cityscapes_eval import CityscapesEvaluator, evaluate_results, official_module, prediction_stem
from mrcnn.data.cityscapes import CityscapesDataset
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.evaluation import CocoEvaluator
from tests.helpers.data import make_cityscapes_sized


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory):
    root = make_cityscapes_sized(tmp_path_factory.mktemp("cityscapes"), splits=("val",), per_city=3)
    return CityscapesDataset(root, split="val", include_crowd=True)


def noisy_predictions(target, rng):
    """Detections as the model gives them (float masks [N, 1, H, W]): shifted copies of the instances, some with
    the wrong class, duplicates, false positives, one on the crowd region and one on the void strip."""
    height, width = target["masks"].shape[-2:]
    masks, labels = [], []
    for mask, label, crowd in zip(target["masks"], target["labels"].tolist(), target["iscrowd"].tolist()):
        dy, dx = rng.integers(-3, 4, size=2)
        shifted = torch.roll(mask, shifts=(int(dy), int(dx)), dims=(0, 1))
        masks.append(shifted)
        labels.append(label if rng.random() < 0.8 or crowd else int(rng.integers(1, 9)))
        if rng.random() < 0.3:  # a duplicate: at most one match per instance, the other a false positive
            masks.append(mask)
            labels.append(label)
    for _ in range(3):  # false positives
        fp = torch.zeros(height, width, dtype=torch.uint8)
        y, x = int(rng.integers(0, height - 15)), int(rng.integers(0, width - 15))
        fp[y : y + int(rng.integers(5, 15)), x : x + int(rng.integers(5, 15))] = 1
        masks.append(fp)
        labels.append(int(rng.integers(1, 9)))
    void = torch.zeros(height, width, dtype=torch.uint8)
    void[-4:, 20:60] = 1  # on the ego vehicle: ignored, not a false positive
    masks.append(void)
    labels.append(3)
    masks = torch.stack(masks)
    probabilities = masks[:, None].float() * 0.8 + 0.1  # above 0.5 inside, below outside
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    boxes = torch.stack(
        [torch.tensor([xs[m > 0].min(), ys[m > 0].min(), xs[m > 0].max() + 1, ys[m > 0].max() + 1]) for m in masks]
    ).float()
    scores = torch.from_numpy(rng.uniform(0.05, 1.0, size=len(masks)).astype(np.float32))
    return {"boxes": boxes, "labels": torch.tensor(labels), "scores": scores, "masks": probabilities}


def evaluate_as_the_module_does(dataset, workers=0, seed=0):
    """COCO evaluation of a validation pass, then the official AP from its results (MaskRCNNModule._log_ap)."""
    rng = np.random.default_rng(seed)
    datamodule = InstanceDataModule(train_dataset=dataset, val_dataset=dataset, batch_size=2)
    coco = CocoEvaluator(**datamodule.evaluator_kwargs())
    predictions = {}
    for _, targets in datamodule.val_dataloader():
        batch = [noisy_predictions(t, rng) for t in targets]
        predictions.update({int(t["image_id"]): p for t, p in zip(targets, batch)})
        coco.update(batch, list(targets))
    coco_metrics = coco.compute()
    official = CityscapesEvaluator.for_dataset(dataset, workers).compute(coco.results_json(), coco.image_ids())
    return coco_metrics, official, predictions


def write_official_format(predictions, dataset, folder):
    """The script's documented input, written independently: per image a txt of '<png> <labelId> <score>' lines
    and one 8-bit PNG per instance (non-zero = the instance)."""
    folder.mkdir()
    for image_id, gt_file in zip(dataset.image_ids, dataset.instance_files):
        prediction, stem, lines = predictions[image_id], prediction_stem(gt_file), []
        for i, (mask, label, score) in enumerate(zip(prediction["masks"], prediction["labels"], prediction["scores"])):
            Image.fromarray(((mask[0] > 0.5).numpy() * 255).astype(np.uint8)).save(folder / f"{stem}_mask{i}.png")
            lines.append(f"{stem}_mask{i}.png {dataset.label_to_category_id[int(label)]} {float(score)}\n")
        (folder / f"{stem}_pred.txt").write_text("".join(lines))


def test_official_ap_equals_cityscapesscripts_run_directly(val_dataset, tmp_path, monkeypatch):
    coco_metrics, ours, predictions = evaluate_as_the_module_does(val_dataset)

    # The script itself, as its documentation says to run it: results found through CITYSCAPES_RESULTS,
    # evaluateImgLists on the ground-truth list (it writes matches.json into the working directory).
    official = official_module()
    # Two numpy 2 incompatibilities of the script (2.3.0, its latest release), patched here independently of
    # mrcnn.cityscapes_eval: numpy 2.4 removed np.in1d, and numpy 2's count_nonzero returns np.int64, which its
    # json dump of matches.json (debug output, not the computation) cannot serialise.
    if not hasattr(np, "in1d"):
        monkeypatch.setattr(official, "np", np)
        monkeypatch.setattr(np, "in1d", lambda a, b: np.isin(a, b).ravel(), raising=False)

    def write_json(data, path):
        with open(path, "w") as file:
            json.dump(data, file, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__)

    monkeypatch.setattr(official, "writeDict2JSON", write_json)
    results = tmp_path / "results"
    write_official_format(predictions, val_dataset, results)
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(results))
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "predictionPath": None,
        "predictionWalk": None,
        "JSONOutput": False,
        "quiet": True,
        "colorized": False,
        "gtInstancesFile": str(tmp_path / "gtInstances.json"),
    }.items():
        monkeypatch.setattr(official.args, name, value)
    ground_truth = [str(f) for f in val_dataset.instance_files]
    prediction_files = [official.getPrediction(gt, official.args) for gt in ground_truth]
    averages = official.evaluateImgLists(prediction_files, ground_truth, official.args)["averages"]

    def official_value(x):
        return -1.0 if math.isnan(x) else x

    assert 0.2 < averages["allAp"] < averages["allAp50%"] < 1, "the predictions must give non-trivial AP"
    assert ours["cityscapes_AP"] == pytest.approx(averages["allAp"], abs=1e-12)
    assert ours["cityscapes_AP50"] == pytest.approx(averages["allAp50%"], abs=1e-12)
    assert set(averages["classes"]) == {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"}
    for name, per_class in averages["classes"].items():
        assert ours[f"cityscapes_AP_{name}"] == pytest.approx(official_value(per_class["ap"]), abs=1e-12), name
        assert ours[f"cityscapes_AP50_{name}"] == pytest.approx(official_value(per_class["ap50%"]), abs=1e-12), name
    assert ours["cityscapes_AP_train"] == -1.0  # no ground-truth train: the script's NaN
    # A different protocol from the COCO-style number on the same detections.
    assert ours["cityscapes_AP"] != pytest.approx(coco_metrics["segm_AP"], abs=1e-3)


def test_worker_processes_give_the_same_numbers_and_are_not_forks_of_the_training_process(val_dataset, monkeypatch):
    _, in_process, _ = evaluate_as_the_module_does(val_dataset)

    # A fork copies the training process's threads' held locks: the workers must start afresh.
    def fork():
        raise AssertionError("os.fork: an evaluation worker would be a copy of the training process")

    monkeypatch.setattr(os, "fork", fork)
    _, with_workers, _ = evaluate_as_the_module_does(val_dataset, workers=2)
    assert with_workers == in_process


def test_only_evaluated_images_count(val_dataset):
    evaluator = CityscapesEvaluator.for_dataset(val_dataset)
    assert evaluator.compute([], []) == {"cityscapes_AP": -1.0, "cityscapes_AP50": -1.0}
    # One image without detections: its instances are all missed (AP 0 where it has ground truth).
    metrics = evaluator.compute([], [1])
    assert metrics["cityscapes_AP"] == 0.0
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        evaluator.compute([], [99])
    assert CityscapesEvaluator.for_dataset(object()) is None


def test_a_model_of_some_classes_is_scored_on_those_classes(tmp_path_factory):
    # data.classes=[person, car]: the script's average over all 8 classes would count the 6 others as AP 0.
    root = make_cityscapes_sized(tmp_path_factory.mktemp("cityscapes_subset"), splits=("val",), per_city=2)
    for classes in (["person", "car"], None):
        kwargs = {} if classes is None else {"classes": classes}
        dataset = CityscapesDataset(root, split="val", include_crowd=True, **kwargs)
        coco = CocoEvaluator(**InstanceDataModule(dataset, dataset, batch_size=2).evaluator_kwargs())
        for _, targets in InstanceDataModule(dataset, dataset, batch_size=2).val_dataloader():
            # Every object found, with its mask: perfect detections of the model's classes.
            found = [t["iscrowd"] == 0 for t in targets]
            detections = [
                {
                    "boxes": t["boxes"][k],
                    "labels": t["labels"][k],
                    "scores": torch.ones(int(k.sum())),
                    "masks": t["masks"][k][:, None].float(),
                }
                for t, k in zip(targets, found)
            ]
            coco.update(detections, list(targets))
        assert coco.compute()["segm_AP"] == pytest.approx(1.0)
        official = CityscapesEvaluator.for_dataset(dataset).compute(coco.results_json(), coco.image_ids())
        assert official["cityscapes_AP"] == pytest.approx(1.0), official
        scored = {key.removeprefix("cityscapes_AP_") for key in official if key.startswith("cityscapes_AP_")}
        assert scored == set(classes or dataset.class_names)
    with pytest.raises(ValueError, match=r"classes \['pedestrian'\] are not Cityscapes instance classes"):
        CityscapesEvaluator({1: dataset.instance_files[0]}, classes=["pedestrian"]).compute([], [1])


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_a_class_whose_every_prediction_lies_on_ignore_pixels_scores_zero_not_a_crash(tmp_path):
    # cityscapesscripts itself fails here (IndexError on an empty array): a car in the ground truth, and the only car
    # prediction on the ego-vehicle strip, discounted as void at every overlap. Nothing is left to rank: AP 0.
    ids = np.zeros((64, 64), np.uint16)
    ids[10:30, 10:20] = 26001  # a car of 200 pixels
    ids[56:, :] = 1  # the ego vehicle (void)
    gt_file = tmp_path / "aachen_000000_000019_gtFine_instanceIds.png"
    Image.fromarray(ids).save(gt_file)
    on_void = np.zeros((64, 64), bool)
    on_void[58:62, 5:40] = True
    person = np.zeros((64, 64), bool)
    person[40:50, 40:50] = True  # a false positive of a class without ground truth: NaN, left out of the mean
    results = [
        {"image_id": 1, "category_id": 26, "score": 0.9, "segmentation": _rle(on_void)},
        {"image_id": 1, "category_id": 24, "score": 0.8, "segmentation": _rle(person)},
    ]
    metrics = evaluate_results(results, {1: gt_file})
    assert metrics["cityscapes_AP_car"] == 0.0 and metrics["cityscapes_AP50_car"] == 0.0
    assert metrics["cityscapes_AP_person"] == -1.0  # no ground truth
    assert metrics["cityscapes_AP"] == 0.0

    # A car prediction on the car as well: every cell is the script's own number again.
    on_car = ids == 26001
    results.append({"image_id": 1, "category_id": 26, "score": 0.7, "segmentation": _rle(on_car)})
    assert evaluate_results(results, {1: gt_file})["cityscapes_AP_car"] == pytest.approx(1.0)
