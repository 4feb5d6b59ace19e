"""`python run.py` end to end: trains, logs the five losses, validates, prints AP, checkpoints, evaluates."""

import csv

from tests.helpers.runs import run_py


def test_run_py_debug_fast_trains_evaluates_and_resumes_evaluation(tmp_path):
    """``python run.py debug=fast`` (the README's first command): the whole loop, four steps, one validation batch."""
    result = run_py(["debug=fast", f"hydra.run.dir={tmp_path}"])
    assert "COCO-style AP on the validation split" in result.stdout
    assert any(line.startswith("mask ") for line in result.stdout.splitlines())

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    columns = set(rows[0])
    for loss in ("rpn_class_loss", "rpn_bbox_loss", "fastrcnn_class_loss", "fastrcnn_bbox_loss", "maskrcnn_mask_loss"):
        assert f"train/{loss}" in columns and f"val/{loss}" in columns
    for key in ("segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl", "bbox_AP", "bbox_AP50"):
        assert f"val/{key}" in columns
    assert "train/loss" in columns and "val/loss" in columns
    assert any(row["train/maskrcnn_mask_loss"] for row in rows)
    assert max(int(row["step"]) for row in rows if row["train/loss"]) == 3  # four training steps: 0..3
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "hparams.yaml").exists() or (tmp_path / "csv" / "hparams.yaml").exists()

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    result = run_py(["debug=fast", "mode=evaluate", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert "COCO-style AP on the validation split" in result.stdout


def test_a_typo_fails_loudly_and_leaves_no_output_folder(tmp_path):
    # model.pooler=... (meaning model/pooler=...) makes Hydra suggest +model.pooler=..., which nothing reads.
    result = run_py(["+model.pooler=roi_pool"], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode != 0
    assert "nothing reads model.pooler" in result.stderr and "model/pooler=roi_pool" in result.stderr
    # Failed before writing anything: no outputs/<date>/<time>/ left behind.
    assert not (tmp_path / "outputs").exists()
    # A run that wrote something keeps its folder, also when it fails afterwards.
    kept = tmp_path / "kept"
    (kept / "csv").mkdir(parents=True)
    result = run_py(["+model.pooler=roi_pool", f"hydra.run.dir={kept}"], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode != 0 and (kept / "csv").is_dir() and (kept / ".hydra").is_dir()
