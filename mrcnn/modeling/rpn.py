"""Region Proposal Network: torchvision's, plus losses in eval mode so one forward serves validation."""

import collections
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import anchor_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from mrcnn.modeling import sampling
from mrcnn.modeling.nms import grouped_nms
from mrcnn.modeling.transform import BoxCoder, box_dtype


class AnchorGenerator(anchor_utils.AnchorGenerator):
    """torchvision's anchors, in float32 under autocast whatever the feature maps' dtype, and made once per input size.

    torchvision makes them in the feature maps' dtype: under bf16 autocast every coordinate is rounded to bf16's
    spacing (4 px from 512, 8 px from 1024); at 800x1333 anchors move by up to 7 px and about 9% become duplicates.
    Under autocast they are made in float32 (or a wider dtype, which is kept), where they are torchvision's, bit for
    bit; without it in the maps' dtype, as torchvision (:func:`mrcnn.modeling.transform.box_dtype`). They depend only
    on the padded input size and the feature-map sizes, so those of the last ``cache_size`` sizes are kept, not
    remade every step.

    Args:
        sizes, aspect_ratios: torchvision's ``AnchorGenerator`` arguments (per feature map).
        cache_size: how many input sizes to keep the anchors of (0: none).
    """

    def __init__(self, sizes, aspect_ratios, cache_size: int = 16):
        super().__init__(sizes, aspect_ratios)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Returns per image the ``[A, 4]`` anchors of every level, concatenated (one tensor shared by all images)."""
        dtype, device = box_dtype(feature_maps[0]), feature_maps[0].device
        image_size = tuple(image_list.tensors.shape[-2:])
        key = (image_size, tuple(tuple(f.shape[-2:]) for f in feature_maps), dtype, device)
        anchors = self._cache.get(key)
        if anchors is not None:
            self._cache.move_to_end(key)
        else:
            # torchvision's computation for one image, on stand-ins that carry only the sizes, dtype and device.
            # Normal tensors even when made under inference_mode (a validation), as training reuses them.
            with torch.inference_mode(False), torch.no_grad():
                one_image = ImageList(torch.empty((1, 0, *image_size), device=device), [image_size])
                maps = [torch.empty((1, 0, *f.shape[-2:]), dtype=dtype, device=device) for f in feature_maps]
                anchors = super().forward(one_image, maps)[0]
            if self.cache_size > 0:
                self._cache[key] = anchors
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [anchors] * len(image_list.image_sizes)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # moved or cast: the kept anchors would hold memory on the old device
        return super()._apply(fn, *args, **kwargs)


class RPN(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork with plain constructor arguments.

    Unlike torchvision, it computes its losses whenever targets are given, in train or eval mode:
    validation losses then come from the same forward as the detections, with BatchNorm in eval
    mode (see PITFALLS.md). Proposal counts follow the module's mode as in torchvision.

    Args:
        in_channels: channels of each feature map.
        anchor_sizes: one tuple of sizes (pixels) per feature map, e.g. ``((32,), (64,), ...)`` for FPN
            or ``((32, 64, 128, 256, 512),)`` for C4.
        aspect_ratios: ratios (h/w) per anchor size, the same for every map.
        pre_nms_top_n_train, pre_nms_top_n_test: proposals kept per level before NMS.
        post_nms_top_n_train, post_nms_top_n_test: proposals kept per image after NMS.
        nms_thresh, fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction, score_thresh:
            as in torchvision.
        batched_proposals: filter the proposals of all images at once, without waiting on the host: boxes that
            torchvision removes (too small, below ``score_thresh``) get score -inf instead, one NMS kernel
            suppresses within every (image, level) group at once, and each image keeps a fixed
            ``min(post_nms_top_n, candidates)`` proposals with a validity mask (:meth:`filter_proposals_batched`).
            The valid proposals are torchvision's up to the order of equal scores. ``False``: torchvision's
            per-image loop (several host syncs per image and step), bit-exact with torchvision.
        batched_sampling: match anchors to ground truth and sample them for the losses for all images at once,
            without waiting on the host (:mod:`mrcnn.modeling.sampling`): the same labels as torchvision, a sample
            of the same size and distribution drawn with random keys instead of ``randperm``, and the losses as
            masked sums. ``False``: torchvision's per-image matcher and sampler (bit-exact with torchvision).
    """

    def __init__(
        self,
        in_channels: int,
        anchor_sizes: list[list[int]],
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        score_thresh: float = 0.0,
        batched_proposals: bool = False,
        batched_sampling: bool = False,
    ):
        sizes = tuple(tuple(int(s) for s in level) for level in anchor_sizes)
        ratios = (tuple(float(r) for r in aspect_ratios),) * len(sizes)
        anchor_generator = AnchorGenerator(sizes, ratios)
        head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            dict(training=pre_nms_top_n_train, testing=pre_nms_top_n_test),
            dict(training=post_nms_top_n_train, testing=post_nms_top_n_test),
            nms_thresh,
            score_thresh,
        )
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))  # torchvision's, without its per-call copies
        self.batched_proposals = batched_proposals
        self.batched_sampling = batched_sampling

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """
        Returns:
            proposals: per image ``[P_i, 4]`` xyxy in resized-image pixels; with ``batched_proposals`` only the
                valid ones (selecting them waits on the host: the model calls :meth:`propose` instead).
            losses: ``rpn_class_loss`` and ``rpn_bbox_loss`` if targets were given, else empty.
        """
        proposals, valid, losses = self.propose(images, features, targets)
        if valid is not None:
            proposals = [p[v] for p, v in zip(proposals, valid)]
        return proposals, losses

    def propose(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor] | None, dict[str, Tensor]]:
        """Like :meth:`forward`, but with ``batched_proposals`` the proposals keep their fixed count per image.

        Returns:
            proposals: per image ``[P_i, 4]`` xyxy in resized-image pixels.
            valid: ``None`` (every proposal is real), or with ``batched_proposals`` per image bool ``[P_i]``:
                ``False`` rows are padding that must never be sampled nor become detections.
            losses: as :meth:`forward`'s.
        """
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        # Under bf16 autocast the logits are bf16, and so would be their sigmoid, which rounds every logit above
        # about 6.5 to exactly 1: the most confident proposals would tie, and NMS and the top-n would keep an
        # arbitrary one of them. In float32 (or wider: box_dtype) the ranking is the logits'; without autocast
        # nothing changes (torchvision's arithmetic). The loss reads them in float32 under autocast anyway.
        objectness = objectness.to(box_dtype(objectness))
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        valid = None
        if self.batched_proposals:
            boxes, valid = self.filter_proposals_batched(
                proposals, objectness, images.image_sizes, num_anchors_per_level
            )
        else:
            boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        losses = {}
        if targets is not None and self.batched_sampling:
            class_loss, bbox_loss = self.batched_losses(objectness, deltas, anchors, targets)
            losses = {"rpn_class_loss": class_loss, "rpn_bbox_loss": bbox_loss}
        elif targets is not None:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            class_loss, bbox_loss = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"rpn_class_loss": class_loss, "rpn_bbox_loss": bbox_loss}
        return boxes, valid, losses

    def filter_proposals_batched(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's ``filter_proposals`` for all images at once; on a GPU without a host sync.

        Per level the top ``pre_nms_top_n`` anchors by objectness, clipped to the image; boxes torchvision
        removes (too small, below ``score_thresh``) take no part in the NMS and get score -inf; NMS within every
        (image, level) group at once (:func:`mrcnn.modeling.nms.grouped_nms`: one Triton kernel on a GPU,
        torchvision's ``nms`` per group on the CPU); then the top ``K = min(post_nms_top_n, candidates)`` kept
        boxes per image by score, the order torchvision's NMS returns them in.

        Args:
            proposals: ``[B, A, 4]`` decoded boxes for every anchor.
            objectness: ``[B * A, 1]`` logits.
            image_shapes: per image ``(H, W)`` after resizing.
            num_anchors_per_level: anchors per feature map, summing to ``A``.

        Returns:
            boxes: per image ``[K, 4]``; valid: per image bool ``[K]``, ``False`` for padding (fewer than K
            boxes survived).
        """
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # [B, N]
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        boxes = proposals[batch_idx, top_n_idx]

        # torchvision's clip (clamp to [0, width] and [0, height]) for all images at once: the bounds are host numbers,
        # copied to the device from pinned memory without waiting for it.
        bounds = torch.tensor([(w, h, w, h) for h, w in image_shapes], dtype=boxes.dtype, pin_memory=boxes.is_cuda)
        boxes = torch.minimum(boxes.clamp(min=0), bounds.to(device, non_blocking=True)[:, None, :])

        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)
        scores = scores.masked_fill(~valid, float("-inf"))

        # Each level's top boxes sit in one segment of every row, in decreasing objectness: NMS within each (image,
        # level) segment, as torchvision's per-level batched_nms, all at once (on a GPU without a host read).
        ends = list(itertools.accumulate(min(self.pre_nms_top_n(), n) for n in num_anchors_per_level))
        keep = grouped_nms(boxes, valid, list(zip([0, *ends[:-1]], ends)), self.nms_thresh)
        scores = scores.masked_fill(~keep, float("-inf"))

        top_scores, top_idx = scores.topk(min(self.post_nms_top_n(), scores.shape[1]), dim=1)
        boxes = boxes[batch_idx, top_idx]
        valid = top_scores > float("-inf")
        return list(boxes.unbind()), list(valid.unbind())

    def batched_losses(
        self, objectness: Tensor, deltas: Tensor, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's ``assign_targets_to_anchors`` and ``compute_loss`` for all images at once, without a sync.

        Args:
            objectness: ``[B * A, 1]`` logits; deltas: ``[B * A, 4]``; anchors: per image ``[A, 4]``.

        Returns:
            class_loss: binary cross-entropy over the sampled anchors (mean); bbox_loss: smooth L1 (beta 1/9) summed
            over the sampled positives, over the number of sampled anchors, as torchvision.
        """
        anchors = torch.stack(anchors)  # [B, A, 4]
        gt_boxes, gt_valid = sampling.pad_boxes([t["boxes"].to(anchors.dtype) for t in targets])
        iou = sampling.batched_box_iou(gt_boxes, anchors)
        matcher = self.proposal_matcher
        matched, _ = sampling.match(
            iou, gt_valid, matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches
        )
        labels = torch.where(matched == sampling.BETWEEN_THRESHOLDS, -1.0, (matched >= 0).to(torch.float32))
        matched_gt = gt_boxes.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))  # [B, A, 4]
        regression_targets = self.box_coder.encode_single(matched_gt.reshape(-1, 4), anchors.reshape(-1, 4))

        positive, negative = sampling.sample(
            labels, self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        )
        positive, sampled = positive.flatten(), (positive | negative).flatten()
        count = sampled.sum().clamp(min=1)
        # where, not a product: unmatched anchors' targets may be infinite (an image without ground truth encodes
        # against a zero box), and inf * 0 is nan.
        box_loss = F.smooth_l1_loss(deltas, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
        bbox_loss = torch.where(positive, box_loss, 0.0).sum() / count
        class_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten(), labels.flatten().clamp(min=0), reduction="none"
        )
        return torch.where(sampled, class_loss, 0.0).sum() / count, bbox_loss
