"""RoI heads: sample RoIs and build targets, then run the box branch and the mask branch.

Matching (torchvision's Matcher, computed without host syncs), sampling and box coding are torchvision's; the
pooler, heads and mask loss are whatever the config chose, which is the point of owning this module.

Two designs, as in the paper's Fig. 4: :class:`RoIHeads` (FPN, C5) pools the mask branch's features
from the backbone; :class:`Res5RoIHeads` (C4) runs the mask head on the res5 box head's output.
"""

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import (
    BalancedPositiveNegativeSampler,
    Matcher,
)
from torchvision.ops import boxes as box_ops

from mrcnn.modeling import sampling
from mrcnn.modeling.box_head import fast_rcnn_inference, fast_rcnn_inference_batched, fast_rcnn_loss
from mrcnn.modeling.mask_head import MASK_TARGET_FORMS, mask_targets, mask_targets_batched
from mrcnn.modeling.transform import BoxCoder


class RoIHeads(nn.Module):
    """Box and mask branches of Mask R-CNN, each on its own pooled features (FPN, C5).

    Args:
        pooler: builds the RoI pooler for an output size (``pooler(output_size=7)``), e.g. a
            ``functools.partial`` of ``RoIAlignPooler``; built once per branch.
        box_resolution: pooled side for the box branch (7).
        box_head: ``MLPBoxHead``.
        box_predictor: ``BoxPredictor``.
        mask_head: ``FCNMaskHead`` or ``MLPMaskHead``.
        mask_loss: ``SigmoidMaskLoss`` or ``SoftmaxMaskLoss``.
        mask_resolution: pooled side for the mask branch (14).
        aligned_mask_targets: crop mask targets with half-pixel-correct RoIAlign (pair it with an
            ``aligned=True`` pooler); ``False`` reproduces torchvision.
        mask_target_form: ``"soft"`` (resampled masks in [0, 1], torchvision's, the parity default) or
            ``"binary"`` (thresholded at 0.5, Detectron's and the paper's). Whatever the mask loss, it
            receives exactly these targets (:func:`~mrcnn.modeling.mask_head.mask_targets`).
        fg_iou_thresh, bg_iou_thresh: RoI/ground-truth IoU for positives and negatives (0.5, 0.5).
        batch_size_per_image: RoIs sampled per image for the losses (512 FPN, 64 C4).
        positive_fraction: target share of positives among sampled RoIs (0.25).
        bbox_reg_weights: box coder weights (10, 10, 5, 5).
        score_thresh, nms_thresh, detections_per_img: inference settings.
        roi_buckets: pad the RoIs each head (box head, mask head) runs on to the next of these counts, so their
            input shapes repeat from step to step (cuDNN autotuning and ``torch.compile`` tune each shape once);
            above the largest, to the next multiple of it. ``None``: no padding. Padded rows are zero features
            whose outputs are dropped before any loss, so they carry no weight and no gradient
            (:func:`pad_to_bucket`). Heads with BatchNorm (batch statistics) refuse it.
        batched_sampling: in training, match and sample the RoIs of all images at once (:meth:`sample_rois_batched`):
            torchvision's sample counts and distribution, drawn by random keys (:func:`mrcnn.modeling.sampling.sample`)
            instead of per-image ``nonzero`` and ``randperm``. The box head runs on a fixed ``min(batch_size_per_image,
            candidates)`` RoI slots per image, the slots beyond the sample weighted zero in its losses (the same
            losses as the sampled rows alone, to float rounding); the mask head on the positives alone, whose count
            the host reads once, in the mask pooler's read of its level sizes (so ``roi_buckets`` gives it repeating
            shapes). Heads with BatchNorm fall back to the per-image path (unsampled slots would enter their batch
            statistics).
    """

    def __init__(
        self,
        pooler: Callable[..., nn.Module],
        box_resolution: int,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_head: nn.Module,
        mask_loss,
        mask_resolution: int | None = 14,
        aligned_mask_targets: bool = False,
        mask_target_form: str = "soft",
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        roi_buckets: list[int] | None = None,
        batched_sampling: bool = False,
    ):
        super().__init__()
        self.roi_buckets = sorted(int(b) for b in roi_buckets) if roi_buckets else None
        if self.roi_buckets and self.roi_buckets[0] < 1:
            raise ValueError(f"roi_buckets must be positive counts, got {roi_buckets}")
        self.batched_sampling = batched_sampling
        batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for h in (box_head, mask_head) for m in h.modules()
        )
        if batch_norm and (self.roi_buckets or batched_sampling):
            # Padded rows would enter BatchNorm's batch statistics: heads with BatchNorm (model.head_norm=bn or
            # syncbn) run on their real RoI counts. Padding changes no loss, so only the shapes' repetition (and,
            # for batched_sampling, the RoI heads' share of the saved host reads) is lost.
            warnings.warn(
                "roi_buckets and the RoI heads' batched_sampling are off for these heads: they use BatchNorm, whose "
                "batch statistics padded rows would change (use gn or frozen_bn heads for repeating shapes)",
                stacklevel=2,
            )
            self.roi_buckets = None
            self.batched_sampling = False
        if mask_loss.per_class_only and getattr(mask_head, "class_agnostic", False):
            raise ValueError(
                f"{type(mask_loss).__name__} needs per-class masks; class_agnostic=True is only defined "
                "for the sigmoid mask loss"
            )
        if mask_target_form not in MASK_TARGET_FORMS:
            raise ValueError(f"mask_target_form must be one of {MASK_TARGET_FORMS}, got {mask_target_form!r}")
        # A head with fc layers is sized for one input side; build-time, not a shape error at the first step.
        fed = self.mask_feature_resolution(box_resolution, mask_resolution)
        expected = getattr(mask_head, "input_resolution", None)
        if expected is not None and expected != fed:
            raise ValueError(
                f"{type(mask_head).__name__} is sized for {expected}x{expected} inputs, but {type(self).__name__} "
                f"feeds its mask head {fed}x{fed} features: set the head's resolution to {fed}"
            )
        self.box_pooler = pooler(output_size=box_resolution)
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = None if mask_resolution is None else pooler(output_size=mask_resolution)
        self.mask_head = mask_head
        self.mask_loss = mask_loss
        self.aligned_mask_targets = aligned_mask_targets
        self.mask_target_form = mask_target_form
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def mask_feature_resolution(self, box_resolution: int, mask_resolution: int | None) -> int:
        """Side of the features the mask head receives: the mask pooler's output here."""
        return mask_resolution

    def sample_rois(
        self,
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        proposal_valid: list[Tensor] | None = None,
    ):
        """Add ground-truth boxes to the proposals, match, and sample a balanced set per image.

        ``proposal_valid`` (per image bool ``[P_i]``, from ``RPN(batched_proposals=True)``) marks padding rows,
        which are labelled -1 like the RoIs between the IoU thresholds, so the sampler never draws them.

        Returns:
            rois: per image ``[S_i, 4]``; labels: per image int64 ``[S_i]`` (0 = background);
            matched_idxs: per image index of the matched ground truth (0 for background);
            regression_targets: ``[sum S_i, 4]``.
        """
        rois, labels, matched_idxs, matched_boxes = [], [], [], []
        if proposal_valid is None:
            proposal_valid = [None] * len(proposals)
        for boxes, target, valid in zip(proposals, targets, proposal_valid):
            gt_boxes = target["boxes"].to(boxes.dtype)
            boxes = torch.cat([boxes, gt_boxes])
            if len(gt_boxes) == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                image_labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                gt_boxes = boxes.new_zeros((1, 4))
            else:
                # torchvision's Matcher, without its boolean-mask writes (a host sync each): the same labels.
                iou = box_ops.box_iou(gt_boxes, boxes)[None]
                gt_valid = torch.ones(iou.shape[:2], dtype=torch.bool, device=iou.device)
                matcher = self.proposal_matcher
                raw = sampling.match(iou, gt_valid, matcher.high_threshold, matcher.low_threshold)[0][0]
                matched = raw.clamp(min=0)
                image_labels = torch.where(
                    raw == Matcher.BELOW_LOW_THRESHOLD,
                    0,
                    torch.where(raw == Matcher.BETWEEN_THRESHOLDS, -1, target["labels"][matched].to(torch.int64)),
                )  # -1: ignored by the sampler
            if valid is not None:  # padding proposals: ignored too (the ground-truth rows are always real)
                image_labels[: len(valid)].masked_fill_(~valid, -1)
            rois.append(boxes)
            labels.append(image_labels)
            matched_idxs.append(matched)
            matched_boxes.append(gt_boxes)

        positive, negative = self.fg_bg_sampler(labels)
        for i, (pos, neg) in enumerate(zip(positive, negative)):
            keep = torch.where(pos | neg)[0]
            rois[i], labels[i], matched_idxs[i] = rois[i][keep], labels[i][keep], matched_idxs[i][keep]
            matched_boxes[i] = matched_boxes[i][matched_idxs[i]]
        regression_targets = torch.cat(self.box_coder.encode(matched_boxes, rois))
        return rois, labels, matched_idxs, regression_targets

    def sample_rois_batched(
        self,
        proposals: list[Tensor],
        targets: list[dict[str, Tensor]],
        proposal_valid: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`sample_rois` for all images at once, in a fixed layout and without a host read.

        The candidates (proposals, then ground truth) of each image are padded to a common count ``L``, matched
        with the same arithmetic as :meth:`sample_rois` (the same labels), and sampled with torchvision's counts by
        random keys. Each image then gets ``S = min(batch_size_per_image, L)`` slots: its sampled positives first,
        then its sampled negatives, each in candidate order, then unsampled candidates, which count in no loss. The
        sampler takes at most ``int(batch_size_per_image * positive_fraction)`` positives, so the first that many
        slots hold every sampled positive.

        Returns:
            rois: ``[B, S, 4]``; labels: int64 ``[B, S]`` (0 background, and 0 in slots outside the sample);
            sampled: bool ``[B, S]``; matched_idxs: int64 ``[B, S]`` index of the matched ground truth (a valid
            index whenever the image has ground truth); regression_targets: ``[B * S, 4]`` (0 outside the sampled
            positives).
        """
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        candidates, candidate_valid = sampling.pad_boxes([torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)])
        if proposal_valid is not None:
            # Padding proposals (RPN(batched_proposals=True), the same count for every image) are never sampled.
            candidate_valid[:, : len(proposal_valid[0])] &= torch.stack(proposal_valid)
        gt, gt_valid = sampling.pad_boxes(gt_boxes)
        gt_labels = torch.zeros(gt_valid.shape, dtype=torch.int64, device=gt.device)
        for i, t in enumerate(targets):
            gt_labels[i, : len(t["labels"])] = t["labels"]
        matcher = self.proposal_matcher
        raw, _ = sampling.match(
            sampling.batched_box_iou(gt, candidates), gt_valid, matcher.high_threshold, matcher.low_threshold
        )
        matched = raw.clamp(min=0)
        labels = torch.where(
            raw == Matcher.BELOW_LOW_THRESHOLD,
            0,
            torch.where(raw == Matcher.BETWEEN_THRESHOLDS, -1, gt_labels.gather(1, matched)),
        ).masked_fill(~candidate_valid, -1)
        positive, negative = sampling.sample(
            labels, self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        )

        # Slot order: sampled positives, sampled negatives, the rest; a stable sort keeps candidate order in each.
        rank = torch.where(positive, 0, torch.where(negative, 1, 2))
        slots = torch.argsort(rank, dim=1, stable=True)[
            :, : min(self.fg_bg_sampler.batch_size_per_image, rank.shape[1])
        ]
        sampled = rank.gather(1, slots) < 2
        rois = candidates.gather(1, slots[..., None].expand(-1, -1, 4))
        labels = torch.where(sampled, labels.gather(1, slots), 0)
        matched = matched.gather(1, slots)
        matched_boxes = gt.gather(1, matched[..., None].expand(-1, -1, 4))
        regression_targets = self.box_coder.encode_single(matched_boxes.reshape(-1, 4), rois.reshape(-1, 4))
        # Background slots of an image without ground truth encode against a zero box (non-finite): zeros instead.
        regression_targets = torch.where((labels > 0).reshape(-1, 1), regression_targets, 0.0)
        return rois, labels, sampled, matched, regression_targets

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        proposal_valid: list[Tensor] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """
        Args:
            features: backbone feature maps.
            proposals: per image ``[P_i, 4]`` xyxy (resized-image pixels).
            image_shapes: per image ``(H, W)`` after resizing.
            targets: per image ``boxes``, ``labels`` and ``masks``; required in training mode. In eval
                mode they are optional and, when given, the losses are computed too.
            proposal_valid: per image bool ``[P_i]``, ``False`` for padding proposals (``RPN.propose`` with
                ``batched_proposals``: the same count ``P`` for every image), which are never sampled and never
                become detections; the detections of all images are then made at once
                (:func:`~mrcnn.modeling.box_head.fast_rcnn_inference_batched`). ``None``: all real.

        Returns:
            detections: in eval mode, per image ``boxes [D, 4]``, ``labels [D]``, ``scores [D]``,
                ``masks [D, 1, M, M]`` (probabilities in the box frame); empty list in training mode.
            losses: ``fastrcnn_class_loss``, ``fastrcnn_bbox_loss``, ``maskrcnn_mask_loss`` when targets were given.
        """
        if self.training and targets is None:
            raise ValueError("RoIHeads needs targets in training mode")
        losses = {}
        if targets is not None:
            losses = self._losses(features, proposals, image_shapes, targets, proposal_valid)
        detections = [] if self.training else self._detect(features, proposals, image_shapes, proposal_valid)
        return detections, losses

    def _losses(self, features, proposals, image_shapes, targets, proposal_valid=None) -> dict[str, Tensor]:
        if self.batched_sampling:
            return self._batched_losses(features, proposals, image_shapes, targets, proposal_valid)
        rois, labels, matched_idxs, regression_targets = self.sample_rois(proposals, targets, proposal_valid)
        box_features = self.run_head(self.box_head, self.box_pooler(features, rois, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        class_loss, bbox_loss = fast_rcnn_loss(class_logits, box_regression, torch.cat(labels), regression_targets)

        # Mask branch: positive RoIs only, each against its matched ground-truth mask.
        positives = [torch.where(image_labels > 0)[0] for image_labels in labels]
        pos_rois = [r[p] for r, p in zip(rois, positives)]
        num_positive = sum(len(p) for p in positives)  # known on the host from the index lists: no further read
        mask_logits = self.run_head(
            self.mask_head,
            self.positive_mask_features(
                features, image_shapes, rois, torch.cat(labels) > 0, box_features, num_positive
            ),
        )
        size = mask_logits.shape[-1]
        gt_labels = torch.cat([t["labels"][m[p]] for t, m, p in zip(targets, matched_idxs, positives)])
        gt_masks = torch.cat(
            [
                mask_targets(t["masks"], r, m[p], size, self.aligned_mask_targets, self.mask_target_form)
                for t, r, m, p in zip(targets, pos_rois, matched_idxs, positives)
            ]
        )
        mask_loss = self.mask_loss.loss(mask_logits, gt_labels, gt_masks)
        return {"fastrcnn_class_loss": class_loss, "fastrcnn_bbox_loss": bbox_loss, "maskrcnn_mask_loss": mask_loss}

    def _batched_losses(self, features, proposals, image_shapes, targets, proposal_valid=None) -> dict[str, Tensor]:
        """:meth:`_losses` on the fixed layout of :meth:`sample_rois_batched`: the box head's shape is set by the
        batch size and the sampling settings, and the host reads only how many positives the mask head gets (in
        the mask pooler's one read of its level sizes; C4: one read of the count) and the box pooler's level sizes.
        """
        rois, labels, sampled, matched_idxs, regression_targets = self.sample_rois_batched(
            proposals, targets, proposal_valid
        )
        num_images, num_slots = labels.shape
        per_image = list(rois.unbind())
        box_features = self.box_head(self.box_pooler(features, per_image, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        class_loss, bbox_loss = fast_rcnn_loss(
            class_logits, box_regression, labels.flatten(), regression_targets, sampled.flatten()
        )

        # Mask branch: the positive slots only.
        positive = labels.flatten() > 0
        mask_logits = self.run_head(
            self.mask_head, self.positive_mask_features(features, image_shapes, per_image, positive, box_features)
        )
        # The positives' slots, in order: a stable sort puts them first, and the mask head's rows say how many.
        slots = torch.argsort(~positive, stable=True)[: len(mask_logits)]
        # Their targets, for all images in one RoIAlign.
        gt_masks = mask_targets_batched(
            [t["masks"] for t in targets],
            slots // num_slots,
            rois.flatten(0, 1)[slots],
            matched_idxs.flatten()[slots],
            mask_logits.shape[-1],
            self.aligned_mask_targets,
            self.mask_target_form,
        )
        mask_loss = self.mask_loss.loss(mask_logits, labels.flatten()[slots], gt_masks)
        return {"fastrcnn_class_loss": class_loss, "fastrcnn_bbox_loss": bbox_loss, "maskrcnn_mask_loss": mask_loss}

    def _detect(self, features, proposals, image_shapes, proposal_valid=None) -> list[dict[str, Tensor]]:
        box_features = self.run_head(self.box_head, self.box_pooler(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        settings = (self.box_coder, self.score_thresh, self.nms_thresh, self.detections_per_img)
        if proposal_valid is None:
            boxes, scores, labels = fast_rcnn_inference(
                class_logits, box_regression, proposals, image_shapes, *settings
            )
        else:  # the batched RPN's fixed count of proposals per image: every image's detections at once
            boxes, scores, labels = fast_rcnn_inference_batched(
                class_logits,
                box_regression,
                torch.stack(proposals),
                torch.stack(proposal_valid),
                image_shapes,
                *settings,
            )
        masks = self.mask_loss.inference(
            self.run_head(self.mask_head, self.detection_mask_features(features, boxes, image_shapes)),
            torch.cat(labels),
        )
        masks = masks.split([len(b) for b in boxes])
        return [{"boxes": b, "labels": c, "scores": s, "masks": m} for b, c, s, m in zip(boxes, labels, scores, masks)]

    def run_head(self, head: nn.Module, x: Tensor) -> Tensor:
        """``head(x)``, on ``x`` padded to the next RoI bucket when ``roi_buckets`` is set; the padded rows' outputs
        are dropped, so the result is ``[len(x), ...]`` either way."""
        if self.roi_buckets is None:
            return head(x)
        return head(pad_to_bucket(x, self.roi_buckets))[: len(x)]

    def positive_mask_features(
        self,
        features: dict[str, Tensor],
        image_shapes: list[tuple[int, int]],
        rois: list[Tensor],
        positive: Tensor,
        box_features: Tensor,
        num_positive: int | None = None,
    ) -> Tensor:
        """The mask head's input for the positive sampled RoIs, in training.

        Args:
            rois: per image sampled RoIs ``[S_i, 4]``.
            positive: bool ``[sum S_i]``, the positive RoIs.
            box_features: the box head's output for all sampled RoIs, ``[sum S_i, ...]`` (unused here).
            num_positive: how many ``positive`` sets, where the caller knows it (the per-image path's index lists);
                ``None``: read on the host with the pooler's level sizes.

        Returns:
            ``[P, C, M, M]`` pooled features of the ``P`` positive RoIs, in order.
        """
        return self.mask_pooler(features, rois, image_shapes, valid=positive, num_valid=num_positive)

    def detection_mask_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """The mask head's input for the detected boxes (per image ``[D_i, 4]``), at test time."""
        return self.mask_pooler(features, boxes, image_shapes)


class Res5RoIHeads(RoIHeads):
    """The C4 design (paper Fig. 4, left): the mask head runs on the res5 box head's output.

    There is no mask pooler: in training the mask head reuses the positive RoIs' box-head features; at
    test time the box head runs again on the pooled detections. Takes :class:`RoIHeads`' arguments
    but ``mask_resolution`` (the mask head's input is res5's output).
    """

    def __init__(
        self,
        pooler: Callable[..., nn.Module],
        box_resolution: int,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_head: nn.Module,
        mask_loss,
        **kwargs,
    ):
        if "mask_resolution" in kwargs:
            raise ValueError("Res5RoIHeads pools no mask features: its mask head reads the res5 box head's output")
        super().__init__(pooler, box_resolution, box_head, box_predictor, mask_head, mask_loss, None, **kwargs)

    def mask_feature_resolution(self, box_resolution: int, mask_resolution: int | None) -> int:
        """res5 starts with a stride-2 block: 14x14 RoIs give the mask head 7x7 features."""
        return (box_resolution + 1) // 2

    def positive_mask_features(self, features, image_shapes, rois, positive, box_features, num_positive=None) -> Tensor:
        # Rows of box_features follow the sampled RoIs: the positive ones, in order (one read of their count, unless
        # the caller knows it).
        count = int(positive.sum()) if num_positive is None else num_positive
        return box_features[torch.argsort(~positive, stable=True)[:count]]

    def detection_mask_features(self, features, boxes, image_shapes) -> Tensor:
        return self.run_head(self.box_head, self.box_pooler(features, boxes, image_shapes))


def bucket_size(count: int, buckets: list[int]) -> int:
    """The smallest of ``buckets`` (sorted) that holds ``count`` rows; above the largest, the next multiple of it."""
    for size in buckets:
        if count <= size:
            return size
    return -(-count // buckets[-1]) * buckets[-1]


def pad_to_bucket(x: Tensor, buckets: list[int]) -> Tensor:
    """``x [R, ...]`` with zero rows appended up to ``bucket_size(R)``.

    The heads treat each row on its own (convs, fc layers, GroupNorm, FrozenBatchNorm), so the real rows' outputs
    do not depend on the padding and the padded rows' outputs are simply dropped: they carry no weight in any loss
    and get no gradient (``torch.cat``'s backward hands the real rows their own gradient).
    """
    size = bucket_size(len(x), buckets)
    if size == len(x):
        return x
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])
