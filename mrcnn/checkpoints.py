"""What a run starts from: a Lightning checkpoint to resume (``ckpt_path`` / ``resume``) or weights to load."""

import logging
import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig

from mrcnn.modeling.mask_rcnn import load_torchvision_weights

log = logging.getLogger(__name__)


def checkpoint_path(cfg: DictConfig) -> str | None:
    """The Lightning checkpoint to start from: ``ckpt_path``, or ``<resume>/checkpoints/last.ckpt``."""
    if cfg.get("resume"):
        if cfg.get("ckpt_path"):
            raise ValueError("give either ckpt_path=<file> or resume=<run dir>, not both")
        path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: there is no {path}")
        return str(path)
    return cfg.get("ckpt_path")


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Loads a torchvision Mask R-CNN state dict file (e.g. torchvision's COCO ``maskrcnn_resnet50_fpn``).

    Raises:
        ValueError: the file is a Lightning checkpoint, or does not match the configured model
            (the message names the file and the mismatched keys).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"weights={path} is not a plain state dict (torch.save(model.state_dict())); "
            "a Lightning checkpoint goes in ckpt_path=..."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        raise ValueError(f"weights={path} is a Lightning checkpoint: pass it as ckpt_path=... instead")
    try:
        load_torchvision_weights(model, state)
    except ValueError as error:
        raise ValueError(f"weights={path}: {error}") from error
    log.info("Loaded torchvision weights from %s", path)
