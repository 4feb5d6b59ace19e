"""How far RoIPool's rounding moves this ablation's boxes: the validation split's ground-truth boxes against the
same boxes with each corner rounded to the stride-16 grid (half away from zero, as torchvision's ``roi_pool`` and our
RoIWarp do), at the ablation's 256 px and at the same boxes scaled to the paper's 800 px.

    python experiments/ablation_roialign/c4_256px_same_cells/quantization_probe.py
"""

import torch
from torchvision.ops import box_iou

from mrcnn.data.shapes import ShapesDataset

STRIDE = 16  # ResNet-C4's res4
CLASSES = ["circle", "triangle", "square", "ring", "crescent", "star"]  # configs/data/shapes.yaml


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def main() -> None:
    dataset = ShapesDataset(num_images=200, image_size=256, classes=CLASSES, max_objects=6, seed=0, split="val")
    boxes = torch.cat([dataset[i][1]["boxes"] for i in range(len(dataset))])
    for image_side in (256, 800):
        scaled = boxes * image_side / 256
        rounded = round_half_away(scaled / STRIDE) * STRIDE
        iou = box_iou(scaled, rounded).diag()
        side = ((scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])).sqrt()
        collapsed = (rounded[:, 2] <= rounded[:, 0]) | (rounded[:, 3] <= rounded[:, 1])
        print(
            f"{image_side} px: {len(boxes)} boxes, median sqrt(area) {side.median():.1f} px, "
            f"mean IoU with the rounded box {iou.mean():.3f}, below 0.7: {(iou < 0.7).float().mean():.1%}, "
            f"rounded to zero width or height: {collapsed.float().mean():.1%}"
        )


if __name__ == "__main__":
    main()
