"""The end of a job: the AP tables on the terminal and ``<run_dir>/metrics.json``.

Every run prints COCO-style box and mask AP (pycocotools); a Cityscapes run also prints the official
Cityscapes instance AP (cityscapesscripts), per class. The two protocols differ, and each table says which it is.
"""

import json
import logging
import os
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

log = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-row table of COCO box and mask AP, in percent."""
    header = f"{'':6}" + "".join(f"{k:>8}" for k in AP_KEYS)
    rows = [header]
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        values = [metrics.get(f"{iou_type}_{k}", -1.0) for k in AP_KEYS]
        # pycocotools reports -1 where no ground truth exists (e.g. no large objects).
        rows.append(f"{name:6}" + "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values))
    return "\n".join(rows)


def format_cityscapes_metrics(metrics: dict[str, float]) -> str:
    """The official Cityscapes AP and AP50 per class and averaged, in percent (``-`` for a class without ground truth)."""
    prefix = "cityscapes_AP50_"
    classes = [key[len(prefix) :] for key in metrics if key.startswith(prefix)]
    rows = [f"{'':12}{'AP':>8}{'AP50':>8}"]
    for name in classes:
        values = (metrics[f"cityscapes_AP_{name}"], metrics[f"cityscapes_AP50_{name}"])
        rows.append(f"{name:12}" + "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values))
    values = (metrics["cityscapes_AP"], metrics["cityscapes_AP50"])
    rows.append(f"{'average':12}" + "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values))
    return "\n".join(rows)


def write_final_metrics(
    cfg: DictConfig,
    trainer: L.Trainer,
    metrics: dict[str, float],
    nothing_to_score: str | None = None,
    global_step: int | None = None,
) -> None:
    """Prints the AP table and writes ``<run_dir>/metrics.json`` (rank zero).

    Args:
        nothing_to_score: why the evaluation scored nothing (:attr:`mrcnn.evaluation.CocoEvaluator.nothing_to_score`):
            printed under the table of "-" and written to ``metrics.json``.
        global_step: the optimizer steps the evaluated weights were trained for, where the Trainer's own count is
            not it (``mode=evaluate`` of a checkpoint); ``None``: the Trainer's.
    """
    step = trainer.global_step if global_step is None else int(global_step)
    log.info(
        "process %d of %d done at global step %d in %s", trainer.global_rank, trainer.world_size, step, cfg.run_dir
    )
    if not trainer.is_global_zero:
        return
    print("\nCOCO-style AP on the validation split (%, pycocotools):\n" + format_metrics(metrics), flush=True)
    if nothing_to_score:
        print(f"WARNING: nothing was scored: {nothing_to_score}", flush=True)
    if "cityscapes_AP" in metrics:
        print(
            "\nCityscapes official instance AP on the validation split (%, cityscapesscripts: overlaps 0.5:0.95, "
            "regions under 100 pixels ignored):\n" + format_cityscapes_metrics(metrics),
            flush=True,
        )
    record = {**metrics, "global_step": step, "world_size": trainer.world_size}
    if nothing_to_score:
        record["nothing_to_score"] = nothing_to_score
    path = Path(cfg.run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then moved: a run killed while writing leaves no half file, which would count as finished.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)
