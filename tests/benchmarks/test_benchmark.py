"""The benchmark scripts run end to end at tiny sizes and write their documented json (no timing is checked)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from mrcnn import lit_module
from mrcnn.data.datamodule import collate_detection
from mrcnn.data.shapes import ShapesDataset
from mrcnn.engine import loggers as engine_loggers
from mrcnn.engine.loggers import writes_train_metrics
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.runs import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "benchmark.py"

# Few proposals and detections: the R50 heads, not the 64-pixel images, dominate the cost on a CPU.
SMALL_HEADS = [
    "model=torchvision_r50_fpn",
    "model.rpn_pre_nms_top_n_train=200",
    "model.rpn_post_nms_top_n_train=100",
    "model.rois_per_image=64",
    "model.rpn_pre_nms_top_n_test=100",
    "model.rpn_post_nms_top_n_test=50",
    "model.detections_per_img=10",
]


def test_benchmark_script_writes_all_numbers(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--image-size",
        "64",
        "--image-width",
        "80",
        "--batch-size",
        "1",
        "--infer-batch-size",
        "1",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--eval-images",
        "20",
        "--eval-dets",
        "20",
        "--threads",
        "2",
        "--out",
        str(out),
        "--variant",
        "batched=model.batched_sampling=true model.batched_proposals=true",
        "--overrides",
        *SMALL_HEADS,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train throughput (batch 1)" in proc.stdout and "faster_coco_eval" in proc.stdout

    results = json.loads(out.read_text())
    assert {"args", "hardware", "memory_method", "trainable_params", "train", "infer", "eval"} <= set(results)
    assert results["nms_triton_failure"] is None  # the batched variant's NMS on a CPU: torchvision's, by design
    assert {"cpu", "cpu_count", "torch", "device"} <= set(results["hardware"])
    # 64x80 images: the model's min_size is the shorter side and max_size the longer, so it keeps their size.
    assert {"data.image_size=[64, 80]", "data.min_size=64", "data.max_size=80"} <= set(results["config_overrides"])
    # Same architecture and trainable stages on both sides.
    assert results["trainable_params"]["ours"] == results["trainable_params"]["torchvision"]
    for system in ("ours", "torchvision"):
        train = results["train"][system]
        assert train["images_per_s"] > 0 and len(train["step_times_s"]) == 1 and train["peak_mem_mib"] >= 0
    assert results["train"]["ratio"] > 0
    # Each round starts both from one random state on the same batches and weights: the same losses (issue #22).
    assert results["train"]["ours"]["same_losses"]["first_step_rel_diff"] < 1e-5
    assert len(results["train"]["ours"]["step_losses"]) == len(results["train"]["torchvision"]["step_losses"]) == 1
    assert "loss vs torchvision, first steps" in proc.stdout
    # A variant trains in the same rounds, with the same trainable weights, and says what it changed.
    variant = results["train"]["variants"]["batched"]
    assert variant["overrides"] == ["model.batched_sampling=true", "model.batched_proposals=true"]
    assert variant["images_per_s"] > 0 and len(variant["step_times_s"]) == 1 and variant["ratio"] > 0
    assert variant["vs_ours"] > 0 and variant["lr"] == results["train"]["ours"]["lr"]
    assert results["trainable_params"]["batched"] == results["trainable_params"]["ours"]
    assert "variant batched" in proc.stdout
    for entry in results["infer"].values():
        variant = entry["variants"]["batched"]
        assert variant["latency_ms"] > 0 and variant["ratio"] > 0 and variant["vs_ours"] > 0
        assert variant["detections_per_image"] >= 0
    assert abs(results["train"]["ours"]["lr"] - results["train"]["torchvision"]["lr"]) < 1e-12
    assert set(results["infer"]) == {"model_batch1", "e2e_batch1"}
    for entry in results["infer"].values():
        assert {"latency_ms", "images_per_s", "peak_mem_mib", "detections_per_image"} <= set(entry["ours"])
        # Same weights, same image: the same detections.
        assert entry["ours"]["detections_per_image"] == entry["torchvision"]["detections_per_image"]
        assert entry["ratio"] > 0
    evaluation = results["eval"]
    assert evaluation["num_images"] == 20
    for backend in ("pycocotools", "faster_coco_eval"):
        assert {"update_s", "compute_s", "metrics"} <= set(evaluation[backend])
    # Both backends compute the same AP on the same predictions.
    ap = [evaluation[backend]["metrics"]["segm_AP"] for backend in ("pycocotools", "faster_coco_eval")]
    assert abs(ap[0] - ap[1]) < 1e-6


def test_roi_align_backward_benchmark_runs(tmp_path):
    script = SCRIPT.parent / "roi_align_backward.py"
    out = tmp_path / "roi_align.json"
    command = [sys.executable, str(script), "--repeats", "1", "--cases", "C5 box,FPN P2 256px box", "--out", str(out)]
    proc = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert sorted(cases) == ["C5 box (stride 32, 512 ch, 7x7)", "FPN P2 256px box (stride 4, 64 ch, 7x7)"]
    for numbers in cases.values():
        assert min(numbers[f"{key}_ms"] for key in ("torchvision", "sparse", "separable")) > 0
    # The model's choice by map size: C5's 4x4 map takes the separable backward, FPN's 64x64 P2 the sparse one.
    assert cases["C5 box (stride 32, 512 ch, 7x7)"]["chosen"] == "separable"
    assert cases["FPN P2 256px box (stride 4, 64 ch, 7x7)"]["chosen"] == "sparse"


def test_mask_target_memory_benchmark_compares_whole_and_chunked_targets(tmp_path, monkeypatch):
    script = load_script(SCRIPT.parent / "mask_target_memory.py")
    shape = ["--images", "2", "--instances", "5", "--height", "60", "--width", "80", "--rois", "16"]
    one = script.main([*shape, "--chunk-bytes", "1"])  # what each new process runs and prints
    assert one["chunk_bytes"] == 1 and one["peak_rss_gib"] > 0 and one["seconds"] > 0
    # The report, with each setting measured here instead of in a new process.
    monkeypatch.setattr(script, "in_new_process", lambda shape, chunk_bytes: script.measure(*shape, chunk_bytes))
    out = tmp_path / "memory.json"
    report = script.main([*shape, "--bound", str(2 * 60 * 80 * 4), "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["chunked"]["chunk_bytes"] == 2 * 60 * 80 * 4 and report["whole"]["chunk_bytes"] > 2**40
    assert report["same_targets"] and report["whole"]["sha256"] == one["sha256"]
    assert report["chunked"]["sha256"] != script.measure(2, 5, 60, 81, 16, 1)["sha256"]  # the hash sees a change


@pytest.mark.slow  # about 13 s; the default suite runs the other benchmark scripts
def test_step_time_benchmark_times_every_backward(tmp_path):
    script = SCRIPT.parent / "step_time.py"
    out = tmp_path / "steps.json"
    config = (
        "experiment=ablation_roialign hydra.mode=RUN model/backbone=c4 model/pooler=roi_align data.image_size=64 "
        "data.num_train_images=4 "
        "data.datamodule.batch_size=2 model.rois_per_image=16"
    )
    command = [
        sys.executable,
        str(script),
        "--config",
        config,
        "--backward",
        "auto,sparse,separable,torchvision",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [*command, "--count-ops"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["steps"] == 1
    steps = results["configs"][config]
    assert sorted(steps) == ["auto", "separable", "sparse", "torchvision"]
    for numbers in steps.values():
        assert len(numbers["median_step_s_per_round"]) == 1 and numbers["median_step_s_per_round"][0] > 0
        ops = numbers["ops_per_step"]
        assert ops["ops"] > ops["kernels"] > ops["cpu_only_kernels"] >= 0
        assert ops["casts"] >= 0 and ops["bytes_written"]["float32"] > 0
    # Our CPU RoIAlign backwards are CPU-only loops; torchvision's is one kernel, as on a GPU.
    assert (
        steps["sparse"]["ops_per_step"]["cpu_only_kernels"]
        > 0
        == steps["torchvision"]["ops_per_step"]["cpu_only_kernels"]
    )
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([*command[:4], "--backward", "fast"], cwd=tmp_path, capture_output=True, check=True)

    # A RoIPool model (the experiment's other variant) has no RoIAlign backward: timed as configured, and a backward
    # asked of it is refused by name (it failed inside Hydra's instantiate, with the default --backward auto too).
    roi_pool = config.replace("model/pooler=roi_align", "model/pooler=roi_pool")
    proc = subprocess.run(
        [*command[:3], roi_pool, *command[6:]], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(json.loads(out.read_text())["configs"][roi_pool]) == ["auto"]
    proc = subprocess.run(
        [*command[:3], roi_pool, "--backward", "sparse"], check=False, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "builds RoIPoolPooler, which has no RoIAlign backward to choose" in proc.stderr


def test_the_benchmarks_steps_read_no_device_targets_between_them(monkeypatch):
    # The benchmark's batches are on the device before Lightning sees them. MaskRCNNModule's batch hook reads the
    # targets (crowd regions, degenerate boxes): on the host in run.py, but on device tensors here, two host waits per
    # image that Lightning runs before on_train_batch_start, inside the profiled window. The benchmark checks them on
    # the host before the copy, and its datamodule keeps the module's hook out.
    bench = load_script(SCRIPT)
    reads = []
    monkeypatch.setattr(lit_module, "check_targets", lambda targets: reads.append(len(targets)))
    cfg = compose_config(TINY_MODEL)
    dataset = ShapesDataset(num_images=2, image_size=64, classes=cfg.data.classes, seed=0)
    samples = bench.host_checked([dataset[i] for i in range(2)])
    loader = DataLoader(samples, batch_size=1, collate_fn=collate_detection)
    args = argparse.Namespace(precision="32", cudnn_benchmark=False)

    def fit(**data):
        torch.manual_seed(0)
        module = instantiate(cfg.module, scheduler=None)
        timer = bench.StepTimer(torch.device("cpu"))
        bench.training_only_trainer(args, torch.device("cpu"), 2, timer).fit(module, **data)
        return len(timer.times)

    assert fit(datamodule=bench.FixedBatches(loader)) == 2 and reads == []

    # The same batches through a datamodule without that hook: the module's reads them before every step.
    class WithModuleHook(bench.FixedBatches):
        on_before_batch_transfer = L.LightningDataModule.on_before_batch_transfer

    assert fit(datamodule=WithModuleHook(loader)) == 2 and reads == [1, 1]


def test_loop_overhead_benchmark_times_the_loop_with_and_without_every_step_logging(tmp_path):
    loop_overhead = load_script(SCRIPT.parent / "loop_overhead.py")
    out = tmp_path / "loop.json"
    config = " ".join([*TINY_MODEL, "data.num_train_images=4", "data.datamodule.batch_size=2"])
    argv = ["--config", config, "--steps", "4", "--warmup", "1", "--rounds", "2", "--log-every-step", "--out", str(out)]
    results = loop_overhead.main(argv)
    assert json.loads(out.read_text()) == results
    assert results["batch_size"] == 2 and results["steps"] == 4
    medians = results["median_step_ms_per_round"]
    assert sorted(medians) == ["log_every_step", "now"]
    assert all(len(values) == 2 and all(v > 0 for v in values) for values in medians.values())
    # The old loop was patched in for its rounds only.
    assert engine_loggers.writes_train_metrics is writes_train_metrics
    with pytest.raises(SystemExit):
        loop_overhead.main(["--steps", "1"])


def test_the_op_counter_sums_the_bytes_each_dtype_is_written_and_counts_the_casts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # step_time imports benchmark.py beside it
    step_time = load_script(SCRIPT.parent / "step_time.py")
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 16, 16)
    with step_time.OpCounter() as counter:
        y = conv(x).relu()  # float32: a convolution and a ReLU, no cast
    assert counter.casts == 0 and counter.bytes_written == {"float32": 2 * y.numel() * 4}
    with step_time.OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    # autocast casts the input and the weight to bf16, then the convolution writes bf16.
    assert counter.casts == 2
    assert counter.bytes_written == {"bfloat16": (x.numel() + conv.weight.numel() + y.numel()) * 2}


def test_cudnn_autotuning_and_channels_last_are_for_ours_only_against_torchvision_eager(monkeypatch, tmp_path):
    """--cudnn-benchmark tunes our model, whose RoI buckets make its shapes repeat; torchvision trains without it. With
    --torchvision-eager (bench_fast) torchvision also keeps the default memory format: the fast path's reference."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    from mrcnn.modeling.mask_rcnn import MaskRCNN

    bench = load_script(SCRIPT)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    seen = {"ours": set(), "torchvision": set()}
    for name, cls in (("ours", MaskRCNN), ("torchvision", GeneralizedRCNN)):

        def forward(self, *args, _forward=cls.forward, _name=name, **kwargs):
            if self.training:
                weight = next(m.weight for m in self.modules() if isinstance(m, torch.nn.Conv2d))
                layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else None
                seen[_name].add((torch.backends.cudnn.benchmark, layout))
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)
    argv = ["--image-size", "64", "--batch-size", "1", "--steps", "1", "--repeats", "1", "--warmup", "0"]
    argv += ["--skip", "infer,eval", "--cudnn-benchmark", "--out", str(tmp_path / "b.json")]
    bench.main([*argv, "--overrides", *SMALL_HEADS])
    assert seen == {"ours": {(True, None)}, "torchvision": {(False, None)}}
    assert torch.backends.cudnn.benchmark is True  # the process's setting, back after torchvision's loops

    seen = {"ours": set(), "torchvision": set()}
    # The GPU check's bench_fast, at a tiny size: bf16 autocast too (the CPU runs it as well).
    results = bench.main(
        [*argv, "--channels-last", "--torchvision-eager", "--precision", "bf16-mixed", "--overrides", *SMALL_HEADS]
    )
    assert seen == {"ours": {(True, torch.channels_last)}, "torchvision": {(False, None)}}
    # The same losses up to bf16's rounding (its relative step is 2^-8).
    assert results["train"]["ours"]["same_losses"]["first_step_rel_diff"] < 2**-6


def test_the_summaries_ratios_spread_and_loss_differences_are_what_the_times_and_losses_say():
    bench = load_script(SCRIPT)
    # Three rounds of 8 images: 2 s, 4 s and 1 s.
    summary = bench.summarize([2.0, 4.0, 1.0], images=8)
    assert summary["median_s"] == 2.0 and summary["images_per_s"] == 4.0 and summary["latency_ms"] == 2000.0
    assert summary["images_per_s_range"] == [2.0, 8.0]  # the slowest round's throughput, then the fastest's
    entry = {"ours": {"images_per_s": 6.0}, "torchvision": {"images_per_s": 4.0}, "fast": {"images_per_s": 12.0}}
    entry = bench.with_ratios(entry, ["fast"])
    assert entry["ratio"] == 1.5  # ours over torchvision: above 1 is faster
    assert entry["variants"]["fast"]["ratio"] == 3.0 and entry["variants"]["fast"]["vs_ours"] == 2.0
    # Two rounds of two steps: the first steps differ by 1e-6 and 2e-2 relative, a later step by 10%.
    same = bench.same_losses([[1.000001, 2.2], [2.04, 1.0]], [[1.0, 2.0], [2.0, 1.0]])
    assert same["first_step_rel_diff"] == pytest.approx(0.02) and same["all_steps_rel_diff"] == pytest.approx(0.1)
