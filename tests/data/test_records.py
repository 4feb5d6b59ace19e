"""Packed per-image records: exact round trips, fresh copies, workers, and datasets that hold no per-image objects."""

import gc
import json
import pickle
from pathlib import Path, PurePath

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mrcnn.data.cityscapes import CityscapesDataset
from mrcnn.data.coco import CocoDataset, LazyCoco, read_category_names
from mrcnn.data.datamodule import collate_detection
from mrcnn.data.records import PackedRecords, gc_paused
from tests.helpers.data import CATEGORIES, make_cityscapes, make_coco_split

RECORDS = [
    ({"id": 7, "file_name": "a.jpg", "height": 3, "width": 4}, [{"segmentation": [[0.1, 2.25, 3, 4.0, 5, 6]]}]),
    {"counts": [0, 5, 7], "size": [3, 4], "nested": {"x": None, "y": (1, 2.5), "z": "ü"}},
    [],
    "",
    12345678901234567890,
    -0.0,
]


def _same(a, b):
    """Equal values of the same types all the way down (1 == 1.0 and (1,) == [1] are not the same here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex()  # also tells -0.0 from 0.0
    return a == b


def test_packed_records_round_trip_exactly():
    packed = PackedRecords(iter(RECORDS))
    assert len(packed) == len(RECORDS)
    assert packed.nbytes == sum(len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)) for r in RECORDS)
    for index, record in enumerate(RECORDS):
        assert _same(packed[index], record), index
    assert _same(list(packed), RECORDS)
    assert _same(packed[-1], RECORDS[-1]) and _same(packed[np.int64(1)], RECORDS[1])
    with pytest.raises(IndexError):
        packed[len(RECORDS)]


def test_packed_records_hand_out_fresh_copies():
    packed = PackedRecords(RECORDS)
    first = packed[0]
    first[1][0]["segmentation"][0][0] = 99.0
    first[0]["height"] = 0
    assert _same(packed[0], RECORDS[0])
    assert packed[0] is not packed[0]


def test_empty_packed_records():
    packed = PackedRecords([])
    assert len(packed) == 0 and packed.nbytes == 0 and list(packed) == []
    with pytest.raises(IndexError):
        packed[0]


def test_packed_records_survive_pickling_for_spawned_workers():
    # DataLoader workers started by spawn/forkserver receive the dataset pickled by
    # multiprocessing's ForkingPickler: torch moves the buffer to shared memory.
    from multiprocessing.reduction import ForkingPickler

    packed = PackedRecords(RECORDS)
    restored = pickle.loads(ForkingPickler.dumps(packed))
    assert _same(list(restored), RECORDS)
    assert packed._buffer.is_shared()


def test_gc_paused_restores_the_previous_state():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# ------------------------------------------------------------------------------ COCO


def _shuffled_annotations_split(root):
    """make_coco_split's json with its annotations in a shuffled order (COCO's are not grouped by image)."""
    json_path, image_dir = make_coco_split(root)
    data = json.loads(json_path.read_text())
    order = np.random.default_rng(0).permutation(len(data["annotations"]))
    data["annotations"] = [data["annotations"][i] for i in order]
    json_path.write_text(json.dumps(data))
    return json_path, image_dir, data


@pytest.fixture(scope="module")
def shuffled_split(tmp_path_factory):
    return _shuffled_annotations_split(tmp_path_factory.mktemp("shuffled"))


@pytest.mark.parametrize("drop", [False, True])
def test_coco_records_are_the_jsons_entries(shuffled_split, drop):
    json_path, image_dir, data = shuffled_split
    dataset = CocoDataset(image_dir, json_path, drop_images_without_annotations=drop)
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    images = [im for im in data["images"] if not drop or im["id"] in annotated]
    assert len(images) == len(data["images"]) - drop  # make_coco_split's fifth image has no annotation
    assert len(dataset) == len(images)
    assert dataset.image_ids == [im["id"] for im in images]
    assert dataset.image_sizes == [(im["height"], im["width"]) for im in images]
    assert dataset.num_annotations == len(data["annotations"])
    for index, image in enumerate(images):
        record_image, annotations = dataset.record(index)
        assert _same(record_image, image)
        assert _same(annotations, [a for a in data["annotations"] if a["image_id"] == image["id"]])


def test_coco_ground_truth_is_lazy_and_in_json_order(shuffled_split):
    json_path, image_dir, data = shuffled_split
    dataset = CocoDataset(image_dir, json_path, drop_images_without_annotations=True)
    coco_gt = dataset.coco_gt
    assert isinstance(coco_gt, LazyCoco) and "dataset" not in vars(coco_gt)  # nothing built yet
    assert dataset.coco_gt is coco_gt
    assert len(coco_gt.imgs) == len(data["images"])  # first use builds it, with the dropped image too
    built = coco_gt.dataset
    assert coco_gt.dataset is built  # once
    assert _same(built["images"], data["images"])
    assert _same(built["annotations"], data["annotations"])  # json order, not grouped by image
    assert _same(built["categories"], sorted(CATEGORIES, key=lambda c: c["id"]))
    assert coco_gt.getAnnIds(imgIds=[data["images"][0]["id"]]) == [
        a["id"] for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]
    ]
    assert not hasattr(coco_gt, "no_such_attribute")


def _expected_targets(data, image, category_to_label, include_crowd):
    """The target of one image computed from the json alone: what the loader served before its storage changed."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and a["category_id"] in category_to_label]
    anns = [a for a in anns if include_crowd or not a["iscrowd"]]
    masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, image["height"], image["width"]))
    return {
        "labels": [category_to_label[a["category_id"]] for a in anns],
        "iscrowd": [a["iscrowd"] for a in anns],
        "masks": masks.astype(np.uint8),
    }


@pytest.mark.parametrize(
    ("classes", "include_crowd"), [(None, False), (None, True), (["toothbrush", "person", "dog"], False)]
)
def test_coco_targets_from_the_records(shuffled_split, classes, include_crowd):
    json_path, image_dir, data = shuffled_split
    dataset = CocoDataset(image_dir, json_path, classes=classes, include_crowd=include_crowd)
    category_to_label = dataset.category_id_to_label
    for index, image in enumerate(data["images"]):
        _, target = dataset[index]
        expected = _expected_targets(data, image, category_to_label, include_crowd)
        assert target["image_id"] == image["id"]
        assert target["labels"].tolist() == expected["labels"]
        assert target["iscrowd"].tolist() == expected["iscrowd"]
        assert np.array_equal(target["masks"].numpy(), expected["masks"])
        assert target["area"].tolist() == expected["masks"].sum(axis=(1, 2)).tolist()


def _assert_same_items(dataset, loader):
    served = [sample for images, targets in loader for sample in zip(images, targets)]
    assert len(served) == len(dataset)
    for index, (image, target) in enumerate(served):
        expected_image, expected_target = dataset[index]
        assert torch.equal(image, expected_image)
        assert set(target) == set(expected_target)
        for key, value in expected_target.items():
            assert torch.equal(target[key], value) if torch.is_tensor(value) else target[key] == value, key


def test_coco_workers_serve_what_index_access_gives(shuffled_split):
    json_path, image_dir, _ = shuffled_split
    dataset = CocoDataset(image_dir, json_path, include_crowd=True)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_detection)
    _assert_same_items(dataset, loader)


# What a loader reports about skipped input: bounded by the number of reasons, not by the number of images.
SKIP_REPORTS = ("skipped", "repaired", "skipped_images", "_examples", "skip_report")


def _reachable_objects(dataset) -> int:
    """Python objects reachable from the dataset's attributes but its skip reports.

    A tensor, an array or a path counts as one (a path caches its parts as it is used). An attribute that is an int
    (a count) counts as none: whether two equal counts are one object or two depends on their size (CPython caches
    small ints only).
    """
    seen, stack = set(), [v for k, v in vars(dataset).items() if k not in SKIP_REPORTS and type(v) is not int]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(gc))):
            continue
        seen.add(id(obj))
        if not isinstance(obj, PurePath):
            stack.extend(gc.get_referents(obj))
    return len(seen)


def test_datasets_hold_no_python_objects_per_image(tmp_path):
    """What a forked worker could copy by reading it does not grow with the number of images."""
    small = CocoDataset(*reversed(make_coco_split(tmp_path / "small", image_sizes=[(48, 64), (40, 40)] * 3)))
    large = CocoDataset(*reversed(make_coco_split(tmp_path / "large", image_sizes=[(48, 64), (40, 40)] * 30)))
    assert len(large) == 10 * len(small) and large.num_annotations > 5 * small.num_annotations
    assert _reachable_objects(large) == _reachable_objects(small)

    few = CityscapesDataset(make_cityscapes(tmp_path / "few", splits=("train",), per_city=1), split="train")
    many = CityscapesDataset(make_cityscapes(tmp_path / "many", splits=("train",), per_city=5), split="train")
    assert len(many) == 5 * len(few)
    assert _reachable_objects(many) == _reachable_objects(few)


def test_image_ids_must_be_integers(tmp_path):
    json_path, image_dir = make_coco_split(tmp_path)
    data = json.loads(json_path.read_text())
    data["images"][1]["id"] = "107"
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val2017\.json: image .* has id '107', not an integer"):
        CocoDataset(image_dir, json_path)


# ------------------------------------------------------------------------ category names


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_category_names_read_without_parsing_the_rest(tmp_path):
    categories = [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}]
    # The rest of the file is not valid JSON: only the categories are decoded.
    first = _write(tmp_path / "first.json", f'{{"categories": {json.dumps(categories)}, "images": [oops')
    assert read_category_names(first) == ["a", "b"]
    # A category list longer than the first window, with multi-byte characters across its end.
    many = [{"id": i + 1, "name": f"кошка_{i}"} for i in range(4000)]
    last = _write(tmp_path / "last.json", json.dumps({"images": [], "annotations": [], "categories": many}))
    assert len(last.read_bytes()) > 1 << 16
    assert read_category_names(last) == [c["name"] for c in many]


def test_category_names_fall_back_to_the_whole_file(tmp_path):
    # "categories" twice (here as a category name): the whole file is read.
    data = {"images": [], "annotations": [], "categories": [{"id": 2, "name": "categories"}, {"id": 1, "name": "x"}]}
    twice = _write(tmp_path / "twice.json", json.dumps(data))
    assert read_category_names(twice) == ["x", "categories"]
    broken = _write(tmp_path / "broken.json", '{"images": [], "categories": [{"id": 1, "name": "a"}')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        read_category_names(broken)
    empty = _write(tmp_path / "empty.json", '{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match=r"empty\.json declares no categories"):
        read_category_names(empty)


# ------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_records_and_workers(tmp_path):
    root = make_cityscapes(tmp_path)
    dataset = CityscapesDataset(root, split="val", include_crowd=True)
    expected = sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert dataset.image_files == expected
    assert dataset.instance_files == [
        root / "gtFine" / "val" / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_instanceIds.png")
        for p in expected
    ]
    assert dataset.files(-1) == (dataset.image_files[-1], dataset.instance_files[-1])
    assert dataset[-1][1]["image_id"] == len(dataset)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_detection)
    _assert_same_items(dataset, loader)
