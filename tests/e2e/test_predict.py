"""mode=predict (overlay PNGs + COCO results json), overlay drawing, and torchvision weights through run.py."""

import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image

from mrcnn.data.shapes import ShapesDataset
from mrcnn.engine.build import build_module
from mrcnn.engine.visualize import draw_instances, instance_colors, place_captions, semantic_label_map
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import shapes_batch
from tests.helpers.runs import run_py, training_only_trainer
from tests.helpers.torchvision_models import torchvision_maskrcnn


def write_images(folder, n, size):
    folder.mkdir()
    dataset = ShapesDataset(num_images=n, image_size=size, seed=3, split="val")
    for i in range(n):
        image, _ = dataset[i]
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    return folder


def test_predict_from_a_lightning_checkpoint_writes_overlays_and_coco_results(tmp_path):
    cfg = compose_config(
        [*TINY_MODEL, "data.num_train_images=4", "data.datamodule.batch_size=2"], run_dir=str(tmp_path)
    )
    L.seed_everything(0)
    module = instantiate(cfg.module)
    trainer = training_only_trainer(max_steps=1)
    trainer.fit(module, datamodule=instantiate(cfg.data.datamodule))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    images = write_images(tmp_path / "images", 3, 64)
    # img0.jpg beside img0.png: by stem both would write img0.png; every input keeps its overlay.
    Image.open(images / "img0.png").save(images / "img0.jpg")

    out = tmp_path / "out"
    # No size given: the model predicts at the 64 px it was trained at, not the default data's 128.
    result = run_py(
        [
            "model=tiny",
            "mode=predict",
            f"ckpt_path={tmp_path / 'model.ckpt'}",
            f"predict.input={images}",
            f"predict.output={out}",
            "predict.score_threshold=0.0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert "was trained at: data.min_size=64 data.max_size=64" in result.stdout + result.stderr
    assert "but this run resizes images" not in result.stdout + result.stderr

    assert sorted(p.name for p in out.glob("*.png")) == ["img0.jpg.png", "img0.png.png", "img1.png.png", "img2.png.png"]
    assert Image.open(out / "img0.png.png").size == (512, 512)  # 64 px images are enlarged for drawing
    listed = json.loads((out / "images.json").read_text())
    assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in listed] == [
        (1, "img0.jpg", 64, 64),
        (2, "img0.png", 64, 64),
        (3, "img1.png", 64, 64),
        (4, "img2.png", 64, 64),
    ]
    results = json.loads((out / "coco_results.json").read_text())
    assert results, "score_threshold=0 keeps every detection of the untrained model"
    assert {r["image_id"] for r in results} <= {1, 2, 3, 4}
    for r in results[:5]:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert 1 <= r["category_id"] <= 6 and len(r["bbox"]) == 4 and r["segmentation"]["size"] == [64, 64]


def test_prediction_takes_the_checkpoints_input_size_unless_the_command_line_sets_one():
    from mrcnn.engine.model_record import ModelRecord
    from mrcnn.engine.predict import use_recorded_input_size

    record = ModelRecord(min_size=[96], max_size=160)
    cfg = compose_config(["model=tiny", "mode=predict"])
    assert (cfg.data.min_size, cfg.data.max_size) == (128, 128)  # the built-in shapes'
    use_recorded_input_size(cfg, record, [], "ckpt_path=a.ckpt")
    assert build_module(cfg).model.transform.min_size == (96,) and cfg.data.max_size == 160
    # Multi-scale training: the list, whose last size torchvision's transform takes at test time.
    cfg = compose_config(["model=tiny", "mode=predict"])
    use_recorded_input_size(cfg, ModelRecord(min_size=[64, 96], max_size=160), None, "ckpt_path=a.ckpt")
    assert list(cfg.data.min_size) == [64, 96]
    # A size on the command line is kept, the other one is the checkpoint's; a checkpoint without sizes changes
    # nothing.
    for given, expected in (
        (["data.min_size=128"], (128, 160)),
        (["data.max_size=200"], (96, 200)),
        (["++data.max_size=200"], (96, 200)),
        (["data.min_size=100", "data.max_size=200"], (100, 200)),
    ):
        cfg = compose_config(["model=tiny", "mode=predict", *given])
        use_recorded_input_size(cfg, record, given, "ckpt_path=a.ckpt")
        assert (cfg.data.min_size, cfg.data.max_size) == expected, given
    cfg = compose_config(["model=tiny", "mode=predict"])
    use_recorded_input_size(cfg, ModelRecord(), [], "ckpt_path=a.ckpt")
    assert (cfg.data.min_size, cfg.data.max_size) == (128, 128)


def test_a_file_without_an_input_size_is_predicted_at_the_data_configs_with_a_warning(caplog):
    from mrcnn.engine.model_record import ModelRecord
    from mrcnn.engine.predict import use_recorded_input_size

    # A torchvision state dict (no record), or a record without sizes: the data config's 128, said unless the
    # command line gives both sizes.
    for record, given, warned in (
        (None, [], True),
        (ModelRecord(), [], True),
        (None, ["data.min_size=800"], True),
        (None, ["data.min_size=800", "data.max_size=1333"], False),
    ):
        cfg = compose_config(["model=tiny", "mode=predict", *given])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mrcnn.engine.predict"):
            use_recorded_input_size(cfg, record, given, "weights=coco.pth")
        lines = [r.getMessage() for r in caplog.records]
        assert (cfg.data.min_size, cfg.data.max_size) == (
            (800, 1333) if len(given) == 2 else (800 if given else 128, 128)
        )
        assert bool(lines) == warned, (given, lines)
        if warned:
            assert lines[0].startswith(
                f"weights=coco.pth records no input size: predicting at the data config's, "
                f"data.min_size={cfg.data.min_size} data.max_size=128"
            )
            assert "torchvision's COCO models: data.min_size=800 data.max_size=1333" in lines[0]


def test_class_names_that_do_not_fit_the_model_are_not_used(caplog):
    from mrcnn.engine.predict import class_names

    cfg = compose_config(["model=tiny", "mode=predict", "predict.class_names=coco"])
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.predict"):
        assert class_names(cfg, 6) is None  # torchvision's 90 COCO names for a 6-class model
    assert "90 class names (predict.class_names=coco) for the model's 6 classes" in caplog.text
    assert len(class_names(cfg, 90)) == 90 and class_names(cfg, 90)[0] == "person"


# Slow (about 10 s); the default suite loads torchvision's weights in process (tests/modeling/test_parity.py) and
# predicts through run.py from a Lightning checkpoint above.
@pytest.mark.slow
def test_torchvision_checkpoint_loads_and_predicts_through_run_py(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=7, min_size=128, max_size=128
    ).eval()
    torch.save(reference.state_dict(), tmp_path / "maskrcnn.pth")
    images = write_images(tmp_path / "images", 1, 128)

    out = tmp_path / "out"
    run_py(
        [
            "model=torchvision_r50_fpn",
            f"weights={tmp_path / 'maskrcnn.pth'}",
            "mode=predict",
            f"predict.input={images}",
            f"predict.output={out}",
            "predict.score_threshold=0.0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert (out / "img0.png.png").exists()
    results = json.loads((out / "coco_results.json").read_text())

    # The loaded weights give torchvision's detections (RoIAlign etc. are the same computation).
    image = torch.from_numpy(np.array(Image.open(images / "img0.png"))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        expected = reference([image])[0]
    assert len(results) == len(expected["scores"]) > 0
    best = max(results, key=lambda r: r["score"])
    assert best["score"] == pytest.approx(expected["scores"][0].item(), abs=1e-4)
    x1, y1, x2, y2 = expected["boxes"][0].tolist()
    assert best["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-2)
    assert best["category_id"] == expected["labels"][0].item()


def test_weights_that_do_not_fit_the_model_fail_clearly(tmp_path):
    # Another number of classes fine-tunes (tests/modeling/test_weights.py); another architecture does not fit.
    other = torchvision_maskrcnn(num_classes=5, fpn_channels=128)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*does not match the configured model.*fpn"):
        build_module(compose_config(["model=torchvision_r50_fpn", f"weights={tmp_path / 'other.pth'}"]))
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match=r"lightning\.ckpt.*does not match the configured model.*missing in file"):
        build_module(compose_config([*TINY_MODEL, f"weights={tmp_path / 'lightning.ckpt'}"]))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"weights=.*notes\.txt is not a PyTorch checkpoint"):
        build_module(compose_config([*TINY_MODEL, f"weights={tmp_path / 'notes.txt'}"]))


def test_overlay_colours_each_instance_and_label_map_puts_the_best_on_top():
    image = torch.zeros(3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 2:10, 2:10] = 0.9
    masks[1, 0, 5:15, 5:15] = 0.9
    instances = {
        "boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.6, 0.9]),
        "masks": masks,
    }
    drawn = draw_instances(image, instances, ["a", "b"], score_threshold=0.5, min_size=0)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 64, 64)
    assert drawn[:, 3, 3].tolist() != drawn[:, 12, 12].tolist()  # two instances, two colours
    assert drawn[:, 60, 60].tolist() == [0, 0, 0]  # background untouched
    # Where they overlap, the more confident one's colour (half of it over black), not a pixel left uncoloured.
    assert drawn[:, 7, 7].tolist() == [round(c / 2) for c in instance_colors(2)[1]]
    assert draw_instances(image, instances, score_threshold=0.95).eq(0).all()  # nothing above the threshold
    # A small image is enlarged 8x for drawing (each pixel a block): captions are legible beside small objects.
    large = draw_instances(image, instances, ["a", "b"], score_threshold=0.5)
    assert large.shape == (3, 512, 512)
    assert large[:, 3 * 8 + 4, 3 * 8 + 4].tolist() == drawn[:, 3, 3].tolist()  # same mask colour, same place
    assert large[:, 500, 500].tolist() == [0, 0, 0]
    label_map = semantic_label_map(instances, (64, 64))
    assert label_map[3, 3] == 1 and label_map[7, 7] == 2 and label_map[0, 0] == 0  # overlap: higher score wins
    assert len(set(instance_colors(10))) == 10


def test_captions_sit_beside_their_box_and_never_on_each_other():
    # Crowded: three overlapping boxes, one at the image's top edge, one in a corner.
    boxes = [[10, 0, 60, 40], [30, 20, 90, 70], [0, 80, 20, 100], [70, 75, 100, 100]]
    sizes = [(40, 12)] * len(boxes)
    rects = place_captions(boxes, sizes, (100, 100))
    for i, rect in enumerate(rects):
        x1, y1, x2, y2 = rect
        assert 0 <= x1 and x2 <= 100 and 0 <= y1 and y2 <= 100  # inside the image
        assert (x2 - x1, y2 - y1) == sizes[i]
        bx1, by1, bx2, by2 = boxes[i]
        assert not (x1 < bx2 and bx1 < x2 and y1 < by2 and by1 < y2), f"caption {i} covers its own object"
        for j, other in enumerate(rects[:i]):
            ox1, oy1, ox2, oy2 = other
            assert not (x1 < ox2 and ox1 < x2 and y1 < oy2 and oy1 < y2), f"captions {j} and {i} overlap"


def test_the_prediction_writer_reads_a_batch_from_the_device_once_and_writes_what_it_wrote_from_the_host(
    tmp_path, monkeypatch
):
    from mrcnn import evaluation
    from mrcnn.engine.predict import PredictionWriter
    from tests.helpers.host_syncs import SyncCounter, counting_host_syncs

    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 56, generator=generator) for _ in range(3)]
    metas = [{"image_id": i + 1, "file_name": f"{i}.png"} for i in range(3)]
    coco_images = [{"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 56} for i in range(3)]
    detections = []
    for count in (4, 0, 2):
        corner = torch.rand(count, 2, generator=generator) * 25
        detections.append(
            {
                "boxes": torch.cat([corner, corner + 10], 1),
                "labels": torch.randint(1, 3, (count,), generator=generator),
                "scores": torch.rand(count, generator=generator),
                "masks": torch.rand(count, 1, 40, 56, generator=generator),
            }
        )

    def write(folder, counts=None):
        writer = PredictionWriter(folder, coco_images, ["a", "b"], score_threshold=0.3)
        with counting_host_syncs(counts if counts is not None else SyncCounter()):
            writer.write_on_batch_end(None, None, detections, None, (images, metas), 0, 0)
        return writer

    expected = write(tmp_path / "host")
    # As if the model ran on a GPU: every tensor is treated as a device tensor, so the batched copy runs. What the
    # writer does after it (selecting, drawing, RLE encoding) reads its host copies.
    monkeypatch.setattr(evaluation, "_on_device", lambda value: isinstance(value, torch.Tensor))
    after_the_copy = tuple(("/mrcnn/", name) for name in ("select", "draw_instances", "save_png", "update"))
    counts = SyncCounter(after_the_copy)
    actual = write(tmp_path / "device", counts)
    assert dict(counts) == {"Tensor.cpu": 1}, counts.report()
    assert actual.results.results_json() == expected.results.results_json()
    for i in range(3):
        assert (tmp_path / "device" / f"{i}.png.png").read_bytes() == (tmp_path / "host" / f"{i}.png.png").read_bytes()


def tiny_weights(tmp_path) -> tuple[str, int]:
    """``weights=<file>`` of an untrained tiny model, and its number of classes."""
    cfg = compose_config([*TINY_MODEL], run_dir=str(tmp_path))
    weights = tmp_path / "tiny.pth"
    torch.save(instantiate(cfg.module).model.state_dict(), weights)
    return f"weights={weights}", cfg.model.num_classes


def one_image(tmp_path) -> list[str]:
    """``predict.input`` of one 64x48 image, ``predict.output`` beside it."""
    Image.new("RGB", (64, 48)).save(tmp_path / "one.png")
    return [f"predict.input={tmp_path / 'one.png'}", f"predict.output={tmp_path / 'out'}"]


def test_fewer_images_than_processes_is_a_clear_error_before_any_starts(tmp_path):
    # Lightning deals predict's images out without repeating one: a process left without images fails an assertion.
    from mrcnn.engine.predict import predict

    weights, _ = tiny_weights(tmp_path)
    cfg = compose_config(
        [*TINY_MODEL, "mode=predict", weights, *one_image(tmp_path), "trainer=ddp_cpu", "trainer.devices=2"]
    )
    with pytest.raises(ValueError, match=r"one\.png holds 1 images for 2 processes: give at least one image a process"):
        predict(cfg)


def test_a_label_map_that_leaves_a_label_out_is_a_clear_error_before_any_image(tmp_path):
    from mrcnn.engine.predict import predict

    weights, num_classes = tiny_weights(tmp_path)
    labels = "{" + ", ".join(f"{k}: {10 + k}" for k in range(1, num_classes)) + "}"  # all but the last
    cfg = compose_config(
        [*TINY_MODEL, "mode=predict", weights, *one_image(tmp_path), f"predict.label_to_category_id={labels}"]
    )
    with pytest.raises(ValueError, match=rf"maps no category id to labels \[{num_classes}\]"):
        predict(cfg)
    assert not (tmp_path / "out").exists()  # the output folder it made for the run is gone with it
    # String keys (a yaml config's "1": 11) are read as the evaluator reads them: label "1" is label 1.
    cfg.predict.label_to_category_id = {str(k): 10 + k for k in range(2, num_classes + 1)}  # all but label 1
    with pytest.raises(ValueError, match=r"maps no category id to labels \[1\]"):
        predict(cfg)


def test_an_image_that_cannot_be_read_is_skipped_and_counted_and_the_rest_written(tmp_path, caplog):
    # Its header reads (so the check before the run passes), its pixels do not: one broken photo in a folder.
    from mrcnn.engine.predict import predict

    weights, _ = tiny_weights(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(pixels).save(images / name)
    broken = (images / "b.jpg").read_bytes()
    (images / "b.jpg").write_bytes(broken[: len(broken) * 2 // 3])
    # Files whose header does not read either: an empty one, and text under an image's name.
    (images / "0.jpg").write_bytes(b"")
    (images / "e.png").write_text("not an image")
    out = tmp_path / "out"
    overrides = [weights, f"predict.input={images}", f"predict.output={out}", "predict.batch_size=2"]
    cfg = compose_config([*TINY_MODEL, "mode=predict", *overrides, "predict.score_threshold=0.0"])
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.predict"):
        summary = predict(cfg)

    assert summary["images"] == 5 and summary["unreadable"] == 3
    assert "skipped b.jpg: cannot read image" in caplog.text
    assert "skipped 0.jpg: cannot read the header of image" in caplog.text and "skipped e.png:" in caplog.text
    assert "3 of 5 images could not be read and were skipped (left out of images.json): 0.jpg, b.jpg, e.png" in (
        caplog.text
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["a.jpg.png", "c.jpg.png"]
    written = json.loads((out / "images.json").read_text())
    assert [image["file_name"] for image in written] == ["a.jpg", "c.jpg"]
    assert [image["id"] for image in written] == [2, 4]  # numbered in the folder: 0.jpg and b.jpg keep theirs
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {image["id"] for image in written}
    # One file given alone, or a folder of nothing readable, stops with the file's problem.
    from mrcnn.engine.predict import ImageFiles

    with pytest.raises(ValueError, match=r"cannot read the header of image .*0\.jpg"):
        ImageFiles(images / "0.jpg")
    (images / "a.jpg").unlink()
    (images / "c.jpg").unlink()
    (images / "b.jpg").unlink()
    with pytest.raises(ValueError, match=r"none of its 2 image files can be read, e\.g\. cannot read the header"):
        ImageFiles(images)


@pytest.mark.parametrize(
    "model", [TINY_MODEL, ["model=torchvision_r50_fpn", "model.depth=18", "model.fpn_channels=16"]]
)
def test_the_models_own_threshold_raised_to_predicts_keeps_exactly_what_predict_keeps(model):
    # Detections below predict.score_threshold are dropped by the model, before their masks are pasted.
    from mrcnn.engine.predict import raise_score_threshold
    from mrcnn.engine.visualize import select

    module = build_module(compose_config([*model, "model.box_score_thresh=0.0"]))
    module.eval()
    images, _ = shapes_batch(2, image_size=64)
    with torch.no_grad():
        everything, _ = module.model(images)
    scores = torch.cat([d["scores"] for d in everything])
    assert len(scores) > 20
    threshold = float(scores.median())  # a score some detection has: kept, as predict keeps it (>=)
    raise_score_threshold(module.model, threshold)
    with torch.no_grad():
        kept, _ = module.model(images)
    for ours, theirs in zip(kept, everything):
        expected = select(theirs, threshold)
        assert len(expected["scores"]) > 0 and set(ours) >= set(expected)
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(ours[key], expected[key]), key
        # The mask head ran on fewer RoIs: float32 sums in another order (3e-8 seen), the same pixels above 0.5.
        torch.testing.assert_close(ours["masks"], expected["masks"], rtol=0, atol=1e-6)
        assert torch.equal(ours["masks"] > 0.5, expected["masks"] > 0.5)
    raise_score_threshold(module.model, 0.0)  # never lowered
    assert module.model.roi_heads.score_thresh > 0.0


def test_results_number_the_classes_as_the_coco_json_does_matched_by_name(caplog):
    from mrcnn.engine.predict import category_ids_by_name
    from mrcnn.errors import CommandError

    trained = {1: 3, 2: 8, 3: 17}  # the training json's ids of cat, dog, fox
    categories = [
        {"id": 1, "name": "dog"},
        {"id": 2, "name": "fox"},
        {"id": 5, "name": "cat"},
        {"id": 9, "name": "cow"},
    ]
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.predict"):
        assert category_ids_by_name(["cat", "dog", "fox"], trained, categories, "val.json") == {1: 5, 2: 1, 3: 2}
    assert "val.json numbers 3 of the model's 3 classes otherwise" in caplog.text
    assert "cat: 3 -> 5, dog: 8 -> 1, fox: 17 -> 2" in caplog.text
    # The same numbering: the same map, nothing said. Without a map, each label is its id.
    caplog.clear()
    same = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}, {"id": 17, "name": "fox"}]
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.predict"):
        assert category_ids_by_name(["cat", "dog", "fox"], trained, same, "val.json") == trained
        assert category_ids_by_name(["dog", "fox"], None, categories, "val.json") == {1: 1, 2: 2}
    assert not caplog.text
    # torchvision's COCO names: "N/A" marks ids COCO left without a category; those labels keep their ids.
    assert category_ids_by_name(["dog", "fox", "N/A"], None, categories, "val.json") == {1: 1, 2: 2, 3: 3}
    # Names that do not fit the model (None): the map as it was.
    assert category_ids_by_name(None, trained, categories, "val.json") == trained
    # A class the json has no category of, or two of: no id to score it by.
    with pytest.raises(CommandError, match=r"val\.json has no category named \['fox'\] of the model's classes"):
        category_ids_by_name(["cat", "fox"], None, categories[2:], "val.json")
    with pytest.raises(CommandError, match=r"names more than one category \['dog'\].*predict\.label_to_category_id"):
        category_ids_by_name(["dog"], None, [*categories, {"id": 7, "name": "dog"}], "val.json")


def test_predictions_do_not_depend_on_the_batch_size_on_images_of_many_sizes(tmp_path):
    # Batches of one size each, as in evaluation: the padding to a batch's largest image would reach GroupNorm.
    from mrcnn.engine.predict import predict

    weights, _ = tiny_weights(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (height, width) in enumerate([(48, 64), (64, 48), (48, 64), (40, 72), (64, 48)]):
        image, _ = ShapesDataset(num_images=1, image_size=(height, width), seed=i, split="val")[0]
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    results = {}
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}"
        cfg = compose_config(
            [
                *TINY_MODEL,
                "data.image_size=128",  # landscape 48x64 becomes 96x128, portrait 128x96
                "mode=predict",
                weights,
                f"predict.input={folder}",
                f"predict.output={out}",
                f"predict.batch_size={batch_size}",
                "predict.score_threshold=0.0",
            ],
            run_dir=str(tmp_path / f"run{batch_size}"),
        )
        predict(cfg)
        per_image = {}
        for result in json.loads((out / "coco_results.json").read_text()):
            per_image.setdefault(result["image_id"], []).append(result)
        results[batch_size] = per_image
    assert results[1].keys() == results[3].keys() == {1, 2, 3, 4, 5}
    for image_id, alone in results[1].items():
        batched = results[3][image_id]
        # Compared as sorted lists: two near-equal scores may swap places with the last bit of a sum.
        assert sorted(r["score"] for r in batched) == pytest.approx(sorted(r["score"] for r in alone), abs=1e-4)
        assert sorted(r["category_id"] for r in batched) == sorted(r["category_id"] for r in alone)
        boxes = [np.sum([r["bbox"] for r in detections], axis=0) for detections in (alone, batched)]
        assert boxes[1] == pytest.approx(boxes[0], abs=1e-2)
