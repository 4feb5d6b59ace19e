"""data=cityscapes through run.py: validation reports COCO-style and official Cityscapes AP, each labelled."""

import json

from tests.helpers.data import make_cityscapes_sized
from tests.helpers.runs import run_py


def test_cityscapes_run_reports_both_protocols(tmp_path):
    root = make_cityscapes_sized(tmp_path / "cityscapes", per_city=2)
    run_dir = tmp_path / "run"
    result = run_py(
        [
            "model=tiny",
            "data=cityscapes",
            f"data.root={root}",
            "data.min_size=96",
            "data.max_size=192",
            "data.datamodule.num_workers=0",
            "data.datamodule.persistent_workers=false",
            "data.datamodule.batch_size=2",
            "data.datamodule.val_batch_size=2",
            "trainer.max_epochs=1",
            "module.cityscapes_eval_workers=2",
            f"hydra.run.dir={run_dir}",
        ]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {
        "segm_AP",
        "bbox_AP",
        "cityscapes_AP",
        "cityscapes_AP50",
        "cityscapes_AP_car",
        "cityscapes_AP50_car",
    } <= set(metrics)
    assert all(-1.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("cityscapes_"))
    assert "COCO-style AP on the validation split (%, pycocotools)" in result.stdout
    assert "Cityscapes official instance AP on the validation split (%, cityscapesscripts" in result.stdout
    table = result.stdout.split("Cityscapes official instance AP")[1]
    assert all(name in table for name in ("person", "rider", "car", "bicycle", "average"))
    # Logged beside val/segm_AP (CSV logger).
    [csv_file] = run_dir.rglob("metrics.csv")
    assert {"val/segm_AP", "val/cityscapes_AP", "val/cityscapes_AP50"} <= set(
        csv_file.read_text().splitlines()[0].split(",")
    )
