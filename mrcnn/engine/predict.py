"""``mode=predict``: run a trained model on image files, write overlay PNGs and a COCO results json.

    python run.py mode=predict ckpt_path=<last.ckpt> predict.input=<image or folder> predict.output=<folder>
        (the checkpoint's classes and category ids; predict.coco_json=<json>: its image and category ids)
    python run.py model=torchvision_r50_fpn model.num_classes=90 weights=<torchvision .pth> \
        predict.class_names=coco mode=predict predict.input=... predict.output=...

Lightning runs the loop (devices, precision, DDP); :class:`PredictionWriter` writes the files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from mrcnn.data.coco import load_coco_json
from mrcnn.data.datamodule import collate_detection, worker_context
from mrcnn.data.images import (
    ImageLimits,
    check_regular_file,
    file_kind,
    read_image,
    read_image_size,
    size_mismatch_message,
)
from mrcnn.data.samplers import SameSizeBatches
from mrcnn.engine import job_processes
from mrcnn.engine.build import build_module, job_overrides
from mrcnn.engine.checkpoint_model import key_overrides, use_checkpoint_model
from mrcnn.engine.checkpoints import check_checkpoint_fits
from mrcnn.engine.config_checks import check_config, checkpoint_path
from mrcnn.engine.launch import check_run_dir_is_free, in_sweep, is_ddp_child, job_scope
from mrcnn.engine.model_record import read_model_record
from mrcnn.engine.process_meeting import processes_meet
from mrcnn.engine.quiet import reading_weights_only
from mrcnn.engine.train import stops_with_nonzero_exit
from mrcnn.engine.visualize import draw_instances, save_png, select
from mrcnn.errors import CommandError
from mrcnn.evaluation import CocoEvaluator, on_host

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESULTS_FILE = "coco_results.json"
UNREADABLE_STAND_IN = (32, 32)  # (height, width) of the black image the model sees for a file that cannot be read
IMAGES_FILE = "images.json"


def overlay_name(file_name: str) -> str:
    """The overlay PNG's name for an input file: its whole name plus ``.png`` (``a.jpg`` -> ``a.jpg.png``).

    Keeping the extension keeps every input's overlay: ``a.jpg`` and ``a.png`` in one folder would both
    become ``a.png`` by stem.
    """
    return f"{file_name}.png"


def raise_score_threshold(model: torch.nn.Module, score_threshold: float) -> None:
    """Makes ``model`` drop, before NMS, the detections scoring below ``score_threshold``, which prediction drops
    anyway: their masks are then never pasted at full image size (a 12-MPix photo's 100 detections are 1.2 GB as
    bytes) nor copied to the host.

    The detections kept are those the model would give at its own threshold, then filtered (a suppressing box
    scores higher, so it is kept as well; the top ``detections_per_img`` above the threshold are the same). The
    model keeps scores *above* its threshold and prediction those *at least* at ``score_threshold``: the model
    gets the float32 just below it. A threshold under the model's own leaves it as it is.
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None or not hasattr(heads, "score_thresh"):
        return
    below = float(np.nextafter(np.float32(score_threshold), np.float32(-np.inf)))
    heads.score_thresh = max(heads.score_thresh, below)


def check_overlay_names(files: Sequence[Path], output: Path) -> None:
    """Stops before any work when an input's overlay name (:func:`overlay_name`) is longer than the output folder's
    file system allows (255 bytes on most): an input name of 252 bytes or more would fail at its turn.

    Raises:
        ValueError: naming the output folder, the limit and the inputs.
    """
    try:
        limit = os.pathconf(output, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such query here (not POSIX), or no limit
        return
    long = [f.name for f in files if len(os.fsencode(overlay_name(f.name))) > limit]
    if long:
        raise ValueError(
            f"predict.output={output}: the overlay names of {len(long)} inputs (<file name>.png) would be longer than "
            f"the {limit} bytes this file system allows: {long[:3]}; shorten those file names"
        )


class ImageFiles(Dataset):
    """One image file, or every image file in a folder (sorted by name).

    Every file is checked when this is built, from its header: a regular file, readable as an image, within
    ``limits``; in a folder, a file that is not is left out and listed in :attr:`skipped`. Item ``i`` is
    ``(image float [3, H, W] in 0..1, {"image_id": ..., "file_name": ...})``: the image's id in ``coco_json``
    (matched by file name) when one is given, so that the results load and evaluate against that json; else its
    number in the folder's image files by name, from 1 (the files left out keep theirs).

    Args:
        limits: the largest images accepted (``data.image_limits``); ``None``: PIL's own limit only.
    """

    def __init__(self, path: str | Path, coco_json: str | Path | None = None, limits: ImageLimits | None = None):
        path = Path(path)
        self.limits = limits
        if path.is_dir():
            entries = sorted(path.iterdir())
            self.files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
            others = [p.name + ("/" if p.is_dir() else "") for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
            if others:
                # Said, not silent: a folder of photos may hold kinds this reader leaves out (.heic, .jfif, subfolders).
                log.info(
                    "predict.input=%s: %d image files; %d other entries left out (%s%s)",
                    path,
                    len(self.files),
                    len(others),
                    ", ".join(others[:5]),
                    ", ..." if len(others) > 5 else "",
                )
        elif path.exists():
            check_regular_file(path, "predict.input")
            self.files = [path]
        else:
            raise FileNotFoundError(f"predict.input={path} is neither an image file nor a folder")
        if not self.files:
            raise ValueError(f"predict.input={path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        irregular = [f"{f.name} ({file_kind(f.stat().st_mode)})" for f in self.files if not f.is_file()]
        if irregular:
            raise ValueError(f"predict.input={path}: {len(irregular)} entries are not regular files: {irregular[:3]}")
        # (height, width) of every upright image from its header, checked against the limits before any work. In a
        # folder, a file whose header cannot be read (empty, not an image, beyond the limits) is skipped and counted,
        # as one whose pixels cannot be read is later: one bad file in a folder of thousands does not stop the run.
        self.skipped: list[tuple[str, str]] = []  # (file name, why)
        self.sizes, self.image_ids, kept = [], [], []
        for number, file in enumerate(self.files, start=1):
            try:
                self.sizes.append(read_image_size(file, limits))
            except ValueError as error:
                if not path.is_dir():
                    raise CommandError(f"predict.input={path}: {error}") from None
                self.skipped.append((file.name, str(error)))
                log.warning("skipped %s: %s", file.name, error)
                continue
            kept.append(file)
            self.image_ids.append(number)  # a skipped file keeps its number: the others' ids do not move
        self.files = kept
        if not self.files:
            raise ValueError(
                f"predict.input={path}: none of its {len(self.skipped)} image files can be read, e.g. "
                f"{self.skipped[0][1]}"
            )
        self.categories: list | None = None  # coco_json's, to number the results' categories as it does
        if coco_json is not None:
            data = load_coco_json(coco_json)
            self.categories = data["categories"]
            self.image_ids = self._ids_from(coco_json, data["images"])

    def _ids_from(self, coco_json: str | Path, images: list) -> list[int]:
        """Each file's image id in ``coco_json`` (its ``images``), matched by file name; the json's size checked against
        the file's."""
        entries: dict[str, list[dict]] = {}
        for image in images:
            if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
                continue
            if type(image.get("id")) is not int:
                raise ValueError(
                    f"predict.coco_json={coco_json}: image {image['file_name']!r} has id {image.get('id')!r}, "
                    "not an integer"
                )
            entries.setdefault(Path(image["file_name"]).name, []).append(image)
        unknown = [f.name for f in self.files if f.name not in entries]
        if unknown:
            raise ValueError(f"predict.coco_json={coco_json} lists no image named {unknown[:3]} (of predict.input)")
        ids = []
        for file, size in zip(self.files, self.sizes):
            images = entries[file.name]
            if len({image["id"] for image in images}) > 1:
                # e.g. train/1.jpg and val/1.jpg: the results would go to whichever came last.
                listed = ", ".join(f"{image['file_name']!r} (id {image['id']})" for image in images[:3])
                raise ValueError(
                    f"predict.coco_json={coco_json} names {len(images)} images {file.name!r}: {listed}; predict on "
                    "a folder that holds one of them, with a json that lists it once"
                )
            image = images[0]
            expected = (image.get("height"), image.get("width"))
            if all(type(v) is int for v in expected) and expected != tuple(size):
                # Scored against this json, masks of another size never match (pycocotools gives IoU -1).
                raise ValueError(size_mismatch_message(file, tuple(size), expected, f"predict.coco_json={coco_json}"))
            ids.append(image["id"])
        return ids

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        meta = {"image_id": self.image_ids[index], "file_name": self.files[index].name}
        try:
            # Upright (EXIF), 16-bit scaled, the header checked against the limits again (a file may change).
            pixels = read_image(self.files[index], self.limits)
        except (ValueError, FileNotFoundError) as error:
            # Its header was read, its pixels are not (a truncated JPEG, a file changed since): one broken photo in a
            # folder of thousands is skipped and counted (PredictionWriter), not the end of the run and its results.
            # A small black stand-in keeps the batch whole; nothing of it is written.
            return torch.zeros(3, *UNREADABLE_STAND_IN), {**meta, "unreadable": str(error)}
        return pil_to_tensor(Image.fromarray(pixels)).float() / 255, meta

    def coco_images(self) -> list[dict]:
        """The COCO ``images`` entries (id, file name, size) that the results' ``image_id`` refer to."""
        return [
            {"id": image_id, "file_name": path.name, "height": height, "width": width}
            for image_id, path, (height, width) in zip(self.image_ids, self.files, self.sizes)
        ]


def prepare_output(output: str | Path) -> Path:
    """Creates the output folder and checks that files can be written there, before any work.

    Raises:
        ValueError: ``predict.output`` is a file (or other non-folder), or the folder is not writable.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        kind = "a file" if output.is_file() else file_kind(output.stat().st_mode)
        raise ValueError(f"predict.output={output} is {kind}, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise ValueError(f"predict.output={output}: cannot write there ({err.strerror or err})") from err
    return output


@contextlib.contextmanager
def output_folder(output: str | Path) -> Iterator[Path]:
    """:func:`prepare_output` for one run: the folder it created is removed again if the run fails before writing
    anything there (a bad input found after it was made), so a failed run leaves no empty folder behind."""
    made = not Path(output).exists()
    folder = prepare_output(output)
    try:
        yield folder
    except BaseException:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


class PredictionWriter(BasePredictionWriter):
    """Writes ``<output>/<image file name>.png`` overlays per batch, and the COCO results json at the end.

    Detections scoring below ``score_threshold`` are neither drawn nor written. Under DDP each process
    draws its own images and rank zero writes the json of all of them. An image whose file could not be read
    (:class:`ImageFiles` marks it) is skipped with a warning: no overlay, no results, and it is left out of
    ``images.json``; :attr:`unreadable` lists them (all processes') at the end.

    Args:
        output: folder for the files.
        images: the COCO ``images`` entries of the input (written to ``images.json``).
        class_names: names of labels 1..K (overlay captions).
        score_threshold: lowest score kept.
        mask_threshold: mask probabilities above it are foreground.
        label_to_category_id: maps labels 1..K to the json's category ids (default: the label).
        skipped: ``(file name, why)`` of the input files left out before the run (:attr:`ImageFiles.skipped`),
            counted with those that could not be read.
    """

    def __init__(
        self,
        output: str | Path,
        images: list[dict],
        class_names: Sequence[str] | None = None,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        label_to_category_id: Mapping[int, int] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.images = images
        self.num_inputs = len(images) + len(skipped)
        self.class_names = class_names
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold
        coco = COCO()
        coco.dataset = {"images": images, "annotations": [], "categories": []}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            coco.createIndex()
        # The evaluator's conversion to COCO result dicts (RLE masks, xywh boxes, category ids), no evaluation.
        self.results = CocoEvaluator(
            mask_threshold=mask_threshold, label_to_category_id=label_to_category_id, coco_gt=coco
        )
        self.num_detections = 0
        self.num_overlays = 0
        self.unreadable: list[tuple[str, str]] = list(skipped)  # (file name, why), this process's until the end

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        images, metas = batch
        # The batch's detections and images on the host in one copy, masks thresholded on the device first: read
        # image by image, tensor by tensor, each read would wait for the GPU, and the float masks would cross whole.
        records = on_host([{**d, "image": image} for d, image in zip(prediction, images)], self.mask_threshold)
        kept = []
        for record, meta in zip(records, metas):
            image = record.pop("image")
            if "unreadable" in meta:
                log.warning("skipped %s: %s", meta["file_name"], meta["unreadable"])
                self.unreadable.append((meta["file_name"], meta["unreadable"]))
                continue
            detection = select(record, self.score_threshold)
            overlay = draw_instances(image, detection, self.class_names, self.score_threshold, self.mask_threshold)
            save_png(overlay, self.output / overlay_name(meta["file_name"]))
            self.num_overlays += 1
            kept.append({**detection, "image_id": meta["image_id"]})
        self.results.update(kept)

    def on_predict_end(self, trainer, pl_module) -> None:
        results = self.results.results_json()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[tuple[list[dict], list] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (results, self.unreadable))
            results = sorted((r for part, _ in gathered for r in part), key=lambda r: r["image_id"])
            self.unreadable = sorted({tuple(u) for _, part in gathered for u in part})
        if trainer.is_global_zero:
            skipped = {name for name, _ in self.unreadable}
            (self.output / RESULTS_FILE).write_text(json.dumps(results))
            images = [image for image in self.images if image["file_name"] not in skipped]
            (self.output / IMAGES_FILE).write_text(json.dumps(images, indent=1))
            if skipped:
                log.warning(
                    "%d of %d images could not be read and were skipped (left out of %s): %s",
                    len(skipped),
                    self.num_inputs,
                    IMAGES_FILE,
                    ", ".join(sorted(skipped)[:10]) + (", ..." if len(skipped) > 10 else ""),
                )
            log.info(
                "Wrote %d overlays (this process) of %d images and %d detections to %s",
                self.num_overlays,
                len(self.images),
                len(results),
                self.output,
            )
        self.num_detections = len(results)


def class_names(cfg: DictConfig, num_classes: int, trained: list[str] | None = None) -> list[str] | None:
    """``predict.class_names``: a list, ``coco`` (torchvision's COCO names), or null for the classes the
    checkpoint was trained on (``trained``), else the data config's."""
    asked = names = cfg.predict.get("class_names")
    if names == "coco":
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        # torchvision's 91 categories start with the background: labels 1..90 are the rest.
        names = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    elif names is None:
        names = trained if trained is not None else cfg.data.get("classes")
    names = list(names) if names is not None else None
    if names is not None and len(names) != num_classes:
        log.warning(
            "%d class names (predict.class_names=%s) for the model's %d classes: captions show label numbers",
            len(names),
            asked if isinstance(asked, str) else "...",
            num_classes,
        )
        return None
    return names


# torchvision's COCO class names (predict.class_names=coco) call the 11 ids COCO left without a category "N/A".
UNUSED_CLASS_NAME = "N/A"


def category_ids_by_name(
    names: Sequence[str] | None, label_map: Mapping[int, int] | None, categories: list, coco_json: str | Path
) -> dict[int, int] | None:
    """The category id of each of the model's labels in ``coco_json``: the id of the category of its class's name.

    The results are scored against ``coco_json`` by category id, so they must number the classes as it does. A json
    written apart from the training data's (a validation set exported on its own, another tool's) may give the same
    classes other ids: taking the training data's ids (``label_map``) would score every detection as another class,
    with no word. ``mode=evaluate`` matches the classes by name too.

    Args:
        names: the model's class names, of labels 1..K; ``None`` (they do not fit the model): ``label_map`` as it is.
        label_map: label -> category id so far (the checkpoint's training data's); ``None``: each label is its id.
        categories: ``coco_json``'s ``categories`` list.

    Returns:
        label -> category id, logged where it differs from ``label_map``.

    Raises:
        CommandError: a class that ``coco_json`` names no category of, or names more than one (torchvision's
            placeholder name for COCO's unused ids keeps its id).
    """
    if names is None:
        return dict(label_map) if label_map is not None else None
    ids: dict[str, list[int]] = {}
    for category in categories:
        if isinstance(category, dict) and isinstance(category.get("name"), str) and type(category.get("id")) is int:
            ids.setdefault(category["name"], []).append(category["id"])
    before = {label: (label_map or {}).get(label, label) for label in range(1, len(names) + 1)}
    after, missing, twice = {}, [], []
    for label, name in enumerate(names, start=1):
        found = ids.get(name, [])
        if len(found) == 1:
            after[label] = found[0]
        elif name == UNUSED_CLASS_NAME and not found:
            after[label] = before[label]
        else:
            (twice if found else missing).append(name)
    if missing or twice:
        problem = f"has no category named {missing[:5]}" if missing else f"names more than one category {twice[:5]}"
        raise CommandError(
            f"predict.coco_json={coco_json} {problem} of the model's classes {list(names)[:10]}: its results are "
            f"scored by category id, and these have none there. Give the ids (predict.label_to_category_id="
            f"{{1: <id>, ...}}), or leave predict.coco_json out"
        )
    changed = {names[label - 1]: (before[label], after[label]) for label in after if after[label] != before[label]}
    if changed:
        log.info(
            "predict.coco_json=%s numbers %d of the model's %d classes otherwise than its training data: the results "
            "use the json's ids, matched by name (%s)",
            coco_json,
            len(changed),
            len(names),
            ", ".join(f"{name}: {old} -> {new}" for name, (old, new) in list(changed.items())[:10]),
        )
    return after


def use_recorded_input_size(cfg: DictConfig, record, overrides: Sequence[str] | None, source: str) -> None:
    """Predicts at the input size the model was trained at: ``data.min_size`` and ``data.max_size`` become the
    checkpoint's, each unless the command line sets it.

    Prediction needs no data config, and without one the data config's sizes are the default data's (the built-in
    shapes': 128 px), not those of the images the model was trained on.

    A file that records no size (a torchvision state dict in ``weights=``) is predicted at the data config's, with a
    warning unless the command line sets both: torchvision's COCO models take 800/1333, the built-in shapes 128.

    Args:
        record: the checkpoint's :class:`~mrcnn.engine.model_record.ModelRecord`; None: the file has none.
        overrides: the command-line overrides (Hydra's ``overrides.task``); ``None`` (no Hydra job): none.
        source: the option and file, for the log line.
    """
    given = {key for key, _ in key_overrides(overrides or (), "data.")}
    if record is None or record.min_size is None or record.max_size is None:
        if not {"data.min_size", "data.max_size"} <= given:
            log.warning(
                "%s records no input size: predicting at the data config's, data.min_size=%s data.max_size=%s "
                "(data=%s). Set both to the size the model was trained at (torchvision's COCO models: "
                "data.min_size=800 data.max_size=1333)",
                source,
                OmegaConf.select(cfg, "data.min_size"),
                OmegaConf.select(cfg, "data.max_size"),
                _data_choice(),
            )
        return
    recorded = {
        "min_size": list(record.min_size) if len(record.min_size) > 1 else record.min_size[0],
        "max_size": record.max_size,
    }
    changed = {
        key: value
        for key, value in recorded.items()
        if f"data.{key}" not in given and OmegaConf.select(cfg, f"data.{key}") != value
    }
    if not changed:
        return
    with open_dict(cfg):
        for key, value in changed.items():
            cfg.data[key] = value
    log.info(
        "predicting at the input size %s was trained at: %s (set it on the command line to predict at another)",
        source,
        " ".join(f"data.{key}={value}" for key, value in changed.items()),
    )


def _data_choice() -> str:
    """The data config's option (``shapes``), as Hydra chose it; ``?`` outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.choices.get("data")) if HydraConfig.initialized() else "?"


def predict(cfg: DictConfig) -> dict[str, float]:
    """Writes an overlay PNG per input image and ``coco_results.json`` / ``images.json`` to ``predict.output``."""
    check_config(cfg)
    ckpt_path = checkpoint_path(cfg)  # check_config: there, or weights= given; predict.input given
    check_run_dir_is_free(cfg.run_dir, cfg.mode, ckpt_path, in_sweep(), bool(cfg.get("continue_sweep")))
    # A checkpoint of this project knows its classes and their category ids: the model gets its number of
    # classes, the captions its names, the json its ids, whatever data config this run has.
    source, option = (ckpt_path, "ckpt_path") if ckpt_path else (cfg.weights, "weights")
    record = read_model_record(source, option)
    # The architecture the weights were trained as (a torchvision state dict in weights= records none).
    use_checkpoint_model(cfg, source, job_overrides(), option)
    if record is not None and record.class_names:
        with open_dict(cfg):
            cfg.model.num_classes = len(record.class_names)
            cfg.module.class_names = list(record.class_names)
    if not is_ddp_child():  # a DDP child's config is its main process's, already set
        use_recorded_input_size(cfg, record, job_overrides(), f"{option}={source}")
    with job_scope(cfg), stops_with_nonzero_exit(cfg), output_folder(cfg.predict.output) as output:
        L.seed_everything(cfg.seed, workers=True)
        limits = cfg.data.get("image_limits")
        dataset = ImageFiles(
            cfg.predict.input, cfg.predict.get("coco_json"), instantiate(limits) if limits is not None else None
        )
        check_overlay_names(dataset.files, output)
        module = build_module(cfg)
        raise_score_threshold(module.model, cfg.predict.score_threshold)
        if ckpt_path:
            check_checkpoint_fits(module, ckpt_path, cfg)
        label_map = cfg.predict.get("label_to_category_id")
        label_map = OmegaConf.to_container(label_map) if label_map is not None else None
        if label_map is None and record is not None:
            label_map = record.label_to_category_id
        names = class_names(cfg, cfg.model.num_classes, record.class_names if record is not None else None)
        # The model's classes by name, where their names are known (the checkpoint's, or predict.class_names), not
        # only the data config's: the results number them as coco_json does, unless the command gives the ids.
        named = (record is not None and bool(record.class_names)) or cfg.predict.get("class_names") is not None
        if dataset.categories is not None and named and cfg.predict.get("label_to_category_id") is None:
            label_map = category_ids_by_name(names, label_map, dataset.categories, cfg.predict.coco_json)
        if label_map is not None:
            # Keys as the evaluator reads them (int(k)): a map given with string keys ({"1": 3}) maps label 1.
            mapped = {int(k) for k in label_map}
            unmapped = [k for k in range(1, cfg.model.num_classes + 1) if k not in mapped]
            if unmapped:
                # Found before any image, not at the first detection of such a label.
                raise ValueError(
                    f"predict.label_to_category_id maps no category id to labels {unmapped[:5]} of the model's "
                    f"{cfg.model.num_classes} classes: give one for each label 1..{cfg.model.num_classes}"
                )
        writer = PredictionWriter(
            output,
            dataset.coco_images(),
            names,
            cfg.predict.score_threshold,
            cfg.predict.mask_threshold,
            label_map,
            dataset.skipped,
        )
        # Lightning shards this plain loader over DDP processes without repeating an image (its unrepeated sampler
        # for predict). The trainer configs turn that off for the datamodule's loaders, which shard themselves:
        # left off here, every process would predict every image and the json would hold each detection per process.
        trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False, use_distributed_sampler=True)
        job_processes.track(trainer)
        if trainer.world_size > len(dataset):
            # Lightning's unrepeated sharding would leave a process without images, which fails its own assertion.
            raise ValueError(
                f"predict.input={cfg.predict.input} holds {len(dataset)} images for {trainer.world_size} processes: "
                f"give at least one image a process, or fewer devices (trainer.devices)"
            )
        batching = {"batch_size": cfg.predict.batch_size}
        if trainer.world_size == 1 and cfg.predict.batch_size > 1:
            # Images of one size a batch, as in evaluation: an image's detections do not depend on the images
            # beside it (the padding to a batch's largest reaches GroupNorm's statistics). Several processes keep
            # Lightning's sharding, which repeats no image (SameSizeBatches repeats batches to even the shares).
            batching = {"batch_sampler": SameSizeBatches(dataset.sizes, cfg.predict.batch_size)}
        loader = DataLoader(
            dataset,
            **batching,
            num_workers=cfg.predict.num_workers,
            collate_fn=collate_detection,
            # Under DDP from a fork server: a worker forked from a DDP process can hang (worker_context).
            multiprocessing_context=worker_context(
                trainer.world_size, cfg.predict.num_workers, (type(dataset).__module__,)
            ),
        )
        with reading_weights_only(), processes_meet(trainer):
            trainer.predict(module, dataloaders=loader, ckpt_path=ckpt_path, return_predictions=False)
        return {
            "images": float(len(dataset) + len(dataset.skipped)),
            "detections": float(writer.num_detections),
            "unreadable": float(len(writer.unreadable)),
        }
