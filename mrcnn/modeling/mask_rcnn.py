"""MaskRCNN: transform -> backbone -> RPN -> RoI heads -> postprocess; always returns (detections, losses)."""

import re
import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.modeling import frozen_bn
from mrcnn.modeling.transform import RCNNTransform

# The five losses of the paper's literature, in the order logs and the progress bar show them. A head may return
# more; every loss the model returns counts in the training total (mrcnn.lit_module).
LOSS_KEYS = ("rpn_class_loss", "rpn_bbox_loss", "fastrcnn_class_loss", "fastrcnn_bbox_loss", "maskrcnn_mask_loss")


class MaskRCNN(nn.Module):
    """Mask R-CNN from already-built parts.

    Args:
        backbone: maps ``[B, 3, H, W]`` to a dict of feature maps (see ``mrcnn.modeling.backbone``).
        rpn: ``mrcnn.modeling.rpn.RPN``.
        roi_heads: ``mrcnn.modeling.roi_heads.RoIHeads``.
        min_size: shorter image side after resizing; a list picks one at random per training batch.
        max_size: cap on the longer side after resizing.
        image_mean, image_std: input normalization (ImageNet statistics, as torchvision).
        frozen_bn_keeps_dtype: every FrozenBatchNorm2d of the parts returns its input's dtype (bf16 under autocast)
            instead of float32 (``mrcnn.modeling.frozen_bn``): the same maths in float32, and under autocast the
            activations between the convolutions stay bf16. No effect on a model without FrozenBatchNorm2d.
        fold_frozen_bn: every FrozenBatchNorm2d right after a convolution (all of a ResNet's) is applied by that
            convolution, as rescaled weights and a bias (``mrcnn.modeling.frozen_bn.fold_frozen_bn``): the same maths
            up to rounding, without the norm's activation-sized kernels; under autocast its output is bf16 too.
            Applied before ``frozen_bn_keeps_dtype``, which then concerns only the norms left.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        frozen_bn_keeps_dtype: bool = False,
        fold_frozen_bn: bool = False,
    ):
        super().__init__()
        min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.transform = RCNNTransform(min_size, max_size, list(image_mean), list(image_std))
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        if fold_frozen_bn and not frozen_bn.fold_frozen_bn(self):
            warnings.warn(
                "model.fold_frozen_bn=true does nothing: the model has no FrozenBatchNorm2d after a convolution "
                "(model.norm is not frozen_bn)",
                stacklevel=2,
            )
        if frozen_bn_keeps_dtype and not frozen_bn.frozen_bn_keeps_dtype(self) and not fold_frozen_bn:
            warnings.warn(
                "model.frozen_bn_keeps_dtype=true does nothing: the model has no FrozenBatchNorm2d (model.norm is not "
                "frozen_bn)",
                stacklevel=2,
            )

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, targets_checked: bool = False
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """
        Args:
            images: float ``[3, H_i, W_i]`` in 0..1, sizes may differ.
            targets: per image ``boxes [N, 4]`` xyxy, ``labels`` int64 ``[N]`` (1..K), ``masks`` uint8
                ``[N, H_i, W_i]``. Required in training mode; optional in eval mode, where giving them
                also returns the losses (validation losses without touching BatchNorm statistics).
            targets_checked: the caller ran :func:`check_targets` on these targets already, on the host before
                copying them to the device (``MaskRCNNModule`` does): skip it here, where its box check would make
                a GPU step wait for the host.

        Returns:
            detections: empty in training mode; else per image ``boxes [D, 4]``, ``labels [D]``,
                ``scores [D]`` and ``masks [D, 1, H_i, W_i]`` probabilities, in original image pixels.
            losses: when targets were given, the RPN's and the RoI heads' losses: the five of ``LOSS_KEYS``, and any
                other a head adds (the LightningModule sums and logs them all); else empty.
        """
        if self.training and targets is None:
            raise ValueError("MaskRCNN needs targets in training mode")
        if targets is not None and not targets_checked:
            check_targets(targets)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, valid, rpn_losses = self.rpn.propose(image_list, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets, valid)
        if detections:
            detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        return detections, {**rpn_losses, **head_losses}


def check_targets(targets: list[dict[str, Tensor]]) -> None:
    """Fail early, naming the image, on targets that would crash or silently corrupt training."""
    for i, t in enumerate(targets):
        name = f"target {i} (image_id {t.get('image_id', '?')})"
        for key in ("boxes", "labels", "masks"):
            if key not in t:
                raise ValueError(f"{name} has no '{key}'")
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"{name}: boxes must be float [N, 4], got {tuple(boxes.shape)} {boxes.dtype}")
        if t["labels"].dtype != torch.int64 or len(t["labels"]) != len(boxes) or len(t["masks"]) != len(boxes):
            raise ValueError(
                f"{name}: labels must be int64 and boxes, labels, masks must have the same length; got "
                f"{len(boxes)} boxes, {len(t['labels'])} {t['labels'].dtype} labels, {len(t['masks'])} masks"
            )
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            bad = boxes[torch.where(degenerate)[0][0]].tolist()
            raise ValueError(f"{name} has a box with non-positive width or height: {bad}")


def torchvision_to_mrcnn_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ``torchvision.models.detection.maskrcnn_resnet50_fpn`` state dict to this model's keys.

    Only the mask head differs in naming:

    ==========================================================  =====================================
    torchvision                                                 mrcnn
    ==========================================================  =====================================
    ``roi_heads.mask_head.{i}.0.*`` (or ``mask_fcn{i+1}.*``)       ``roi_heads.mask_head.convs.{2i}.*``
    ``roi_heads.mask_predictor.conv5_mask.*``                   ``roi_heads.mask_head.deconv.*``
    ``roi_heads.mask_predictor.mask_fcn_logits.*``              ``roi_heads.mask_head.predictor.*``
    ==========================================================  =====================================

    Backbone, FPN, RPN and box head keys are identical (torchvision's ``num_classes`` counts the
    background, so a 91-class torchvision model is ``num_classes=90`` here).
    """
    renamed = {}
    for key, value in state_dict.items():
        new = key
        match = re.fullmatch(r"roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.(weight|bias)", key)
        if match:
            index = int(match.group(1)) if match.group(1) is not None else int(match.group(2)) - 1
            new = f"roi_heads.mask_head.convs.{2 * index}.{match.group(3)}"
        new = new.replace("roi_heads.mask_predictor.conv5_mask.", "roi_heads.mask_head.deconv.")
        new = new.replace("roi_heads.mask_predictor.mask_fcn_logits.", "roi_heads.mask_head.predictor.")
        renamed[new] = value
    return renamed


# Parameters whose shape depends on the number of classes (box classifier, box regressor, mask predictor).
# Fine-tuning to other classes keeps the model's own freshly initialised values for them.
CLASS_SPECIFIC_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")

# The FrozenBatchNorm2d eps torchvision's maskrcnn_resnet50_fpn builder sets after loading its COCO weights
# (``overwrite_eps(model, 0.0)``); a model built with FrozenBatchNorm2d has 1e-5.
TORCHVISION_COCO_EPS = 0.0


def is_torchvision_naming(state_dict: dict[str, Tensor]) -> bool:
    """Whether a state dict names the mask branch as torchvision does (``roi_heads.mask_predictor.*``); ours never does."""
    return any(key.startswith("roi_heads.mask_predictor.") for key in state_dict)


def is_class_specific(key: str) -> bool:
    """Whether a state dict key belongs to a layer whose shape depends on the number of classes."""
    return key.startswith(CLASS_SPECIFIC_PREFIXES)


def load_torchvision_weights(
    model: MaskRCNN,
    path_or_state_dict,
    strict: bool = True,
    new_classes: bool = False,
    frozen_bn_eps: float | None = TORCHVISION_COCO_EPS,
) -> list[str]:
    """Load a torchvision Mask R-CNN state dict (file path or dict), or one of this model's own, into ``model``.

    Fine-tuning to other classes: the class-specific layers (box classifier, box regressor, mask predictor:
    ``CLASS_SPECIFIC_PREFIXES``) of a file trained on another number of classes do not fit, and keep the
    model's own freshly initialised values; every other tensor must fit.

    Exactness: torchvision's ``maskrcnn_resnet50_fpn`` sets every FrozenBatchNorm2d ``eps`` to 0 after it loads
    its COCO weights, and a model fine-tuned from them in torchvision keeps it. A state dict in torchvision's
    naming is taken to be such a model: its FrozenBatchNorm2d layers get ``frozen_bn_eps`` (0), so the model
    computes exactly what torchvision does. State dicts in this model's own naming leave eps alone (Lightning
    checkpoints carry their eps, see ``mrcnn.engine.model_record``).

    Args:
        strict: keys missing from the file, or in the file but not in the model, are an error.
        new_classes: keep the model's class-specific layers even where the file's fit (the file's classes
            are other classes).
        frozen_bn_eps: eps for every FrozenBatchNorm2d after loading a state dict in torchvision's naming;
            ``None`` keeps the model's (1e-5: right for a torchvision model trained from an ImageNet
            backbone only, whose builder leaves eps alone).

    Returns:
        the class-specific keys that were not loaded (empty when the file has the model's classes).

    Raises:
        ValueError: naming the file and the mismatched keys or shapes when it does not fit the model.
    """
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "the given state dict"
    state = path_or_state_dict
    if isinstance(state, str):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if "model" in state and isinstance(state["model"], dict):  # torchvision reference-script checkpoints
        state = state["model"]
    torchvision_naming = is_torchvision_naming(state)
    state = torchvision_to_mrcnn_state_dict(state)
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    not_fitting = [k for k in wrong_shape if not is_class_specific(k)]
    if not_fitting or (strict and (missing or unexpected)):
        details = (
            [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in not_fitting[:5]]
            + [f"missing in file: {missing[:5]}"] * bool(missing)
            + [f"not in model: {unexpected[:5]}"] * bool(unexpected)
        )
        raise ValueError(f"{source} does not match the configured model: " + "; ".join(details))
    skipped = [k for k in state if k in own and is_class_specific(k) and (new_classes or k in wrong_shape)]
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    if torchvision_naming and frozen_bn_eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = frozen_bn_eps
    return skipped
