"""Region Proposal Network: torchvision's, plus losses in eval mode so one forward serves validation."""

from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from mrcnn.modeling.transform import BoxCoder


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

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """
        Returns:
            proposals: per image ``[P_i, 4]`` xyxy in resized-image pixels.
            losses: ``rpn_class_loss`` and ``rpn_bbox_loss`` if targets were given, else empty.
        """
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        losses = {}
        if targets is not None:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            class_loss, bbox_loss = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"rpn_class_loss": class_loss, "rpn_bbox_loss": bbox_loss}
        return boxes, losses
