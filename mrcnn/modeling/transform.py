"""torchvision's GeneralizedRCNNTransform and BoxCoder without their host-to-device copies.

Both build small constant tensors from Python numbers with ``torch.tensor(..., device=...)`` at every call: the
image mean and std, the box resize ratios, the box coder's weights and its 0.5. On a GPU each such copy from
pageable host memory waits for the device, once per image and call. These subclasses compute the same values
from the same float32 arithmetic, keeping the constants on the device (or as CPU scalars, which CUDA kernels
take as arguments), so every output is bit for bit torchvision's.
"""

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks


class _DeviceConstants:
    """Tensors made from Python numbers once per (dtype, device), instead of once per call."""

    def __init__(self, values):
        self.values = tuple(float(v) for v in values)
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.values, dtype=dtype).to(device)
        return self._cache[key]


def resize_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """torchvision's ``resize_boxes``, with the float32 ratios computed on the host as CPU scalars."""
    ratio_height, ratio_width = (
        torch.tensor(s, dtype=torch.float32) / torch.tensor(s_orig, dtype=torch.float32)
        for s, s_orig in zip(new_size, original_size)
    )
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_width, ymin * ratio_height, xmax * ratio_width, ymax * ratio_height), dim=1)


def _linear_taps(start: Tensor, size: Tensor, source: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis of ``F.interpolate(mode="bilinear", align_corners=False)`` from ``source``
    samples to ``size [D]`` outputs, placed at ``start [D]`` on an axis of ``length`` pixels.

    Returns ``i0, i1`` (int64 ``[D, length]`` source indices), ``l0, l1`` (float32 weights, 0 outside the output).
    """
    position = torch.arange(length, device=start.device)
    index = position[None, :] - start[:, None]  # the output sample each pixel shows
    inside = (index >= 0) & (index < size[:, None])
    # torch's area_pixel_compute_source_index in float32: (in / out) * (i + 0.5) - 0.5, clamped at 0.
    scale = torch.tensor(float(source), dtype=torch.float32) / size.to(torch.float32)
    real = (scale[:, None] * (index.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = real.to(torch.int64).clamp(max=source - 1)
    i1 = torch.where(i0 < source - 1, i0 + 1, i0)
    l1 = (real - i0.to(torch.float32)).clamp(0, 1)
    l0 = 1 - l1
    return i0, i1, torch.where(inside, l0, 0.0), torch.where(inside, l1, 0.0)


def _interpolation_matrix(start: Tensor, size: Tensor, source: int, length: int) -> Tensor:
    """``[D, length, source]``: row ``x`` holds the two bilinear weights with which pixel ``x`` reads the source."""
    i0, i1, l0, l1 = _linear_taps(start, size, source, length)
    matrix = l0.new_zeros((*l0.shape, source))
    return matrix.scatter_add_(2, i0[..., None], l0[..., None]).scatter_add_(2, i1[..., None], l1[..., None])


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """torchvision's ``paste_masks_in_image`` for all masks at once, without reading a box on the host.

    torchvision resizes each mask to its (integer, padded) box with ``F.interpolate`` and copies it into a blank
    image, reading the box's corners on the host to size and place it: several waits per detection on a GPU.
    Bilinear resizing is separable, so each pasted mask is ``Wy @ mask @ Wx^T``, where ``Wx [W, P]`` and
    ``Wy [H, P]`` hold torch's bilinear weights for the box's pixels (two per row, zero outside the box): two
    batched matrix products for all detections. The values are torchvision's to float32 rounding (sums in another
    order: about 1e-6 at most, ``tests/modeling/test_paste_masks.py``).

    Args:
        masks: ``[D, 1, M, M]`` probabilities in the box frame.
        boxes: ``[D, 4]`` xyxy in image pixels.
        image_size: ``(H, W)``.

    Returns:
        ``[D, 1, H, W]``: each mask in the image, 0 outside its box.
    """
    height, width = image_size
    if len(masks) == 0:
        return masks.new_zeros((0, 1, height, width))
    masks, scale = expand_masks(masks, padding=padding)
    boxes = expand_boxes(boxes, scale).to(torch.int64)
    source = masks.shape[-1]
    sizes = (boxes[:, 2:] - boxes[:, :2] + 1).clamp(min=1)  # torchvision's w, h: at least one pixel
    across = _interpolation_matrix(boxes[:, 0], sizes[:, 0], source, width)  # [D, W, P]
    down = _interpolation_matrix(boxes[:, 1], sizes[:, 1], source, height)  # [D, H, P]
    # In float32, rounded once to the masks' dtype (torch's kernel accumulates bf16 / fp16 in float32 too); with
    # autocast off, which would run the products in bf16 (weights and sums to 3 digits) during a bf16 validation.
    with torch.autocast(masks.device.type, enabled=False):
        pasted = down @ (masks[:, 0].float() @ across.transpose(1, 2))
    return pasted.to(masks.dtype)[:, None]


class RCNNTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose normalisation and training-time box resize copy nothing to the device, whose
    target masks are resized a few at a time, and which skips the copies torchvision makes of images already at
    their size (a resize by 1, a padding by 0): the same outputs, bit for bit.

    torchvision resizes all of an image's masks in one float32 tensor (``N x H x W x 4`` bytes before and after):
    50,000 small annotations on one image took 1.6 GB in one allocation. The same nearest-neighbour resize in
    chunks of :attr:`MASKS_PER_CHUNK` gives the same uint8 masks with a bounded float32 peak.
    """

    MASKS_PER_CHUNK = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mean = _DeviceConstants(self.image_mean)
        self._std = _DeviceConstants(self.image_std)

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"Expected input images of floating type (in range [0, 1]), got {image.dtype}")
        mean = self._mean.get(image.dtype, image.device)
        std = self._std.get(image.dtype, image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's postprocess (boxes back to the original size, masks pasted into it), pasting with
        :func:`paste_masks`: the same masks, without waiting on the host for every detection."""
        if self.training:
            return result
        for pred, size, original_size in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original_size)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original_size)
        return result

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        """torchvision's ``batch_images`` (zero-padded to the largest size, rounded up to ``size_divisible``); images
        of one size that needs no padding are stacked in one copy instead of one per image."""
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) == 1 and all(side % size_divisible == 0 for side in images[0].shape[-2:]):
            return torch.stack(images)
        return super().batch_images(images, size_divisible)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        h, w = image.shape[-2:]
        if self.training:
            if self._skip_resize:
                return image, target
            size = self.torch_choice(self.min_size)
        else:
            size = self.min_size[-1]
        if target is not None and "keypoints" in target:
            raise ValueError("keypoints are not supported")
        if self.fixed_size is None and min(size / min(h, w), self.max_size / max(h, w)) == 1.0:
            # Already at its size (fixed-size data such as the shapes): torchvision's resize by a factor of exactly 1
            # gives back the same pixels, masks and boxes (bilinear weights 1 and 0), after copying each.
            return image, target
        masks = None if target is None else target.pop("masks", None)
        image, target = _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
        if target is None:
            return image, target
        if masks is not None:
            new_size = image.shape[-2:]
            chunks = [
                torch.nn.functional.interpolate(chunk[:, None].float(), size=new_size)[:, 0].byte()
                for chunk in masks.split(self.MASKS_PER_CHUNK)
            ]
            target["masks"] = torch.cat(chunks) if chunks else masks.new_zeros((0, *new_size))
        target["boxes"] = resize_boxes(target["boxes"], (h, w), tuple(image.shape[-2:]))
        return image, target


def box_dtype(values: Tensor) -> torch.dtype:
    """The dtype for box coordinates computed from ``values``: float32 at least under autocast, else ``values``'.

    Under autocast a layer's reduced-precision output (bf16, fp16) says nothing about the precision boxes need, and
    their coordinates would be rounded to its spacing (bf16: 4 px from 512, 8 px from 1024). A model run in half
    precision without autocast (``model.half()``, ``trainer.precision=16-true``) keeps its dtype everywhere: its
    RoIAlign and NMS kernels need the boxes in the features' dtype.
    """
    if torch.is_autocast_enabled(values.device.type):
        return torch.promote_types(values.dtype, torch.float32)
    return values.dtype


class BoxCoder(det_utils.BoxCoder):
    """torchvision's BoxCoder without a host-to-device copy per call (its weights, and 0.5 in decoding), decoding
    in float32 at least under autocast (:func:`box_dtype`; torchvision decodes in the regression outputs' dtype)."""

    def __init__(self, weights, bbox_xform_clip: float = det_utils.math.log(1000.0 / 16)):
        super().__init__(weights, bbox_xform_clip)
        self._weights = _DeviceConstants(weights)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        weights = self._weights.get(reference_boxes.dtype, reference_boxes.device)
        return det_utils.encode_boxes(reference_boxes, proposals, weights)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        # torchvision decodes in the regression outputs' dtype: under bf16 autocast the boxes would be rounded to
        # bf16's spacing (8 px from 1024). In float32 (or a wider dtype) it is torchvision's arithmetic.
        dtype = box_dtype(rel_codes)
        rel_codes, boxes = rel_codes.to(dtype), boxes.to(dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        # torchvision multiplies by a 0.5 tensor made on the device; by 0.5 as a scalar the products are the same.
        c_to_c_h = 0.5 * pred_h
        c_to_c_w = 0.5 * pred_w
        pred_boxes = torch.stack(
            (pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w, pred_ctr_y + c_to_c_h), dim=2
        )
        return pred_boxes.flatten(1)
