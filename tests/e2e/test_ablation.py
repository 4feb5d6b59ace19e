"""One ablation end to end through run.py at a tiny setting: sweep, per-job metrics and records, report files."""

import json

import yaml

from tests.helpers.runs import TINY_RUN, run_py

TINY = [*TINY_RUN, "data.num_train_images=8", "data.num_val_images=4", "data.datamodule.batch_size=4"]


def test_a_narrowed_ablation_runs_the_named_variants_and_reports_what_was_compared(tmp_path):
    sweep = tmp_path / "sweep"
    # The experiment sets the sweep (no -m needed); a user narrows it with plain overrides of its swept keys,
    # exactly as they would type them: two variants, one seed.
    result = run_py(
        [
            "experiment=ablation_mask_loss",
            "ablation/mask_loss=softmax,sigmoid",
            "seed=0",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=600,
    )
    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    # The cost estimate: at the sweep's start from the setting's recorded step time, then in each job.
    log = result.stdout + result.stderr
    assert "cost estimate (sweep, 0.3 s/step, recorded in experiments/ablation_mask_loss" in log
    assert "sweep 2 jobs x 2 steps x 0.3 s" in log
    assert "cost estimate (job 1/2" in log and "cost estimate (job 2/2" in log
    built = {}
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP"} <= set(metrics)
        choice = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"][
            "ablation/mask_loss"
        ]
        record = json.loads((job / "job.json").read_text())
        built[choice] = record["model"]
        assert record["parameters"]["mask_head"] > 0 and record["step_time_median_s"] > 0 and record["wall_time_s"] > 0
    # Each job ran what its label says, on the same binary targets.
    assert built["softmax"]["mask_loss"] == "SoftmaxMaskLoss" and built["sigmoid"]["mask_loss"] == "SigmoidMaskLoss"
    assert built["softmax"]["mask_targets"] == built["sigmoid"]["mask_targets"] == "binary"

    table = (sweep / "report.md").read_text()
    assert "Table 2b" in table
    rows = [line for line in table.splitlines() if line.startswith("| ablation/mask_loss=")]
    # The results table, then the what-was-compared table: softmax first, as the experiment orders them.
    assert [r.split(" |")[0] for r in rows] == ["| ablation/mask_loss=softmax", "| ablation/mask_loss=sigmoid"] * 2
    assert " 24.8 | 44.1 |" in rows[0]
    assert "| backbone | ResNet-18-FPN | ResNet-50-C4 |" in table and "| mask targets | binary | binary |" in table
    assert "Not the paper's backbone design: these runs use FPN" in table
    assert "mask_loss=SoftmaxMaskLoss" in rows[2] and " M |" in rows[2] and " s |" in rows[2]
    assert "The variants' models differ only in: `mask_loss`." in table
    summary = json.loads((sweep / "report.json").read_text())
    assert [len(v["runs"]) for v in summary["variants"]] == [1, 1]
    assert summary["setting"]["ours"]["seeds"] == "0"
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
