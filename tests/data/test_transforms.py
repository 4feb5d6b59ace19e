"""Augmentation pipelines keep masks, boxes, labels and other per-instance fields in step."""

import albumentations as A
import numpy as np
import pytest
import torch

from mrcnn.data.samplers import SampleIndex
from mrcnn.data.transforms import (
    InstanceTransform,
    drop_crowd,
    identity_transforms,
    masks_to_boxes,
    photometric_transforms,
    random_crop_transforms,
    scale_jitter_transforms,
    to_sample,
    train_transforms,
    transform_instances,
)


def _sample(seed=0, height=60, width=80, n=6):
    """A random image whose instances are rectangles of distinct colours (so each can be traced)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    masks = np.zeros((n, height, width), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, height - 6), rng.integers(0, width - 6)
        masks[i, y : y + rng.integers(2, 20), x : x + rng.integers(2, 20)] = 1
    labels = np.arange(1, n + 1, dtype=np.int64)
    iscrowd = (np.arange(n) % 3 == 0).astype(np.int64)
    return image, masks, labels, iscrowd


PIPELINES = {
    "hflip": lambda: train_transforms(0.5),
    "photometric": photometric_transforms,
    "random_crop": lambda: random_crop_transforms(border_fraction=0.4, p=1.0),
    "scale_jitter": lambda: scale_jitter_transforms(size=64, min_scale=0.3, max_scale=2.0),
    "none": identity_transforms,
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_keeps_instances_in_step(name):
    transform = PIPELINES[name]()
    transform.compose.set_random_seed(0)
    for seed in range(15):
        image, masks, labels, iscrowd = _sample(seed)
        # An identifier field that encodes each instance's original index and crowd flag together.
        fields = {"labels": labels, "iscrowd": iscrowd, "source": labels * 10 + iscrowd}
        out_image, out_masks, boxes, out = transform.apply(image, masks, fields)
        m = len(out_masks)
        assert out_image.shape[:2] == out_masks.shape[1:] and out_image.dtype == np.uint8
        assert out_masks.dtype == np.uint8 and set(np.unique(out_masks)) <= {0, 1}
        assert boxes.shape == (m, 4) and all(len(v) == m for v in out.values())
        assert out_masks.any(axis=(1, 2)).all()  # no empty instance survives
        assert np.array_equal(boxes, masks_to_boxes(out_masks))
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        # Survivors keep their order, and their fields stay together.
        assert np.array_equal(out["source"], out["labels"] * 10 + out["iscrowd"])
        assert list(out["labels"]) == sorted(out["labels"])
        if name in ("none", "photometric", "hflip"):
            assert m == len(masks)  # nothing is cut away
        if name == "scale_jitter":
            assert out_image.shape[:2] == (64, 64)


def _triangles(seed, height=60, width=80, n=6):
    """Right triangles (so a crop leaves less of one than its box clipped to the crop) and their exact json boxes."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, height, width), dtype=np.uint8)
    rows, cols = np.mgrid[:height, :width]
    for i in range(n):
        y, x, size = rng.integers(0, height - 10), rng.integers(0, width - 10), rng.integers(8, 40)
        masks[i] = (rows >= y) & (cols >= x) & ((rows - y) + (cols - x) < size)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    return image, masks, np.arange(1, n + 1, dtype=np.int64), masks_to_boxes(masks)


@pytest.mark.parametrize("name", ["random_crop", "scale_jitter", "rotate"])
def test_a_cut_objects_json_box_is_cut_to_what_is_left_of_it(name):
    # A crop that keeps a triangle's corner leaves its json box, clipped to the crop, around the cut-away part.
    make = {**PIPELINES, "rotate": lambda: InstanceTransform([A.Rotate(limit=(30, 30), p=1.0)])}[name]
    transform = make()
    assert transform.cut_boxes_to_masks
    uncut = InstanceTransform(transform.compose.transforms, cut_boxes_to_masks=False)
    cut = 0
    for seed in range(20):
        image, masks, labels, boxes = _triangles(seed)
        transform.compose.set_random_seed(seed)
        _, out_masks, out_boxes, out = transform.apply(image, masks, {"labels": labels}, boxes=boxes)
        visible = masks_to_boxes(out_masks)
        # Within a pixel of what is left of each object (the json box, scaled, falls within a pixel of the mask).
        assert (out_boxes[:, :2] >= visible[:, :2] - 1).all() and (out_boxes[:, 2:] <= visible[:, 2:] + 1).all()
        assert (out_boxes[:, 2:] > out_boxes[:, :2]).all() and len(out_boxes) == len(out["labels"])
        # The same draw without cutting: the boxes of cut objects span the part that was cut away.
        uncut.compose.set_random_seed(seed)
        _, _, loose, _ = uncut.apply(image, masks, {"labels": labels}, boxes=boxes)
        cut += int(len(loose) == len(out_boxes) and (np.abs(loose - out_boxes) > 2).any())
    assert cut >= 3


def test_scale_jitter_keeps_masks_on_the_objects_of_the_image():
    # Each object is drawn white in the image: after the jitter's two resizes its mask covers the same pixels as
    # the bilinear image's object, not pixels shifted right and down (cv2's INTER_NEAREST).
    transform = scale_jitter_transforms(size=96, min_scale=0.5, max_scale=2.0, hflip_prob=0.0)
    offsets = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        mask = np.zeros((1, 61, 83), dtype=np.uint8)
        y, x = rng.integers(0, 40), rng.integers(0, 60)
        mask[0, y : y + rng.integers(6, 20), x : x + rng.integers(6, 20)] = 1
        image = np.repeat(mask[0, :, :, None] * 255, 3, axis=2)
        transform.compose.set_random_seed(seed)
        out_image, out_masks, _, _ = transform.apply(image, mask, {"labels": np.array([1])})
        if len(out_masks):
            drawn = masks_to_boxes((out_image[None, :, :, 0] > 127).astype(np.uint8))
            offsets.append(masks_to_boxes(out_masks)[0] - drawn[0])
    offsets = np.array(offsets)
    assert len(offsets) >= 20 and np.abs(offsets).max() <= 1 and np.abs(offsets.mean(axis=0)).max() < 0.25, offsets


def test_only_transforms_that_may_cut_an_object_cut_the_json_boxes():
    assert not InstanceTransform(
        [A.HorizontalFlip(), A.ColorJitter(), A.LongestMaxSize(64), A.PadIfNeeded(64, 64)]
    ).cut_boxes_to_masks
    assert InstanceTransform([A.HorizontalFlip(), A.RandomCrop(20, 20)]).cut_boxes_to_masks
    assert InstanceTransform([A.Affine(rotate=10)]).cut_boxes_to_masks
    assert not InstanceTransform([A.RandomCrop(20, 20)], cut_boxes_to_masks=False).cut_boxes_to_masks
    # A flip keeps a json box that is wider than its mask as it is (the data's own box, mapped exactly).
    image, masks, labels, boxes = _triangles(0)
    wide = boxes + np.array([-0.5, 0.0, 3.0, 0.0], dtype=np.float32)
    _, _, flipped, _ = train_transforms(1.0).apply(image, masks, {"labels": labels}, boxes=np.clip(wide, 0, 80))
    assert np.allclose(flipped[:, [0, 2]], 80 - np.clip(wide, 0, 80)[:, [2, 0]])


def test_crop_drops_vanished_instances_with_all_their_fields():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 60), dtype=np.uint8)
    masks[0, 5:15, 5:20] = 1
    masks[1, 10:30, 45:58] = 1  # outside the crop
    masks[2, 20:35, 25:40] = 1  # cut by the crop
    transform = InstanceTransform([A.Crop(x_min=0, y_min=0, x_max=30, y_max=40)])
    fields = {"labels": np.array([3, 1, 2]), "iscrowd": np.array([0, 1, 0])}
    _, out_masks, boxes, out = transform.apply(image, masks, fields)
    assert out["labels"].tolist() == [3, 2] and out["iscrowd"].tolist() == [0, 0]
    assert boxes.tolist() == [[5, 5, 20, 15], [25, 20, 30, 35]]
    # The 3-argument call (used by ShapesDataset) is unchanged.
    _, _, boxes3, labels3 = transform(image, masks, fields["labels"])
    assert labels3.tolist() == [3, 2] and np.array_equal(boxes3, boxes)


def test_hflip_moves_masks_and_boxes_exactly():
    image, masks, labels, iscrowd = _sample(1)
    image[..., 0] = np.arange(80, dtype=np.uint8)[None]
    out_image, out_masks, boxes, out = train_transforms(1.0).apply(image, masks, {"labels": labels})
    assert np.array_equal(out_image, image[:, ::-1])
    assert np.array_equal(out_masks, masks[:, :, ::-1])
    before = masks_to_boxes(masks)
    assert np.array_equal(boxes[:, [0, 2]], 80 - before[:, [2, 0]])


def test_photometric_changes_pixels_not_masks():
    image, masks, labels, _ = _sample(2)
    image[:] = 120
    transform = photometric_transforms(p=1.0, hflip_prob=0.0)
    transform.compose.set_random_seed(0)
    changed = 0
    for _ in range(5):  # a brightness factor within 0.4% of 1 leaves a flat image unchanged: try a few
        out_image, out_masks, _, _ = transform.apply(image, masks, {"labels": labels})
        changed += not np.array_equal(out_image, image)
        assert np.array_equal(out_masks, masks)
    assert changed >= 3


def test_field_length_mismatch_is_an_error():
    image, masks, labels, _ = _sample(3)
    with pytest.raises(ValueError, match="'iscrowd' has 2 entries for 6 masks"):
        identity_transforms().apply(image, masks, {"labels": labels, "iscrowd": np.zeros(2)})


def test_no_instances():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    empty = np.zeros((0, 30, 40), dtype=np.uint8)
    for make in PIPELINES.values():
        out_image, masks, boxes, out = make().apply(image, empty, {"labels": np.zeros(0, np.int64)})
        assert masks.shape == (0, *out_image.shape[:2]) and boxes.shape == (0, 4) and out["labels"].shape == (0,)


def test_transform_instances_without_transforms_drops_empty_masks():
    image, masks, labels, iscrowd = _sample(4)
    masks[2] = 0
    _, out_masks, boxes, out = transform_instances(None, image, masks, {"labels": labels, "iscrowd": iscrowd})
    assert out["labels"].tolist() == [1, 2, 4, 5, 6] and out["iscrowd"].tolist() == [1, 0, 1, 0, 0]
    assert len(out_masks) == len(boxes) == 5
    with pytest.raises(TypeError, match="InstanceTransform"):
        transform_instances(lambda *a: a, image, masks, {"labels": labels})


def test_drop_crowd():
    image, masks, labels, iscrowd = _sample(5)
    _, target = to_sample(image, masks, labels, image_id=3, iscrowd=iscrowd)
    dropped = drop_crowd(target)
    keep = torch.from_numpy(iscrowd == 0)
    for key in ("boxes", "labels", "masks", "iscrowd", "area"):
        assert torch.equal(dropped[key], target[key][keep])
    assert dropped["image_id"] == 3
    no_crowd = dict(target, iscrowd=torch.zeros_like(target["iscrowd"]))
    assert drop_crowd(no_crowd) is no_crowd


def _textured_sample(seed):
    """:func:`_sample` on a random image (a flip or a colour jitter of a black one changes nothing)."""
    image, masks, labels, _ = _sample(seed)
    return np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8), masks, labels


def test_a_training_items_draw_follows_from_seed_epoch_and_index_alone():
    transform = photometric_transforms()
    image, masks, labels = _textured_sample(0)

    def draw(index):
        return transform(image, masks, labels, index=index)[0]

    first = draw(SampleIndex(3, seed=0, epoch=1))
    for other in range(5):  # other draws in between change nothing
        draw(SampleIndex(other, seed=0, epoch=0))
        draw(other)
    assert np.array_equal(draw(SampleIndex(3, seed=0, epoch=1)), first)
    # Another epoch, seed or index draws anew (photometric: a colour jitter with p=0.8, a flip with p=0.5).
    for index, seed, epoch in [(3, 0, 2), (3, 1, 1), (4, 0, 1)]:
        assert not np.array_equal(draw(SampleIndex(index, seed=seed, epoch=epoch)), first), (index, seed, epoch)
    # A later use of the index in the same epoch (DDP's padding, a completed batch) draws anew too, each its own;
    # the first use keeps the draw of (seed, epoch, index), as runs recorded before repeats were numbered drew.
    repeats = [draw(SampleIndex(3, seed=0, epoch=1, repeat=k)) for k in range(4)]
    assert np.array_equal(repeats[0], first)
    assert not any(np.array_equal(a, b) for i, a in enumerate(repeats) for b in repeats[i + 1 :])
    assert np.array_equal(draw(SampleIndex(3, seed=0, epoch=1, repeat=2)), repeats[2])


def test_a_sample_index_is_an_int_that_survives_pickling():
    import pickle

    index = pickle.loads(pickle.dumps(SampleIndex(7, seed=3, epoch=2, repeat=1)))
    assert index == 7 and [10, 11, 12, 13, 14, 15, 16, 17][index] == 17
    assert (index.seed, index.epoch, index.repeat) == (3, 2, 1)


def test_without_a_sample_index_the_main_process_draws_from_torchs_seed():
    # Calls outside the training stream (a user's loop, a dataset indexed by hand) repeat after seeding torch.
    image, masks, labels = _textured_sample(1)

    def draws():
        torch.manual_seed(4)
        transform = photometric_transforms()
        return [transform(image, masks, labels)[0] for _ in range(6)]

    first, second = draws(), draws()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(first[0], other) for other in first[1:])
