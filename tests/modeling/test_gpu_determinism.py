"""``trainer.deterministic=true`` on a CUDA GPU: the same steps twice give bit-identical losses and gradients.

The GPU tests are marked ``gpu`` and skipped without CUDA (``pytest -m gpu tests/modeling/test_gpu_determinism.py``).
Each runs in a fresh process: ``CUBLAS_WORKSPACE_CONFIG`` only takes effect when it is set before cuBLAS starts,
and the deterministic flag is global. The RoIPool backward this mode routes to is also checked on the CPU.
"""

import csv
import json
import subprocess
import sys

import pytest
import torch
from torchvision.ops import roi_pool

from mrcnn.modeling.poolers import RoIPoolPooler, _DeterministicRoIPool
from tests.helpers.config import ROOT, TINY_MODEL
from tests.helpers.runs import TINY_RUN, run_py


def needs_cuda(test):
    """Marks ``test`` ``gpu`` and skips it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")(test))


# Two training steps of the tiny model on two shapes batches from the same initial weights, twice, under
# deterministic algorithms; per pooler: whether both repetitions were bit-identical, and the step time with and
# without deterministic algorithms (what the deterministic path costs).
SCRIPT = r"""
import json, os, sys, time
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # before cuBLAS starts, as Lightning's deterministic=True sets it
sys.path.insert(0, {root!r})
import torch
from hydra.utils import instantiate
from mrcnn.data.shapes import ShapesDataset
from tests.helpers.config import compose_config
import torchvision.ops.roi_align as torchvision_roi_align

# torchvision.ops.roi_align swaps its kernel for a compiled Python version on a GPU under deterministic algorithms
# (slow, and a compile per shape): count its calls, which mrcnn.modeling.roi_align.roi_align_kernel avoids.
python_roi_align = torchvision_roi_align._roi_align
python_roi_align_calls = []
def counted_python_roi_align(*args, **kwargs):
    python_roi_align_calls.append(1)
    return python_roi_align(*args, **kwargs)
torchvision_roi_align._roi_align = counted_python_roi_align

torch.backends.cudnn.benchmark = False
dataset = ShapesDataset(num_images=4, image_size=64, seed=1)
samples = [dataset[i] for i in range(4)]
batches = [
    ([image.cuda() for image, _ in pair],
     [{{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in target.items()}} for _, target in pair])
    for pair in (samples[:2], samples[2:])
]

def two_steps(overrides, deterministic):
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(0)
    module = instantiate(compose_config([*{tiny!r}, *overrides]).module).cuda().train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    losses, times = [], []
    for images, targets in batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        _, loss_dict = module(images, targets)
        sum(loss_dict.values()).backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        optimizer.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append({{k: v.item() for k, v in loss_dict.items()}})
    return losses, grads, times

results = {{}}
for name, overrides in {poolers!r}.items():
    first, grads1, _ = two_steps(overrides, True)
    second, grads2, times = two_steps(overrides, True)
    _, _, free_times = two_steps(overrides, False)
    results[name] = {{
        "losses": first,
        "same_losses": first == second,
        "same_gradients": len(grads1) == len(grads2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2)),
        "deterministic_step_s": times[-1],
        "default_step_s": free_times[-1],
        "python_roi_align_calls": len(python_roi_align_calls),
    }}
    python_roi_align_calls.clear()
print("RESULT " + json.dumps(results))
"""

POOLERS = {
    "roi_align": [],  # RoIAlign (sampling ratio 2): our separable backward instead of torchvision's atomic adds
    "roi_align_max": ["model/pooler=roi_align_max"],
    "roi_pool": ["model/pooler=roi_pool"],  # RoIPool: index_add_ from the forward's argmax
    "roi_warp": ["model/pooler=roi_warp"],
}


@needs_cuda
def test_two_identical_training_steps_on_cuda_give_identical_losses_and_gradients(tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tiny=TINY_MODEL, poolers=POOLERS))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    results = json.loads(line[len("RESULT ") :])
    # The measured cost, in the test log (pytest -s, or the junit xml's system-out).
    print(json.dumps(results, indent=1))
    for name, run in results.items():
        assert run["same_losses"], (name, run["losses"])
        assert run["same_gradients"], name
        assert run["python_roi_align_calls"] == 0, name


# run.py's overrides in the test below (tests/benchmarks/test_gpu_check.py checks them on the CPU).
DETERMINISTIC_RUN = [
    *TINY_RUN,
    "trainer=gpu",
    "trainer.deterministic=true",
    "data.num_train_images=8",
    "data.num_val_images=2",
    "data.datamodule.batch_size=2",
]


@needs_cuda
def test_a_deterministic_gpu_run_of_run_py_repeats_its_losses_and_ap(tmp_path):
    # End to end (trainer=gpu: bf16-mixed; validation, sanity check, callbacks and the CSV logger on), twice.
    runs = []
    for name in ("first", "second"):
        run_py([*DETERMINISTIC_RUN, f"hydra.run.dir={tmp_path / name}"])
        with open(tmp_path / name / "csv" / "metrics.csv", newline="") as file:
            losses = [
                {k: v for k, v in row.items() if k.startswith(("train/", "val/")) and "per_sec" not in k}
                for row in csv.DictReader(file)
            ]
        runs.append((losses, (tmp_path / name / "metrics.json").read_text()))
    assert runs[0] == runs[1]
    assert any(row.get("train/loss") for row in runs[0][0])


def test_the_deterministic_roi_pool_backward_equals_torchvisions():
    # The CPU check of the GPU path's arithmetic: an index_add_ from the forward's argmax (empty bins add nothing).
    torch.manual_seed(0)
    features = torch.randn(2, 3, 20, 24, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.0, 2, 15, 18], [1, 3, 3, 9, 9], [0, 0, 0, 23, 19], [1, 5, 5, 5.4, 5.2], [0, 30, 30, 40, 40]],
        dtype=torch.float64,
    )
    grad_output = torch.randn(len(rois), 3, 7, 7, dtype=torch.float64)
    expected = roi_pool(features, rois, 7, 0.5)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_output)
    output = _DeterministicRoIPool.apply(features, rois, 7, 0.5)
    (grad,) = torch.autograd.grad(output, features, grad_output)
    assert torch.equal(output, expected)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@needs_cuda
def test_the_deterministic_roi_pool_under_bf16_autocast_pools_and_backpropagates_as_in_float32():
    # torchvision's CUDA autocast wrapper of roi_pool returns the argmax as a float tensor, which the deterministic
    # backward cannot index with; the pooler pools outside autocast (in float32, as that wrapper does).
    pooler = RoIPoolPooler(["0"], 7)
    features = torch.randn(2, 8, 32, 32, device="cuda").to(torch.bfloat16)
    boxes = [
        torch.tensor([[2.0, 3.0, 40.0, 50.0]], device="cuda"),
        torch.tensor([[0.0, 0.0, 63.0, 63.0]], device="cuda"),
    ]
    reference = features.float().requires_grad_()
    expected = pooler({"0": reference}, boxes, [(64, 64)] * 2)
    expected.sum().backward()
    leaf = features.clone().requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = pooler({"0": leaf}, boxes, [(64, 64)] * 2)
        out.float().sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), expected)
    torch.testing.assert_close(leaf.grad.float(), reference.grad)
