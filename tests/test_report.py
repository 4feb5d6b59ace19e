"""Ablation reports: grouping a sweep's jobs into variants, mean and spread over seeds, table, chart."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mrcnn.report import collect, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]


def fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def metrics(ap):
    return {"segm_AP": ap, "segm_AP50": ap + 0.2, "segm_AP75": ap - 0.1, "bbox_AP": ap + 0.05}


@pytest.fixture
def sweep(tmp_path):
    fake_job(tmp_path, "0", ["model/pooler=roi_pool", "seed=0"], metrics(0.20))
    fake_job(tmp_path, "1", ["model/pooler=roi_pool", "seed=1"], metrics(0.30))
    fake_job(tmp_path, "2", ["model/pooler=roi_align", "seed=0"], metrics(0.40))
    fake_job(tmp_path, "3", ["model/pooler=roi_align", "seed=1"], metrics(0.40))
    fake_job(tmp_path, "4", ["model/pooler=roi_align", "seed=2"], None)  # failed job: skipped
    return tmp_path


def test_collect_groups_by_variant_and_averages_over_seeds(sweep):
    variants = collect(sweep, ["model/pooler"], order=["model/pooler=roi_pool", "model/pooler=roi_align"])
    assert [v.name for v in variants] == ["model/pooler=roi_pool", "model/pooler=roi_align"]
    pool, align = variants
    assert pool.seeds == ["0", "1"] and len(align.runs) == 2
    assert pool.mean("segm_AP") == pytest.approx(0.25)
    assert pool.std("segm_AP") == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.2, 0.3
    assert align.std("segm_AP") == 0.0


def test_markdown_table_has_the_papers_columns_and_numbers(sweep):
    variants = collect(sweep, ["model/pooler"], order=["model/pooler=roi_pool", "model/pooler=roi_align"])
    table = markdown_table(variants, "Table 2c", paper={"model/pooler=roi_align": [30.3, 51.2, 31.5, float("nan")]})
    lines = table.splitlines()
    assert lines[0] == "**Table 2c**"
    assert "| variant | AP | AP50 | AP75 | AP^bb | seeds | paper AP |" in table
    pool_row = next(line for line in lines if line.startswith("| model/pooler=roi_pool"))
    assert "25.0 ± 7.1" in pool_row and "45.0 ± 7.1" in pool_row and "| 2 |" in pool_row
    align_row = next(line for line in lines if line.startswith("| model/pooler=roi_align"))
    assert "40.0 ± 0.0" in align_row and "30.3 | 51.2 | 31.5 | - |" in align_row


def test_write_report_and_the_rebuild_command(sweep):
    paths = write_report(sweep, ["model/pooler"], "RoI pooling")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(paths["json"].read_text())
    assert {v["variant"] for v in summary["variants"]} == {"model/pooler=roi_pool", "model/pooler=roi_align"}
    paths["md"].unlink()
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.report", str(sweep), "--keys", "model/pooler", "--title", "again"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "**again**" in paths["md"].read_text() and "roi_align" in result.stdout


def test_the_rebuild_command_reads_the_report_settings_from_the_sweep(sweep):
    # What the report callback of a sweep records in multirun.yaml (as experiment=ablation_* writes it).
    (sweep / "multirun.yaml").write_text(
        "hydra:\n"
        "  callbacks:\n"
        "    ablation_report:\n"
        "      _target_: mrcnn.report.AblationReportCallback\n"
        "      variant_keys: [model/pooler]\n"
        "      title: From the sweep\n"
        "      order: [model/pooler=roi_pool, model/pooler=roi_align]\n"
        "      paper:\n"
        "        model/pooler=roi_align: [30.3, 51.2, 31.5, .nan]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = (sweep / "report.md").read_text().splitlines()
    assert lines[0] == "**From the sweep**"
    rows = [line for line in lines if line.startswith("| model/pooler=")]
    assert rows[0].startswith("| model/pooler=roi_pool") and rows[1].startswith("| model/pooler=roi_align")
    assert "30.3 | 51.2 | 31.5 | - |" in rows[1]


def test_the_rebuild_command_needs_keys_without_a_recorded_callback(sweep):
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "--keys is needed" in result.stderr


def test_an_empty_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        write_report(tmp_path, ["model/pooler"])
