"""COCO-style box and mask AP, as a torchmetrics ``Metric``.

The numbers are pycocotools' own: :class:`CocoEvaluator` only converts the model's
outputs and the dataset's targets into COCO annotation dicts, hands them to
``COCOeval`` and returns ``stats[0:6]`` (AP, AP50, AP75, APs, APm, APl) for each IoU
type. Its state is torchmetrics' (``reset``, ``update``, ``compute``, DDP sync through
``Metric``): under DDP every rank gathers all ranks' per-image records, de-duplicates
them by image id and runs the same evaluation.

Why not torchmetrics' own ``MeanAveragePrecision``: it numbers images itself, so it
cannot score against a dataset's json ground truth (the json's image, category and
annotation ids, its crowd regions, COCO's mask areas), and its default IoU and recall
thresholds are float32, which moves AP by up to 1/101 per class against pycocotools.
This metric keeps each image's record (RLE-encoded at once) as a small pickled byte
tensor. Where both take the same input they give the same numbers
(``tests/test_evaluation.py``, which also lists where their conventions differ).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

log = logging.getLogger(__name__)

# The six AP numbers of COCOeval.summarize(), in the order of its ``stats`` array.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")


def gather_objects(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor``, whatever its dtype and length (torchmetrics' ``dist_sync_fn``).

    torchmetrics' default gather needs one dtype on every rank, but a rank that saw no image
    contributes an empty float tensor: sending pickled tensors avoids the mismatch.
    """
    gathered: list[torch.Tensor | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, tensor.cpu(), group=group)
    return gathered


class CocoEvaluator(Metric):
    """Accumulates predictions and ground truth over a dataset, then computes COCO AP.

    ``update`` is called once per batch; it moves everything to the CPU and encodes
    masks to RLE right away, so full-resolution masks are never kept. ``compute``
    builds an in-memory COCO ground-truth object (or uses ``coco_gt``), runs
    ``COCOeval`` for each IoU type and returns a flat dict of floats::

        {"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ...}

    Values follow pycocotools exactly, including its ``-1.0`` for a number that has
    no ground truth to measure (e.g. ``APs`` when no ground-truth object is small).

    Args:
        iou_types: which of ``"bbox"`` and ``"segm"`` to evaluate.
        mask_threshold: predicted mask probabilities above this value are foreground.
        label_to_category_id: maps the contiguous training labels 1..K back to the
            dataset's category ids (COCO's 1..90 with gaps). ``None`` means
            category id = label.
        class_names: names of labels 1..K; only used to name the categories of the
            in-memory ground truth.
        coco_gt: a ``pycocotools.coco.COCO`` object holding the ground truth (e.g.
            loaded from a COCO json). When given, ground truth comes from it, only
            the images passed to ``update`` are evaluated and ``targets`` may be
            ``None`` (predictions must then carry ``image_id``).
        backend: ``"pycocotools"`` (reference) or ``"faster_coco_eval"`` (same
            numbers, C++ evaluation, several times faster on masks).
        kwargs: torchmetrics ``Metric`` arguments (e.g. ``process_group``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        iou_types: Sequence[str] = IOU_TYPES,
        mask_threshold: float = 0.5,
        label_to_category_id: Mapping[int, int] | None = None,
        class_names: Sequence[str] | None = None,
        coco_gt: Any = None,
        backend: str = "pycocotools",
        **kwargs: Any,
    ) -> None:
        super().__init__(dist_sync_fn=gather_objects, **kwargs)
        # One image's record (image id, size, ground truth and detections as COCO dicts) is a pickled
        # uint8 tensor; record_sizes splits their concatenation (which is what a DDP sync returns).
        self.add_state("record_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("record_sizes", default=[], dist_reduce_fx="cat")
        self.iou_types = tuple(iou_types)
        for iou_type in self.iou_types:
            if iou_type not in IOU_TYPES:
                raise ValueError(f"iou_types must be among {IOU_TYPES}, got {iou_type!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faster_coco_eval":
            import faster_coco_eval  # noqa: F401  (fail here, not at the end of an epoch)

        self.mask_threshold = float(mask_threshold)
        # int() both sides: Hydra hands over DictConfig, json hands over str keys.
        self.label_to_category_id = (
            None if label_to_category_id is None else {int(k): int(v) for k, v in label_to_category_id.items()}
        )
        self.class_names = None if class_names is None else list(class_names)
        self.coco_gt = coco_gt
        self.backend = backend
        # Every rank's records as merged by the last compute(), for results_json(); None when stale.
        self._merged: dict[int, dict] | None = None
        # Why the last compute() had nothing to score (every AP undefined), or None.
        self.nothing_to_score: str | None = None

    def reset(self) -> None:
        """Forget every image seen so far (call at the start of each evaluation)."""
        super().reset()
        self._merged = None

    def _records(self) -> dict[int, dict]:
        """``image_id -> {"height", "width", "gt": [annotation dicts], "dt": [result dicts]}``.

        Decoded from the states: this rank's images, or every rank's inside a synced ``compute``.
        A later record of an image id replaces an earlier one, so an image counts once (under DDP,
        DistributedSampler's padding repeats images, with the same prediction).
        """
        if isinstance(self.record_bytes, list) and not self.record_bytes:
            return {}
        data = dim_zero_cat(self.record_bytes).to("cpu", torch.uint8).numpy().tobytes()
        # A rank without images sends an empty float tensor: the sizes may come back as floats.
        sizes = dim_zero_cat(self.record_sizes).to("cpu").round().long().tolist()
        records, start = {}, 0
        for size in sizes:
            image_id, record = pickle.loads(data[start : start + size])
            records[image_id] = record
            start += size
        return records

    # ------------------------------------------------------------------ update

    def update(self, predictions: Sequence[dict], targets: Sequence[dict] | None = None) -> None:
        """Adds one batch.

        Args:
            predictions: one dict per image with ``boxes`` float [M, 4] xyxy pixels,
                ``labels`` int64 [M] (1..K), ``scores`` float [M] and, for ``"segm"``,
                ``masks`` float [M, 1, H, W] probabilities (or uint8/bool [M, H, W]),
                all at the original image resolution.
            targets: one dict per image with ``boxes`` float [N, 4] xyxy, ``labels``
                int64 [N], ``masks`` uint8 [N, H, W], ``iscrowd`` int64 [N],
                ``area`` float [N] and ``image_id`` (int or 0-dim tensor). May be
                ``None`` when ``coco_gt`` was given.

        An image id seen before replaces the earlier record, so an image counts once.
        """
        if targets is None:
            if self.coco_gt is None:
                raise ValueError("targets are required unless coco_gt is given")
            targets = [None] * len(predictions)
        if len(targets) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")

        # Each read below of a tensor on the GPU would make the host wait for it: copy the batch to the host at once.
        segm = "segm" in self.iou_types
        predictions = on_host(predictions, self.mask_threshold if segm else None)
        targets = on_host(targets, 0.5 if segm and self.coco_gt is None else None)  # coco_gt: only the image ids

        self._merged = None
        for prediction, target in zip(predictions, targets):
            image_id = _image_id(prediction, target)
            height, width = self._image_size(image_id, prediction, target)
            gt = [] if self.coco_gt is not None else self._gt_annotations(target)
            record = {"height": height, "width": width, "gt": gt, "dt": self._results(image_id, prediction)}
            data = pickle.dumps((image_id, record), protocol=pickle.HIGHEST_PROTOCOL)
            self.record_bytes.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self.record_sizes.append(torch.tensor([len(data)], dtype=torch.int64))

    def _category_id(self, label: int) -> int:
        if self.label_to_category_id is None:
            return label
        if label not in self.label_to_category_id:
            raise KeyError(f"label {label} is missing from label_to_category_id")
        return self.label_to_category_id[label]

    def _image_size(self, image_id: int, prediction: dict, target: dict | None) -> tuple[int, int]:
        # Only used for the images of the in-memory ground truth; RLE carries its own size.
        for source in (target, prediction):
            if source is not None and "masks" in source:
                height, width = source["masks"].shape[-2:]
                return int(height), int(width)
        if self.coco_gt is not None and image_id in self.coco_gt.imgs:
            info = self.coco_gt.imgs[image_id]
            return int(info["height"]), int(info["width"])
        return 0, 0

    def _gt_annotations(self, target: dict) -> list[dict]:
        """Target dict -> COCO annotation dicts (without ``id`` and ``image_id``)."""
        boxes = _xyxy_to_xywh(target["boxes"])
        labels = target["labels"].detach().cpu().tolist()
        n = len(labels)
        iscrowd = target["iscrowd"].detach().cpu().tolist() if "iscrowd" in target else [0] * n

        rles = None
        if "segm" in self.iou_types:
            if "masks" not in target:
                raise ValueError("segm evaluation needs 'masks' in the targets")
            rles = _encode(_binary_masks(target["masks"], 0.5))
        if "area" in target:
            areas = target["area"].detach().cpu().double().tolist()
        elif rles is not None:
            # COCO's area is the object's mask area, not its box area.
            areas = mask_utils.area(rles).astype(np.float64).tolist() if rles else []
        else:
            areas = [w * h for _, _, w, h in boxes]

        annotations = []
        for i in range(n):
            annotation = {
                "category_id": self._category_id(int(labels[i])),
                "bbox": boxes[i],
                "area": float(areas[i]),
                "iscrowd": int(iscrowd[i]),
            }
            if rles is not None:
                annotation["segmentation"] = rles[i]
            annotations.append(annotation)
        return annotations

    def _results(self, image_id: int, prediction: dict) -> list[dict]:
        """Prediction dict -> COCO result dicts."""
        boxes = _xyxy_to_xywh(prediction["boxes"])
        labels = prediction["labels"].detach().cpu().tolist()
        scores = prediction["scores"].detach().cpu().tolist()
        rles = None
        if "segm" in self.iou_types:
            if "masks" not in prediction:
                raise ValueError("segm evaluation needs 'masks' in the predictions")
            rles = _encode(_binary_masks(prediction["masks"], self.mask_threshold))

        results = []
        for i in range(len(labels)):
            result = {
                "image_id": image_id,
                "category_id": self._category_id(int(labels[i])),
                "bbox": boxes[i],
                "score": float(scores[i]),
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
        return results

    # ----------------------------------------------------------------- compute

    def results_json(self) -> list[dict]:
        """All detections as a COCO results list, sorted by image id.

        Each entry: ``image_id``, ``category_id`` (mapped), ``bbox`` [x, y, w, h],
        ``score`` and, with ``"segm"``, ``segmentation`` (RLE, ``counts`` as str). It
        can be dumped to json and loaded with ``COCO.loadRes``. Under DDP this holds
        this rank's images until ``compute`` has run, all images after.
        """
        records = self._merged if self._merged is not None else self._records()
        results = []
        for image_id in sorted(records):
            results.extend(dict(result) for result in records[image_id]["dt"])
        return results

    def image_ids(self) -> list[int]:
        """Ids of the images given to ``update`` (with or without detections), sorted.

        Under DDP this rank's images until ``compute`` has run, all images after.
        """
        records = self._merged if self._merged is not None else self._records()
        return sorted(records)

    def compute(self) -> dict[str, float]:
        """Runs COCOeval for each IoU type over every image given to ``update``.

        Under DDP every rank must call it (torchmetrics gathers the states first); all ranks
        return the same numbers.

        Returns:
            ``{f"{iou_type}_{name}": float}`` for name in AP, AP50, AP75, APs, APm, APl.
        """
        records = self._merged = self._records()
        image_ids = sorted(records)
        self.nothing_to_score = None
        if not image_ids:
            # Nothing to evaluate; pycocotools' value for "no ground truth" is -1.
            self._nothing_to_score("no image was evaluated (an empty validation set, or limit_val_batches=0)")
            return {f"{t}_{name}": -1.0 for t in self.iou_types for name in STAT_NAMES}

        coco_module, cocoeval_class = _backend_classes(self.backend)
        metrics = {}
        # pycocotools prints progress and the summary table to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = self._coco_gt(coco_module, records)
        objects = sum(not a.get("iscrowd", 0) for i in image_ids for a in coco_gt.imgToAnns.get(i, []))
        if objects == 0:
            self._nothing_to_score(
                f"the ground truth of the {len(image_ids)} evaluated images holds no non-crowd object (crowd "
                "regions are only ignored), so every AP is undefined"
            )
        with contextlib.redirect_stdout(io.StringIO()):
            for iou_type in self.iou_types:
                coco_dt = _load_results(coco_module, coco_gt, _results_for(records, iou_type))
                if self.backend == "faster_coco_eval":
                    evaluator = cocoeval_class(coco_gt, coco_dt, iou_type, print_function=_silent)
                else:
                    evaluator = cocoeval_class(coco_gt, coco_dt, iou_type)
                # Exactly the images seen (coco_gt may hold a whole json's images).
                evaluator.params.imgIds = image_ids
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
                for i, name in enumerate(STAT_NAMES):
                    metrics[f"{iou_type}_{name}"] = float(evaluator.stats[i])
        return metrics

    def _nothing_to_score(self, reason: str) -> None:
        self.nothing_to_score = reason
        log.warning("COCO evaluation: nothing to score: %s", reason)

    def _coco_gt(self, coco_module: Any, records: dict[int, dict]) -> Any:
        """The ground truth as a COCO object of the chosen backend."""
        if self.coco_gt is not None:
            if isinstance(self.coco_gt, coco_module.COCO):
                return self.coco_gt
            return _make_coco(coco_module, self.coco_gt.dataset)
        return _make_coco(coco_module, self._gt_dataset(records))

    def _gt_dataset(self, records: dict[int, dict]) -> dict:
        """A COCO ground-truth dataset dict built from the recorded targets."""
        images, annotations = [], []
        for image_id in sorted(records):
            record = records[image_id]
            # Images without annotations are listed too: their detections are false positives.
            images.append({"id": image_id, "height": record["height"], "width": record["width"]})
            for annotation in record["gt"]:
                # Fresh dicts with ids from 1: COCOeval reads id 0 as "unmatched"
                # and writes into the dicts it is given.
                annotations.append(dict(annotation, id=len(annotations) + 1, image_id=image_id))

        # Declared categories plus any seen; one without ground truth is ignored by
        # COCOeval (its precision stays -1), exactly as with a json ground truth.
        names = {}
        if self.label_to_category_id is not None:
            for label, category_id in self.label_to_category_id.items():
                names[category_id] = str(category_id)
                if self.class_names is not None and 1 <= label <= len(self.class_names):
                    names[category_id] = self.class_names[label - 1]
        elif self.class_names is not None:
            names = {label: name for label, name in enumerate(self.class_names, start=1)}
        for record in records.values():
            for annotation in record["gt"] + record["dt"]:
                names.setdefault(annotation["category_id"], str(annotation["category_id"]))
        categories = [{"id": category_id, "name": names[category_id]} for category_id in sorted(names)]
        return {"images": images, "annotations": annotations, "categories": categories}


# ---------------------------------------------------------------------- helpers


def _results_for(records: dict[int, dict], iou_type: str) -> list[dict]:
    """Fresh result dicts for one IoU type, by image id (loadRes writes into them)."""
    results = []
    for image_id in sorted(records):
        for result in records[image_id]["dt"]:
            # For masks, leave out "bbox": with it loadRes takes the box area as the
            # detection's area, which shifts the small/medium/large split of APs/m/l.
            key = "bbox" if iou_type == "bbox" else "segmentation"
            results.append(
                {"image_id": image_id, "category_id": result["category_id"], key: result[key], "score": result["score"]}
            )
    return results


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _backend_classes(backend: str) -> tuple[Any, Any]:
    """(module with a ``COCO`` class, COCOeval class) of the backend."""
    if backend == "faster_coco_eval":
        import faster_coco_eval

        return faster_coco_eval, faster_coco_eval.COCOeval_faster
    import pycocotools.coco
    from pycocotools.cocoeval import COCOeval

    return pycocotools.coco, COCOeval


def _make_coco(coco_module: Any, dataset: dict) -> Any:
    coco = coco_module.COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _load_results(coco_module: Any, coco_gt: Any, results: list[dict]) -> Any:
    if results:
        return coco_gt.loadRes(results)
    # pycocotools' loadRes fails on an empty list (it reads results[0]): build the
    # empty detections object by hand. Every image then scores AP 0.
    empty = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
    return _make_coco(coco_module, empty)


def _image_id(prediction: dict, target: dict | None) -> int:
    source = target if target is not None else prediction
    if "image_id" not in source:
        raise ValueError("need 'image_id' in the targets (or in the predictions when targets is None)")
    image_id = source["image_id"]
    return int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id)


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    """[N, 4] xyxy tensor -> N lists [x, y, w, h] of python floats."""
    boxes = boxes.detach().reshape(-1, 4).to("cpu", torch.float64)
    # Out of place: the conversion above copies nothing when the boxes are float64 on the host already (the
    # caller's own tensor).
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def on_host(records: Sequence[dict | None], mask_threshold: float | None) -> list[dict | None]:
    """The tensors of a batch's per-image dicts on the host, copied from the device in one transfer.

    Reading each image's boxes, labels, scores and masks from the GPU one by one makes the host wait for the GPU once
    per tensor (five times an image); one copy of them all waits once per batch. Every tensor is written into one
    device buffer (masks thresholded on the way: bool is a quarter of float32's bytes), which is copied once.

    Args:
        records: per image a dict of tensors (``masks`` [M, 1, H, W] or [M, H, W], float probabilities or
            uint8/bool), or None.
        mask_threshold: a float mask is ``masks > mask_threshold`` (a uint8 or bool one is ``masks != 0``); None:
            masks on the device stay there, uncopied (box AP reads only their shape).

    Returns:
        New dicts (the same Nones) whose device tensors are host tensors of the same shape; masks copied from the
        device are bool. Host tensors and other values are the same objects.
    """
    records = [None if record is None else dict(record) for record in records]
    parts = []  # (image, key, device tensor, dtype on the host)
    for i, record in enumerate(records):
        if record is None:
            continue
        for key, value in record.items():
            if not _on_device(value) or (key == "masks" and mask_threshold is None):
                continue
            dtype = torch.bool if key == "masks" else value.dtype
            if value.numel() == 0:
                record[key] = torch.empty(value.shape, dtype=dtype)  # nothing to read
            else:
                parts.append((i, key, value.detach(), dtype))
    if not parts:
        return records
    # Widest elements first: every part then starts at a multiple of its own element size (all sizes are powers of
    # two), which viewing the bytes as that dtype requires, on the device and on the host.
    parts.sort(key=lambda part: -part[3].itemsize)
    sizes = [value.numel() * dtype.itemsize for _, _, value, dtype in parts]
    device = parts[0][2].device
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    start = 0
    for (_, key, value, dtype), size in zip(parts, sizes):
        part = buffer[start : start + size].view(dtype).view(value.shape)
        value = value.to(device)  # (one model's outputs share a device: a no-op)
        if key != "masks":
            part.copy_(value)
        elif value.is_floating_point():
            torch.gt(value, mask_threshold, out=part)
        else:
            torch.ne(value, 0, out=part)
        start += size
    host = buffer.cpu()
    start = 0
    for (i, key, value, dtype), size in zip(parts, sizes):
        records[i][key] = host[start : start + size].view(dtype).view(value.shape)
        start += size
    return records


def _on_device(value: Any) -> bool:
    """Whether ``value`` is a tensor that reading on the host would have to copy from an accelerator first."""
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _binary_masks(masks: torch.Tensor, threshold: float) -> np.ndarray:
    """Host masks [N, 1, H, W] or [N, H, W] (float, uint8 or bool) -> uint8 [N, H, W] of 0/1.

    Device masks were thresholded and copied by :func:`on_host` before they get here.
    """
    masks = masks.detach()
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.dtype == torch.bfloat16:
        masks = masks.float()  # numpy has no bfloat16
    # On the CPU, numpy: torch's elementwise ops use OpenMP threads, which slow
    # down many times over when other processes (dataloader workers) hold the cores.
    masks = masks.cpu().numpy()
    masks = masks > threshold if np.issubdtype(masks.dtype, np.floating) else masks != 0
    return masks.view(np.uint8)


def _encode(masks: np.ndarray) -> list[dict]:
    """uint8 [N, H, W] -> N compressed RLEs with ``counts`` as str (json-ready)."""
    if masks.shape[0] == 0:
        return []
    # pycocotools wants [H, W, N] in Fortran order.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
