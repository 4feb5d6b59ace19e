"""The README's "Train on your own data", as a user runs it: COCO-format json -> fine-tune from torchvision's
COCO weights -> evaluate -> predict, on generated data whose category ids are 3, 8 and 17."""

import json
import re

import pytest
import torch
from pycocotools.coco import COCO

from mrcnn.data.coco import read_rgb_image
from tests.helpers.data import coco_format_overrides, make_coco_split
from tests.helpers.runs import run_py
from tests.helpers.torchvision_models import coco_like_torchvision_maskrcnn

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}, {"id": 17, "name": "fox"}]
# torchvision's maskrcnn_resnet50_fpn layout at a size the CPU trains in seconds (the README uses the real one).
TORCHVISION_SIZE = {"depth": 18, "fpn_channels": 16, "box_head_dim": 32, "mask_head_dim": 16}
MODEL = [
    "model=torchvision_r50_fpn",
    "model.depth=18",
    "model.fpn_channels=16",
    "model.box_head_dim=32",
    "model.mask_head_dim=16",
    "model.rois_per_image=32",
    "model.anchor_sizes=[8,16,32,64,128]",
]
# The generated images are 40-160 px: resized to their own scale, not COCO's 800 / 1333.
SIZE = ["data.min_size=64", "data.max_size=160"]


def test_fine_tune_evaluate_predict_on_own_coco_json(tmp_path):
    train_json, train_images = make_coco_split(tmp_path / "data", "train", categories=CATEGORIES)
    val_json, val_images = make_coco_split(tmp_path / "data", "val", seed=1, categories=CATEGORIES)
    # torchvision's COCO weights as its builder leaves them: 91 classes, trained-like BatchNorm statistics, eps 0.
    image = torch.from_numpy(read_rgb_image(next(train_images.iterdir()))).permute(2, 0, 1).float() / 255
    coco = coco_like_torchvision_maskrcnn(image, num_classes=91, min_size=64, max_size=160, **TORCHVISION_SIZE)
    weights = tmp_path / "maskrcnn_coco.pth"
    torch.save(coco.state_dict(), weights)
    data = [*coco_format_overrides(train_json, train_images, val_json, val_images), *SIZE]

    # 1. Fine-tune: every tensor but the class-specific layers comes from the 91-class file.
    train_dir = tmp_path / "train"
    result = run_py([*MODEL, *data, f"weights={weights}", "trainer.max_epochs=1", f"hydra.run.dir={train_dir}"])
    log = result.stdout + result.stderr
    assert re.search(r"re-initialised for 3 classes .*cls_score.*bbox_pred.*mask_head\.predictor", log), log[-3000:]
    assert "anchors' reach" not in log
    trained = json.loads((train_dir / "metrics.json").read_text())
    assert trained["global_step"] == 3  # 7 images, batches of 2: a fresh run, not a resumed one
    checkpoint = train_dir / "checkpoints" / "last.ckpt"
    record = torch.load(checkpoint, weights_only=True)["mrcnn_model"]
    assert record["class_names"] == ["cat", "dog", "fox"] and record["label_to_category_id"] == {1: 3, 2: 8, 3: 17}

    # 2. Evaluate the checkpoint on the validation json (pycocotools' box and mask AP).
    eval_dir = tmp_path / "evaluate"
    run_py([*MODEL, *data, "mode=evaluate", f"ckpt_path={checkpoint}", f"hydra.run.dir={eval_dir}"])
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    # The same weights on the same images as the training run's final validation: the same numbers.
    assert {key: evaluated[key] for key in trained if "AP" in key} == {
        key: trained[key] for key in trained if "AP" in key
    }

    # 3. Predict, with no data config: classes come from the checkpoint, image ids from the json, and category ids
    # from the json too, by class name: this validation json was exported on its own and numbers them 1, 2, 3.
    renumbered = json.loads(val_json.read_text())
    new_ids = {3: 1, 8: 2, 17: 3}
    for entry in renumbered["categories"] + renumbered["annotations"]:
        key = "id" if "name" in entry else "category_id"
        entry[key] = new_ids[entry[key]]
    val_json = val_json.with_name("val_renumbered.json")
    val_json.write_text(json.dumps(renumbered))
    out = tmp_path / "predictions"
    result = run_py(
        [
            *MODEL,
            *SIZE,
            "mode=predict",
            f"ckpt_path={checkpoint}",
            f"predict.input={val_images}",
            f"predict.coco_json={val_json}",
            f"predict.output={out}",
            "predict.score_threshold=0.0",
            f"hydra.run.dir={tmp_path / 'predict'}",
        ]
    )
    assert "cat: 3 -> 1, dog: 8 -> 2, fox: 17 -> 3" in result.stdout + result.stderr
    results = json.loads((out / "coco_results.json").read_text())
    assert results, "score_threshold=0 keeps every detection"
    assert {r["category_id"] for r in results} <= {1, 2, 3} and {r["category_id"] for r in results} & {2, 3}
    ground_truth = COCO(str(val_json))
    assert {r["image_id"] for r in results} <= set(ground_truth.getImgIds())
    detections = ground_truth.loadRes(str(out / "coco_results.json"))
    assert len(detections.getAnnIds()) == len(results)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.name}.png" for p in val_images.iterdir())


# Slow (about 25 s); the default suite checks the batched paths on images of many sizes in process
# (tests/modeling/test_heads_losses.py, test_batched_proposals.py).
@pytest.mark.slow
def test_the_batched_switches_train_and_detect_on_images_of_many_sizes(tmp_path):
    # model.batched_sampling and model.batched_proposals on images of 40-160 px in batches of 2 and 3: the mask
    # targets come from a stack of masks of other sizes, and the detections of a batch are made at once.
    train_json, train_images = make_coco_split(tmp_path / "data", "train", categories=CATEGORIES)
    val_json, val_images = make_coco_split(tmp_path / "data", "val", seed=1, categories=CATEGORIES)
    data = [*coco_format_overrides(train_json, train_images, val_json, val_images), *SIZE]
    batched = ["model.batched_sampling=true", "model.batched_proposals=true"]
    train_dir = tmp_path / "train"
    run_py([*MODEL, *data, *batched, "trainer.max_epochs=1", "final_eval=false", f"hydra.run.dir={train_dir}"])
    checkpoint = train_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 3  # 7 images, full batches of 2

    # The same checkpoint detects the same boxes per image and all at once.
    found = {}
    for switch in ("false", "true"):
        out = tmp_path / f"predictions_{switch}"
        run_py(
            [
                *MODEL,
                *SIZE,
                "mode=predict",
                f"model.batched_proposals={switch}",
                f"ckpt_path={checkpoint}",
                f"predict.input={val_images}",
                f"predict.output={out}",
                "predict.batch_size=3",
                "predict.score_threshold=0.0",
                f"hydra.run.dir={tmp_path / f'predict_{switch}'}",
            ]
        )
        found[switch] = json.loads((out / "coco_results.json").read_text())
    per_image, at_once = found["false"], found["true"]
    assert per_image and len(per_image) == len(at_once)

    # Each detection has its twin: the same image and class, its score and box within float rounding (the heads
    # run on other row counts, so the last bits may differ and near-equal scores may swap places).
    def twins(a, b):
        return (
            (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            and abs(a["score"] - b["score"]) < 1e-5
            and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-3
        )

    unmatched = list(at_once)
    for detection in per_image:
        twin = next((i for i, other in enumerate(unmatched) if twins(detection, other)), None)
        assert twin is not None, detection
        unmatched.pop(twin)
