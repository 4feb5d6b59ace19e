"""benchmarks/coco_scale.py runs end to end at a small size and reports sane numbers (no speed is checked)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coco_scale.py"
IMAGES = 300


def test_coco_scale_benchmark_small(tmp_path):
    out = tmp_path / "coco_scale.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--images",
        str(IMAGES),
        "--workdir",
        str(tmp_path / "data"),
        "--label",
        "test",
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worker growth / 1,000 images" in proc.stdout and "build" in proc.stdout

    r = json.loads(out.read_text())
    assert {
        "label",
        "git_commit",
        "command",
        "images",
        "annotations",
        "json_mib",
        "dataset_images",
        "workers",
        "batch_size",
        "build_s",
        "main_rss_before_build_mib",
        "main_rss_after_build_mib",
        "main_build_growth_mib",
        "main_peak_rss_mib",
        "items_served",
        "serve_s",
        "items_per_s",
        "workers_found",
        "worker_private_mib_start",
        "worker_private_mib_quarter",
        "worker_private_mib_end",
        "worker_growth_mib_per_1000_images",
        "worker_growth_mib_per_1000_images_mean",
        "timeline",
        "main_rss_end_mib",
    } <= set(r)
    assert r["label"] == "test" and r["images"] == IMAGES and r["workers"] == r["workers_found"] == 2
    # ~7.3 annotations per image; about 1% of the images have none and are left out of training.
    assert 5 * IMAGES < r["annotations"] < 10 * IMAGES
    assert 0.95 * IMAGES <= r["dataset_images"] < IMAGES
    assert r["items_served"] == r["dataset_images"] and r["items_per_s"] > 0 and r["serve_s"] > 0
    assert 0 < r["build_s"] < 60 and r["json_mib"] > 0
    assert 0 < r["main_rss_before_build_mib"] <= r["main_peak_rss_mib"]
    assert r["main_rss_after_build_mib"] <= r["main_peak_rss_mib"]
    for key in ("worker_private_mib_start", "worker_private_mib_quarter", "worker_private_mib_end"):
        assert len(r[key]) == 2 and all(0 < mib < r["main_peak_rss_mib"] for mib in r[key]), key
    assert len(r["worker_growth_mib_per_1000_images"]) == 2
    items = [point["items"] for point in r["timeline"]]
    assert items == sorted(items) and items[-1] == r["items_served"]

    # The json is reused from --workdir: a second run does not generate it again.
    again = subprocess.run(
        [*command, "--serve", "40"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generated" not in again.stdout
    assert json.loads(out.read_text())["items_served"] == 40
