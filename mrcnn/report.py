"""Turn a sweep directory of finished runs into an ablation table (markdown + json) and a chart.

Each job directory of a Hydra sweep holds ``.hydra/overrides.yaml`` (what the job changed) and
``metrics.json`` (its final COCO metrics, written by ``mrcnn.summary``). Jobs are grouped into variants
by the values of the ablation's ``variant_keys`` and averaged over everything else (the seeds).

Rebuild a report from an existing sweep::

    python -m mrcnn.report multirun/2026-11-21/10-00-00 --keys model/pooler --title "RoIAlign (Table 2c)"
"""

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

COLUMNS = (("segm_AP", "AP"), ("segm_AP50", "AP50"), ("segm_AP75", "AP75"), ("bbox_AP", "AP^bb"))


@dataclass
class Variant:
    """All finished runs of one variant (e.g. ``model/pooler=roi_align``) across seeds."""

    name: str
    runs: list[dict[str, float]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.runs if key in r]
        return sum(values) / len(values) if values else float("nan")

    def std(self, key: str) -> float:
        """Sample standard deviation over seeds (0 for a single run)."""
        values = [r[key] for r in self.runs if key in r]
        if len(values) < 2:
            return 0.0
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def read_overrides(job_dir: Path) -> dict[str, str]:
    """``key=value`` overrides of one job, from Hydra's ``.hydra/overrides.yaml``."""
    lines = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    overrides = {}
    for line in lines:
        key, _, value = line.partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def collect(sweep_dir: str | Path, variant_keys: list[str], order: list[str] | None = None) -> list[Variant]:
    """Group the finished jobs of ``sweep_dir`` by their values of ``variant_keys``.

    Jobs without ``metrics.json`` (failed or still running) are skipped and logged, not averaged in.

    Args:
        order: optional variant names in the order the table should list them.
    """
    variants: dict[str, Variant] = {}
    for overrides_file in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        metrics_file = job_dir / "metrics.json"
        if not metrics_file.exists():
            log.warning("skipping %s: no metrics.json (the job failed or has not finished)", job_dir)
            continue
        overrides = read_overrides(job_dir)
        name = ", ".join(f"{k}={overrides.get(k, 'default')}" for k in variant_keys)
        variant = variants.setdefault(name, Variant(name))
        variant.runs.append(json.loads(metrics_file.read_text()))
        variant.seeds.append(overrides.get("seed", "default"))
    result = list(variants.values())
    if order:
        rank = {name: i for i, name in enumerate(order)}
        result.sort(key=lambda v: rank.get(v.name, len(rank)))
    return result


def _cell(variant: Variant, key: str) -> str:
    mean, std = 100 * variant.mean(key), 100 * variant.std(key)
    return f"{mean:.1f} ± {std:.1f}" if len(variant.runs) > 1 else f"{mean:.1f}"


def markdown_table(variants: list[Variant], title: str = "", paper: dict[str, list[float]] | None = None) -> str:
    """The paper's Table 2 layout: one row per variant; mask AP, AP50, AP75 and box AP (percent).

    Args:
        paper: optional published numbers per variant name, ``[AP, AP50, AP75, AP^bb or nan]``.
    """
    header = "| variant | " + " | ".join(label for _, label in COLUMNS) + " | seeds |"
    if paper:
        header += " paper AP | paper AP50 | paper AP75 | paper AP^bb |"
    lines = [f"**{title}**", ""] if title else []
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for v in variants:
        row = f"| {v.name} | " + " | ".join(_cell(v, k) for k, _ in COLUMNS) + f" | {len(v.runs)} |"
        if paper:
            numbers = paper.get(v.name)
            row += "".join(f" {x:.1f} |" if numbers and not math.isnan(x) else " - |" for x in (numbers or [math.nan] * 4))
        lines.append(row)
    lines.append("")
    lines.append("Mask AP (AP, AP50, AP75) and box AP (AP^bb) in percent, COCO-style (pycocotools), mean ± sample std over seeds.")
    return "\n".join(lines)


def chart(variants: list[Variant], path: str | Path, title: str = "") -> None:
    """Bar chart of mask AP, AP50, AP75 and box AP per variant with seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(variants) + 2), 4))
    for i, (key, label) in enumerate(COLUMNS):
        xs = [j + (i - (len(COLUMNS) - 1) / 2) * width for j in range(len(variants))]
        ax.bar(xs, [100 * v.mean(key) for v in variants], width, yerr=[100 * v.std(key) for v in variants], label=label, capsize=3)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([v.name.replace(", ", "\n") for v in variants], fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    sweep_dir: str | Path,
    variant_keys: list[str],
    title: str = "",
    order: list[str] | None = None,
    paper: dict[str, list[float]] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    variants = collect(sweep_dir, variant_keys, order)
    if not variants:
        raise ValueError(f"no finished runs (with metrics.json) under {sweep_dir}")
    paths = {"md": sweep_dir / "report.md", "json": sweep_dir / "report.json", "png": sweep_dir / "report.png"}
    paths["md"].write_text(markdown_table(variants, title, paper) + "\n")
    summary = [
        {
            "variant": v.name,
            "seeds": v.seeds,
            "runs": v.runs,
            "mean": {k: v.mean(k) for k, _ in COLUMNS},
            "std": {k: v.std(k) for k, _ in COLUMNS},
        }
        for v in variants
    ]
    paths["json"].write_text(json.dumps({"title": title, "variant_keys": variant_keys, "variants": summary}, indent=2))
    chart(variants, paths["png"], title)
    return paths


class AblationReportCallback(Callback):
    """Hydra callback: when a sweep ends, write its ablation report into the sweep directory.

    Configured by the ``experiment=ablation_*`` configs under ``hydra.callbacks``. When the sweep's
    logger is W&B, the table and chart also go to a W&B run of ``job_type="report"`` in the
    experiment's group.

    Args:
        variant_keys: overrides that define a variant (e.g. ``["model/pooler"]``); others (seed) are averaged.
        title: table and chart title.
        order: variant names in table order.
        paper: published numbers per variant name, ``[AP, AP50, AP75, AP^bb]`` (nan where not reported).
    """

    def __init__(self, variant_keys, title: str = "", order=None, paper=None):
        self.variant_keys = list(variant_keys)
        self.title = title
        self.order = list(order) if order else None
        self.paper = {k: [float(x) for x in v] for k, v in (paper or {}).items()}

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            paths = write_report(sweep_dir, self.variant_keys, self.title, self.order, self.paper)
        except ValueError as error:
            log.error("ablation report not written: %s", error)
            return
        log.info("ablation report: %s", ", ".join(str(p) for p in paths.values()))
        print(paths["md"].read_text(), flush=True)
        if any("WandbLogger" in str(c.get("_target_", "")) for c in (config.get("logger") or [])):
            log_to_wandb(paths, config)


def log_to_wandb(paths: dict[str, Path], config) -> None:
    """Log the report table and chart to a W&B run (offline unless credentials are set)."""
    import os

    import wandb

    summary = json.loads(paths["json"].read_text())
    table = wandb.Table(columns=["variant", "seeds"] + [f"{k} mean" for k, _ in COLUMNS] + [f"{k} std" for k, _ in COLUMNS])
    for v in summary["variants"]:
        table.add_data(v["variant"], len(v["runs"]), *[v["mean"][k] for k, _ in COLUMNS], *[v["std"][k] for k, _ in COLUMNS])
    logger_cfg = next(c for c in config.logger if "WandbLogger" in str(c.get("_target_", "")))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    run = wandb.init(
        project=logger_cfg.get("project", "mrcnn"),
        group=config.get("experiment_name", None),
        job_type="report",
        name=f"{config.get('experiment_name', 'ablation')}-report",
        dir=str(paths["md"].parent),
        mode=os.environ.get("WANDB_MODE", "online" if has_key else "offline"),
    )
    run.log({"ablation/table": table, "ablation/chart": wandb.Image(str(paths["png"]))})
    run.finish()


def settings_from_sweep(sweep_dir: str | Path) -> dict:
    """The report callback's arguments (variant keys, title, order, paper numbers) as the sweep recorded them
    in ``<sweep_dir>/multirun.yaml``; empty when the sweep had no report callback."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return {}
    callback = OmegaConf.select(OmegaConf.load(path), "hydra.callbacks.ablation_report", default=None)
    if callback is None:
        return {}
    settings = OmegaConf.to_container(callback, resolve=False)
    settings.pop("_target_", None)
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Rebuild an ablation report from a sweep directory (e.g. after a sweep was stopped early)."
    )
    parser.add_argument("sweep_dir")
    parser.add_argument(
        "--keys", nargs="+", default=None,
        help="overrides that define a variant, e.g. model/pooler (default: those in the sweep's multirun.yaml)",
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    settings = settings_from_sweep(args.sweep_dir)
    if args.keys:
        settings["variant_keys"] = args.keys
    if args.title is not None:
        settings["title"] = args.title
    if not settings.get("variant_keys"):
        parser.error(f"--keys is needed: {args.sweep_dir}/multirun.yaml has no ablation_report callback")
    # The callback's own constructor normalises the recorded settings, as when Hydra built it for the sweep.
    report = AblationReportCallback(**settings)
    paths = write_report(args.sweep_dir, report.variant_keys, report.title, report.order, report.paper)
    print(paths["md"].read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
