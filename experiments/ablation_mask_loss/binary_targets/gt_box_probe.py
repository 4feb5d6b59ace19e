"""Where the mask probability goes: each trained model's mask head on the validation split's ground-truth boxes.

Detection is taken out of the comparison: every ground-truth box is pooled and given to the mask head with its
true class, and the head's probability for that class is compared with the binary mask target the loss trained
on. For the softmax head it also splits the probability on foreground pixels into the RoI's class, background and
the other classes, and scores the mask of "any class but background" (background below 0.5). RoIs are grouped by
whether another instance of a different class covers over 5% of the box.

    python experiments/ablation_mask_loss/binary_targets/gt_box_probe.py <job folder> [<job folder> ...]

A job folder is one job of the sweep (``.hydra/config.yaml`` and ``checkpoints/last.ckpt``). Prints one JSON line
per job.
"""

import argparse
import json

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mrcnn.config  # noqa: F401  (registers the config resolvers)
from mrcnn.modeling.mask_head import SoftmaxMaskLoss, mask_targets

OVERLAP_FRACTION = 0.05


def load_model(job: str) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    cfg = OmegaConf.load(f"{job}/.hydra/config.yaml")
    module = instantiate(cfg.module)
    checkpoint = torch.load(f"{job}/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    return module.model.eval(), instantiate(cfg.data.datamodule.val_dataset)


def overlapped_by_other_class(
    masks: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, own: torch.Tensor
) -> list:
    """Per box: does another instance of a different class cover over OVERLAP_FRACTION of the box (off its own mask)?

    ``own``: bool ``[N, M, M]``, each box's own binary mask target.
    """
    size = own.shape[-1]
    flags = []
    for k in range(len(boxes)):
        other = torch.where(labels != labels[k])[0]
        if len(other) == 0:
            flags.append(False)
            continue
        covered = mask_targets(masks, boxes[k : k + 1].expand(len(other), 4), other, size, form="binary").amax(0)
        flags.append(bool((covered * ~own[k]).mean() > OVERLAP_FRACTION))
    return flags


@torch.no_grad()
def probe(job: str) -> dict:
    model, dataset = load_model(job)
    heads = model.roi_heads
    softmax = isinstance(heads.mask_loss, SoftmaxMaskLoss)
    groups = {"alone": [], "overlapped": []}
    for index in range(len(dataset)):
        image, target = dataset[index]
        images, (target,) = model.transform([image], [target])
        boxes, labels = target["boxes"], target["labels"]
        if len(boxes) == 0:
            continue
        features = model.backbone(images.tensors)
        logits = heads.mask_head(heads.mask_pooler(features, [boxes], images.image_sizes))  # [N, C, M, M]
        size = logits.shape[-1]
        targets = mask_targets(target["masks"], boxes, torch.arange(len(boxes)), size, form="binary") > 0
        rows = torch.arange(len(boxes))
        if softmax:
            probabilities = logits.softmax(1)
            p = probabilities[rows, labels]
            p_background = probabilities[:, 0]
        else:  # sigmoid: the class's own channel (channel 0 for a class-agnostic head)
            p = logits[rows, labels if logits.shape[1] > 1 else 0].sigmoid()
        flags = overlapped_by_other_class(target["masks"], boxes, labels, targets)
        for k, overlapped in enumerate(flags):
            fg, predicted = targets[k], p[k] >= 0.5
            if not fg.any():  # a sliver of an object whose resampled mask holds no pixel at 0.5
                continue
            record = {
                "mask_iou": ((predicted & fg).sum() / (predicted | fg).sum().clamp(min=1)).item(),
                "fg_prob_own_class": p[k][fg].mean().item(),
                "fg_pixels_at_0.5": predicted[fg].float().mean().item(),
                "bg_pixels_at_0.5": predicted[~fg].float().mean().item(),
            }
            if softmax:
                record["fg_prob_background"] = p_background[k][fg].mean().item()
                record["fg_prob_other_classes"] = 1 - record["fg_prob_own_class"] - record["fg_prob_background"]
                # The mask of "any class but background": does the head know where the object is, if not which?
                anywhere = p_background[k] < 0.5
                record["mask_iou_any_class"] = ((anywhere & fg).sum() / (anywhere | fg).sum().clamp(min=1)).item()
            groups["overlapped" if overlapped else "alone"].append(record)
    result = {"job": job, "mask_loss": type(heads.mask_loss).__name__, "mask_channels": logits.shape[1]}
    for name, records in groups.items():
        result[name] = {"rois": len(records)} | {
            key: round(sum(r[key] for r in records) / len(records), 3) for key in records[0]
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jobs", nargs="+", help="job folders of an ablation_mask_loss sweep")
    torch.set_num_threads(1)
    for job in parser.parse_args().jobs:
        print(json.dumps(probe(job)), flush=True)


if __name__ == "__main__":
    main()
