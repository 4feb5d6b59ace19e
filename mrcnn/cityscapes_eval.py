"""Cityscapes' official instance-level AP, computed in process by cityscapesscripts itself.

The paper reports Cityscapes with the dataset's own protocol (``evalInstanceLevelSemanticLabeling``), not
COCO's: AP averaged over overlaps 0.5:0.95 (step 0.05) and AP at overlap 0.5, per class and averaged over
the 8 classes; ground-truth instances under 100 pixels, group regions (``labelId < 1000``) and void pixels
are ignore regions; overlap is mask IoU and a match needs IoU > the threshold (COCO: >=). These numbers do
not compare with the COCO-style mask AP the project also reports.

How: the predictions are written in the script's own format (per image ``<city>_<seq>_<frame>_pred.txt``
with one line ``<mask png> <labelId> <score>`` per instance, and one binary PNG per instance mask) into a
temporary folder, and the script's own functions read them, match them with the ``*_gtFine_instanceIds.png``
files and compute the APs, with the script's default parameters. Its ``evaluateImgLists`` is not called
because it also writes ``matches.json`` into the current directory and caches the ground truth in its package
folder (``gtInstances.json``, stale once the data changes); the functions it chains are called instead, one
image at a time (optionally in worker processes), which gives the same matches and the same AP
(``tests/test_cityscapes_eval.py`` checks it against ``evaluateImgLists`` run on the same files).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import logging
import math
import multiprocessing
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

log = logging.getLogger(__name__)

_GT_SUFFIX = "_gtFine_instanceIds.png"


class _NumpyWithIn1d(types.ModuleType):
    """numpy plus ``in1d``, which numpy 2.4 removed and cityscapesscripts 2.3.0 (its latest release) still calls."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, **kwargs) -> np.ndarray:
        return np.isin(np.ravel(ar1), ar2, **kwargs)


def official_module() -> types.ModuleType:
    """cityscapesscripts' ``evalInstanceLevelSemanticLabeling``, runnable with the installed numpy."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as official

    if not hasattr(np, "in1d") and not isinstance(official.np, _NumpyWithIn1d):
        official.np = _NumpyWithIn1d("numpy")
    return official


def prediction_stem(gt_file: str | Path) -> str:
    """``<city>_<seq>_<frame>`` of a ``*_gtFine_instanceIds.png`` file (the script pairs files by it)."""
    name = Path(gt_file).name
    if not name.endswith(_GT_SUFFIX):
        raise ValueError(f"{gt_file} is not a Cityscapes '*{_GT_SUFFIX}' file")
    return name[: -len(_GT_SUFFIX)]


def write_image_predictions(results: Sequence[dict], gt_file: str | Path, folder: str | Path) -> Path:
    """Writes one image's COCO-style results in the official script's format; returns its txt file.

    Args:
        results: COCO result dicts of the image (``category_id`` = Cityscapes labelId, ``score``, RLE
            ``segmentation``), e.g. from :meth:`mrcnn.evaluation.CocoEvaluator.results_json`.
        gt_file: the image's ``*_gtFine_instanceIds.png``, which names the files.
        folder: where the txt and PNG files go.

    Returns:
        ``<folder>/<city>_<seq>_<frame>_pred.txt``, one line ``<png> <labelId> <score>`` per result (empty
        without results: the script needs a file per image).
    """
    folder = Path(folder)
    stem = prediction_stem(gt_file)
    lines = []
    for i, result in enumerate(results):
        mask = np.ascontiguousarray(mask_utils.decode(result["segmentation"]))
        height, width = mask.shape
        png = f"{stem}_{i}.png"
        # A 1-bit PNG (the script reads any non-zero pixel as the instance) with little compression:
        # 8x fewer bytes to encode than 8-bit, and the files live for one evaluation only.
        bits = Image.frombytes("1", (width, height), np.packbits(mask, axis=1).tobytes())
        bits.save(folder / png, compress_level=1)
        # repr keeps every digit of the score, so the script ranks exactly as the model did.
        lines.append(f"{png} {int(result['category_id'])} {float(result['score'])!r}\n")
    txt = folder / f"{stem}_pred.txt"
    txt.write_text("".join(lines))
    return txt


def official_args(prediction_root: str | Path, classes: Sequence[str] | None = None) -> object:
    """A copy of the script's parameters (overlaps 0.5:0.95, 100-pixel minimum region, no distances), quiet.

    Args:
        classes: the classes to score, a subset of the script's 8 (those the model was trained on, ``data.classes``);
            ``None``: all 8. The script averages over every class it scores, so a class the model never learned
            would count as AP 0; left out, its ground truth is not scored, as in the COCO-style AP.
    """
    args = copy.deepcopy(official_module().args)
    args.predictionPath = str(Path(prediction_root).absolute())
    args.predictionWalk = None
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    official_module().setInstanceLabels(args)
    if classes is not None:
        unknown = sorted(set(classes) - set(args.instLabels))
        if unknown:
            raise ValueError(f"classes {unknown} are not Cityscapes instance classes {args.instLabels}")
        args.instLabels = [name for name in args.instLabels if name in set(classes)]
    return args


@contextlib.contextmanager
def _script_errors():
    """The script's ``printError`` (a message on stdout, then ``sys.exit``) as a ``RuntimeError``."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            yield
    except SystemExit as error:
        raise RuntimeError(f"cityscapesscripts stopped: {output.getvalue().strip()}") from error


def _label_ids_in_table(gt_file: Path, folder: Path) -> Path:
    """``gt_file``, or a copy in ``folder`` with the values whose labelId is not in the script's label table set to 0.

    The script looks every value's labelId up in its table (``id2label``) and raises ``KeyError`` on one that
    is not there; the dataset leaves such values out of the targets and counts them
    (:class:`mrcnn.data.cityscapes.CityscapesDataset`), and here they become unlabeled (void) pixels, which
    the script ignores, instead of stopping the evaluation.
    """
    from cityscapesscripts.helpers.labels import id2label

    with Image.open(gt_file) as image:
        ids = np.array(image, dtype=np.int32)
    label_ids = np.where(ids >= 1000, ids // 1000, ids)
    unknown = ~np.isin(label_ids, np.array(sorted(id2label)))
    if not unknown.any():
        return gt_file
    ids[unknown] = 0
    copy_path = folder / f"void_{gt_file.name}"
    Image.fromarray(ids.astype(np.uint16)).save(copy_path)
    return copy_path


def match_image(
    results: Sequence[dict], gt_file: str | Path, folder: str | Path, classes: Sequence[str] | None = None
) -> dict:
    """Writes one image's predictions and matches them with its ground truth by the script's functions.

    ``classes``: those scored (:func:`official_args`).

    Returns:
        the script's matches of this image, ``{<gt file path>: {"groundTruth": ..., "prediction": ...}}``.
    """
    official = official_module()
    txt = write_image_predictions(results, gt_file, folder)
    args = official_args(folder, classes)
    gt_file = str(_label_ids_in_table(Path(gt_file), Path(folder)).absolute())
    with _script_errors():
        gt_instances = official.instances2dict([gt_file], False)
        return official.matchGtWithPreds([str(txt.absolute())], [gt_file], gt_instances, args)


def _match_image_task(task: tuple) -> dict:
    return match_image(*task)


def evaluate_matches(matches: dict, prediction_root: str | Path, classes: Sequence[str] | None = None) -> dict:
    """The script's AP from its matches: ``{"allAp", "allAp50%", "classes": {name: {"ap", "ap50%"}}}``, over
    ``classes`` (:func:`official_args`).

    Fractions; NaN for a class without ground truth.
    """
    official = official_module()
    args = official_args(prediction_root, classes)
    with _script_errors():
        try:
            aps = official.evaluateMatches(matches, args)
        except IndexError:
            aps = _evaluate_each_class_and_overlap(official, matches, args)
        return official.computeAverages(aps, args)


def _evaluate_each_class_and_overlap(official, matches: dict, args) -> np.ndarray:
    """The script's AP array, one (class, overlap) cell at a time, with 0 where the script fails.

    The script fails (``IndexError`` on an empty array) for a class that has ground truth and predictions when, at
    an overlap, every prediction matched nothing and was discounted on ignore pixels (void, a group region, a
    too-small instance): no score is left to rank. Its recall is then 0, and so is its AP; every other cell is the
    script's own number.
    """
    aps = np.zeros((1, len(args.instLabels), len(args.overlaps)))
    for li, label in enumerate(args.instLabels):
        for oi, overlap in enumerate(args.overlaps):
            one = copy.copy(args)
            one.instLabels, one.overlaps = [label], np.array([overlap])
            try:
                aps[0, li, oi] = official.evaluateMatches(matches, one)[0, 0, 0]
            except IndexError:
                aps[0, li, oi] = 0.0
    return aps


def metrics_from_averages(averages: dict) -> dict[str, float]:
    """The script's averages as flat metrics: ``cityscapes_AP``, ``cityscapes_AP50``, ``cityscapes_AP_<class>``, ...

    Fractions like the COCO numbers; -1.0 where the script has NaN (no ground truth), pycocotools' convention.
    """

    def value(x) -> float:
        x = float(x)
        return -1.0 if math.isnan(x) else x

    metrics = {"cityscapes_AP": value(averages["allAp"]), "cityscapes_AP50": value(averages["allAp50%"])}
    for name, per_class in averages["classes"].items():
        metrics[f"cityscapes_AP_{name}"] = value(per_class["ap"])
        metrics[f"cityscapes_AP50_{name}"] = value(per_class["ap50%"])
    return metrics


def evaluate_results(
    results: Sequence[dict],
    gt_files: Mapping[int, str | Path],
    workers: int = 0,
    classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Official Cityscapes AP of COCO-style results on the images ``gt_files`` names.

    The same computation as the script's ``evaluateImgLists`` (images matched one by one, then AP over all
    matches), image by image in ``workers`` processes (0: in this one): writing the masks and matching
    them cost about 2.5 s per 2048x1024 image with 100 detections on one CPU core.

    Args:
        results: COCO result dicts (see :func:`write_image_predictions`); those of other images are ignored.
        gt_files: ``{image_id: *_gtFine_instanceIds.png}`` of the images to evaluate.
        workers: processes for writing and matching, spawned: a script that calls this with ``workers > 0`` needs
            the ``if __name__ == "__main__":`` guard, as every spawned process's main script does (``run.py`` has it).
        classes: the classes scored (:func:`official_args`); ``None``: the script's 8.
    """
    if not gt_files:
        raise ValueError("no images to evaluate")
    by_image: dict[int, list[dict]] = {image_id: [] for image_id in gt_files}
    for result in results:
        if result["image_id"] in by_image:
            by_image[result["image_id"]].append(result)
    with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as folder:
        tasks = [(by_image[image_id], gt_file, folder, classes) for image_id, gt_file in gt_files.items()]
        if workers > 0:
            # Spawned, not forked: a fork copies the training process with its threads (loader pinning, W&B, NCCL), and a
            # lock one of them held at that moment stays held in the copy for good, a hang. A spawned worker starts a
            # new interpreter that imports this module and the main script's top level (run.py's: Hydra and the
            # config, not torch), about 0.6 s for two workers once per evaluation.
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
                per_image = list(pool.map(_match_image_task, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
        else:
            per_image = [_match_image_task(task) for task in tasks]
        matches = {}
        for image_matches in per_image:  # in ground-truth order, as the script keeps them
            matches.update(image_matches)
        averages = evaluate_matches(matches, folder, classes)
    return metrics_from_averages(averages)


class CityscapesEvaluator:
    """Official Cityscapes instance AP of a validation pass, from the COCO evaluator's results.

    Args:
        gt_files: ``{image_id: *_gtFine_instanceIds.png}`` of the validation set
            (:class:`mrcnn.data.cityscapes.CityscapesDataset`'s ``image_ids`` and ``instance_files``).
        workers: processes that write and match the predictions (0: the calling process).
        classes: the classes the model detects (the dataset's ``class_names``), those scored; ``None``: all 8.
    """

    def __init__(self, gt_files: Mapping[int, str | Path], workers: int = 0, classes: Sequence[str] | None = None):
        self.gt_files = {int(k): Path(v) for k, v in gt_files.items()}
        self.workers = int(workers)
        self.classes = None if classes is None else list(classes)
        official_module()  # fail at setup, not at the end of an epoch, when cityscapesscripts is missing

    @classmethod
    def for_dataset(cls, dataset, workers: int = 0) -> CityscapesEvaluator | None:
        """The evaluator of a Cityscapes dataset (one with ``instance_files``); ``None`` for other data."""
        from mrcnn.data.cityscapes import CityscapesDataset

        if not isinstance(dataset, CityscapesDataset):
            return None
        return cls(dict(zip(dataset.image_ids, dataset.instance_files)), workers, dataset.class_names)

    def compute(self, results: Sequence[dict], image_ids: Sequence[int]) -> dict[str, float]:
        """Official AP over the images ``image_ids`` (those evaluated; a partial pass counts only those).

        Under DDP rank zero computes and sends the numbers to the others; every rank must call it.

        Args:
            results: COCO result dicts of every rank (``CocoEvaluator.results_json()`` after ``compute``).
            image_ids: every evaluated image, with or without detections.
        """
        import torch.distributed as dist  # here: the worker processes need no torch

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        outcome = None
        if not distributed or dist.get_rank() == 0:
            try:
                outcome = ("metrics", self._evaluate(results, image_ids))
            except Exception as error:  # sent to every rank, so none waits for numbers that never come
                if not distributed:
                    raise
                outcome = ("error", f"{type(error).__name__}: {error}")
        if distributed:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        if outcome[0] == "error":
            raise RuntimeError(f"official Cityscapes evaluation failed on rank 0: {outcome[1]}")
        return outcome[1]

    def _evaluate(self, results: Sequence[dict], image_ids: Sequence[int]) -> dict[str, float]:
        if not image_ids:
            # Nothing evaluated (e.g. limit_val_batches=0): pycocotools' "no value" as for the COCO numbers.
            return {"cityscapes_AP": -1.0, "cityscapes_AP50": -1.0}
        unknown = sorted(set(image_ids) - set(self.gt_files))
        if unknown:
            raise ValueError(f"image ids {unknown[:5]} are not images of the Cityscapes ground truth")
        return evaluate_results(results, {i: self.gt_files[i] for i in sorted(image_ids)}, self.workers, self.classes)
