"""What a checkpoint carries besides the weights: classes, category ids, FrozenBatchNorm eps, input size.

A model's labels 1..K mean the classes of the data it was trained on, and its results are only useful with
that data's category ids: both come from the datamodule at training time and go into every checkpoint
(``checkpoint["mrcnn_model"]``, written by :meth:`mrcnn.lit_module.MaskRCNNModule.on_save_checkpoint`), so
``mode=evaluate`` and ``mode=predict`` use the classes and ids the model was trained with, whatever data
config they run with. Two facts that a state dict leaves out go with them: each FrozenBatchNorm2d's ``eps``
(0 after loading torchvision's COCO weights) and the input size (``min_size`` / ``max_size``).
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.data.images import check_regular_file
from mrcnn.errors import CommandError

log = logging.getLogger(__name__)

MODEL_RECORD_KEY = "mrcnn_model"


@dataclass
class ModelRecord:
    """The facts about a trained model that its state dict does not hold.

    Attributes:
        class_names: names of labels 1..K; ``None`` when unknown.
        label_to_category_id: ``{label: the dataset's category id}``; ``None``: the label is the id.
        frozen_bn_eps: ``{module name: eps}`` of every FrozenBatchNorm2d.
        min_size, max_size: the model's input resizing (shorter side(s), longer-side cap).
    """

    class_names: list[str] | None = None
    label_to_category_id: dict[int, int] | None = None
    frozen_bn_eps: dict[str, float] = field(default_factory=dict)
    min_size: list[int] | None = None
    max_size: int | None = None

    def to_dict(self) -> dict:
        """Plain containers only, so the checkpoint still loads with ``torch.load(weights_only=True)``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping) -> ModelRecord:
        mapping = record.get("label_to_category_id")
        return cls(
            class_names=list(record["class_names"]) if record.get("class_names") is not None else None,
            label_to_category_id={int(k): int(v) for k, v in mapping.items()} if mapping is not None else None,
            frozen_bn_eps={str(k): float(v) for k, v in (record.get("frozen_bn_eps") or {}).items()},
            min_size=list(record["min_size"]) if record.get("min_size") is not None else None,
            max_size=record.get("max_size"),
        )


def frozen_bn_eps(model: nn.Module) -> dict[str, float]:
    """``{module name: eps}`` of every FrozenBatchNorm2d in ``model``."""
    return {name: float(m.eps) for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def set_frozen_bn_eps(model: nn.Module, eps: float | Mapping[str, float]) -> None:
    """Sets the ``eps`` of every FrozenBatchNorm2d: one value for all, or by module name (others keep theirs)."""
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            if not isinstance(eps, Mapping):
                module.eps = float(eps)
            elif name in eps:
                module.eps = float(eps[name])


def model_record(
    model: nn.Module, class_names: Sequence[str] | None, label_to_category_id: Mapping[int, int] | None
) -> ModelRecord:
    """The record of a built ``MaskRCNN`` trained on ``class_names`` (with those category ids)."""
    transform = getattr(model, "transform", None)
    return ModelRecord(
        class_names=list(class_names) if class_names is not None else None,
        label_to_category_id={int(k): int(v) for k, v in label_to_category_id.items()}
        if label_to_category_id
        else None,
        frozen_bn_eps=frozen_bn_eps(model),
        min_size=[int(s) for s in transform.min_size] if transform is not None else None,
        max_size=int(transform.max_size) if transform is not None else None,
    )


def read_checkpoint(path: str | Path, option: str = "ckpt_path"):
    """A checkpoint or state dict file's contents, loaded with ``weights_only=True``: tensors and plain containers.

    No code in the file runs. A file that holds other Python objects (a whole pickled model, a foreign
    trainer's state) is refused: evaluate and predict never load a file's arbitrary objects, whoever made it.

    Args:
        option: the config key that named the file, for the messages.

    Raises:
        FileNotFoundError / ValueError: naming ``option``, the file, and what is wrong with it.
    """
    check_regular_file(path, f"{option} file")
    # mmap: the tensors stay on disk, only the small objects around them are read (zip files only: older
    # torch.save files, like some of torchvision's, are read whole).
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise CommandError(
                f"{option}={path} holds a Python object of type {found.group(1)} besides tensors and plain "
                "containers, which is not loaded (it could run code): give a Lightning checkpoint of this project "
                "or a plain state dict (torch.save(model.state_dict(), file))"
            ) from None
        raise CommandError(f"{option}={path} is not a PyTorch checkpoint (it cannot be unpickled)") from None
    except Exception as error:  # noqa: BLE001  (torch raises KeyError, RuntimeError, EOFError... on garbage)
        raise CommandError(
            f"{option}={path} is not a PyTorch checkpoint, or it is damaged or truncated "
            f"({type(error).__name__} while reading it)"
        ) from None


def read_model_record(path: str | Path, option: str = "ckpt_path") -> ModelRecord | None:
    """The record in a Lightning checkpoint file; ``None`` for a plain state dict or an older checkpoint.

    Raises:
        ValueError: the file cannot be loaded safely (:func:`read_checkpoint`).
    """
    checkpoint = read_checkpoint(path, option)
    record = checkpoint.get(MODEL_RECORD_KEY) if isinstance(checkpoint, dict) else None
    return ModelRecord.from_dict(record) if record else None


def check_classes(trained: Sequence[str] | None, configured: Sequence[str] | None, source: str) -> None:
    """Stops when a checkpoint's classes are not the ones the run is configured with (same names, same order).

    Raises:
        CommandError: naming both lists; unknown lists (``None``) are not checked.
    """
    if trained is None or configured is None or list(trained) == list(configured):
        return
    raise CommandError(
        f"{source} was trained on {len(trained)} classes {list(trained)}, but this run's data has "
        f"{len(configured)} classes {list(configured)}. Evaluate it on data with its classes (data.classes=[...] "
        "picks and orders them), or fine-tune it on this data with weights=<checkpoint> instead of ckpt_path."
    )


def warn_if_input_size_differs(record: ModelRecord, model: nn.Module, source: str) -> None:
    """Warns when the model resizes its input differently from how the checkpoint's model was trained."""
    transform = getattr(model, "transform", None)
    if transform is None or record.min_size is None:
        return
    current = ([int(s) for s in transform.min_size], int(transform.max_size))
    if current != (list(record.min_size), record.max_size):
        log.warning(
            "%s was trained at min_size=%s, max_size=%s, but this run resizes images to min_size=%s, max_size=%s; "
            "set data.min_size / data.max_size to the training values unless a different scale is intended",
            source,
            record.min_size,
            record.max_size,
            current[0],
            current[1],
        )
