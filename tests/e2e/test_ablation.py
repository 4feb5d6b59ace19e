"""One ablation end to end through run.py at a tiny setting: sweep, per-job metrics, report files."""

import json

from tests.helpers.runs import TINY_RUN, run_py

TINY = [*TINY_RUN, "data.num_train_images=8", "data.num_val_images=4", "data.datamodule.batch_size=4"]


def test_ablation_runs_its_variants_and_writes_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    # The experiment sets the sweep (no -m needed); narrow it to two variants and one seed.
    run_py(
        [
            "experiment=ablation_mask_loss", *TINY, f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.params={+ablation/mask_loss: 'softmax,sigmoid', seed: '0'}",
        ],
        timeout=600,
    )
    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP"} <= set(metrics)

    table = (sweep / "report.md").read_text()
    assert "Table 2b" in table
    rows = [line for line in table.splitlines() if line.startswith("| ablation/mask_loss=")]
    assert [r.split(" |")[0] for r in rows] == ["| ablation/mask_loss=softmax", "| ablation/mask_loss=sigmoid"]
    assert all(r.rstrip().endswith("|") and " 24.8 | 44.1 |" in table for r in rows)
    summary = json.loads((sweep / "report.json").read_text())
    assert [len(v["runs"]) for v in summary["variants"]] == [1, 1]
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
