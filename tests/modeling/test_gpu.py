"""The speed switches on a CUDA GPU: bf16 autocast, channels_last, torch.compile (inductor), SyncBatchNorm and
DDP on one GPU. Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.py`` runs them with
``pytest -m gpu tests/modeling/test_gpu.py``. tests/test_configs.py checks the same switches on the CPU."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate

from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from tests.helpers.comparisons import assert_same_backbone
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import shapes_batch
from tests.helpers.runs import TINY_RUN, run_py

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 convolutions and matmuls in full fp32 (not TF32, cuDNN's default): the comparisons below then
    differ by float rounding only, not by TF32's 10-bit mantissa."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process NCCL group on this GPU, as DDP on one GPU has."""
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    init_file = tmp_path_factory.mktemp("nccl") / "init"
    dist.init_process_group(
        "nccl", init_method=f"file://{init_file}", rank=0, world_size=1, device_id=torch.device(DEVICE, 0)
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


# run.py's overrides in test_ddp_with_syncbn_trains_on_one_gpu (tests/benchmarks/test_gpu_check.py checks them on the
# CPU: a value the config checks refuse would otherwise be found only on a GPU).
SYNCBN_RUN = [
    "trainer=ddp",
    "trainer.devices=1",
    "model.norm=syncbn",
    "model.head_norm=syncbn",
    *TINY_RUN,
    "data.num_train_images=8",
    "data.num_val_images=4",
    "data.datamodule.batch_size=2",
]


def build(overrides=()):
    """The tiny model's MaskRCNNModule with ``overrides``, on the GPU, from seed 0."""
    torch.manual_seed(0)
    return instantiate(compose_config([*TINY_MODEL, *overrides]).module).to(DEVICE)


def train_step(module, images, targets, bf16=False):
    """One forward and backward in training mode; the losses. The RPN and RoI samplers draw from torch's
    generator, seeded here so that two models sample alike."""
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        _, losses = module(images, targets)
    sum(losses.values()).backward()
    return {k: v.detach().float() for k, v in losses.items()}


def first_feature_map(module):
    """Records the backbone's first output map (P2) at every forward: its dtype and memory format."""
    maps = []
    module.model.backbone.register_forward_hook(lambda m, args, out: maps.append(next(iter(out.values()))))
    return maps


def assert_same_losses(losses, reference, rtol, atol):
    assert set(losses) == set(reference) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses[key], reference[key], rtol=rtol, atol=atol, msg=key)


def conv1_grad(module):
    return module.model.backbone.body.conv1.weight.grad


def test_bf16_autocast_trains_with_finite_losses_and_gradients():
    module = build()
    maps = first_feature_map(module)
    images, targets = shapes_batch(device=DEVICE)
    fp32 = train_step(module, images, targets)
    bf16 = train_step(module, images, targets, bf16=True)
    # Autocast took effect: the convolutions ran in bf16.
    assert [m.dtype for m in maps] == [torch.float32, torch.bfloat16]
    assert set(bf16) == set(fp32) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) for v in bf16.values()), bf16
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert conv1_grad(module) is not None and all(torch.isfinite(g).all() for g in grads)


def test_channels_last_gives_the_contiguous_losses():
    plain, fast = build(), build(["module.channels_last=true"])
    fast.load_state_dict(plain.state_dict())  # copies into the NHWC weights, keeping their layout
    assert fast.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    maps = first_feature_map(fast)
    images, targets = shapes_batch(device=DEVICE)
    reference, losses = train_step(plain, images, targets), train_step(fast, images, targets)
    # The convolutions ran in NHWC.
    assert maps[0].is_contiguous(memory_format=torch.channels_last) and not maps[0].is_contiguous()
    assert_same_losses(losses, reference, rtol=1e-3, atol=1e-4)
    # Gradients on the backbone alone: end to end, NHWC's other summation order can flip a near-tie among the
    # random model's proposals and move conv1's gradient while the losses agree (the first H200 check saw it).
    # Both get the NCHW batch, as in training: the NHWC weights alone make the convolutions NHWC, and an NHWC input
    # would have made the reference's NHWC too (tests/modeling/test_gpu_comparisons.py).
    assert_same_backbone(fast, plain, torch.stack(images))


def test_frozen_bn_keeps_the_residual_stream_bf16_under_cuda_autocast():
    # CUDA autocast's op lists differ from the CPU's (tests/modeling/test_frozen_bn.py): with the switch every ResNet
    # block's output is bf16, without it float32 (torchvision's FrozenBatchNorm2d promotes), and the losses are finite.
    from tests.modeling.test_frozen_bn import block_output_dtypes, frozen_bn_model

    images, targets = shapes_batch(device=DEVICE)
    for keeps_dtype, fold in ((False, False), (True, False), (False, True)):
        model = frozen_bn_model(keeps_dtype, fold=fold).to(DEVICE).train()
        dtypes, losses = block_output_dtypes(model, images, targets, device_type=DEVICE)
        assert dtypes == ({torch.bfloat16} if keeps_dtype or fold else {torch.float32}), (keeps_dtype, fold)
        assert all(torch.isfinite(losses[key]) for key in LOSS_KEYS)


def test_the_folded_frozen_bn_backbone_gives_the_unfolded_maps_on_the_gpu():
    # model.fold_frozen_bn: the convolution applies the norm (cuDNN with a bias) instead of the norm's own kernels.
    from tests.modeling.test_frozen_bn import frozen_bn_model

    images, _ = shapes_batch(device=DEVICE)
    plain = SimpleNamespace(model=frozen_bn_model(False).to(DEVICE).train())
    folded = SimpleNamespace(model=frozen_bn_model(False, fold=True).to(DEVICE).train())
    assert_same_backbone(folded, plain, torch.stack(images))  # the maps and conv1's gradient


def test_compile_gives_the_eager_losses():
    eager, compiled = build(), build(["module.compile=true"])
    compiled.load_state_dict(eager.state_dict())  # the same keys: compiling in place keeps them
    parts = [compiled.model.backbone, compiled.model.roi_heads.box_head, compiled.model.roi_heads.mask_head]
    assert all(part._compiled_call_impl is not None for part in parts)
    # One batch: compiling a second one for the heads' other RoI count took half of this test's 49 s on the H200.
    images, targets = shapes_batch(seed=1, device=DEVICE)
    reference, losses = train_step(eager, images, targets), train_step(compiled, images, targets)
    assert_same_losses(losses, reference, rtol=1e-3, atol=1e-4)
    # Gradients on the compiled backbone alone, as for channels_last: inductor reorders fp32 sums, and end to end
    # that can flip a near-tie among the random model's proposals (conv1's gradient moved on the H200 while the
    # losses agreed).
    assert_same_backbone(compiled, eager, torch.stack(images))


def test_syncbn_model_trains_like_batchnorm_in_a_process_group(process_group):
    plain = build(["model.norm=bn", "model.head_norm=bn"])
    synced = build(["model.norm=syncbn", "model.head_norm=syncbn"])
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    synced.load_state_dict(plain.state_dict())
    images, targets = shapes_batch(device=DEVICE)
    reference, losses = train_step(plain, images, targets), train_step(synced, images, targets)
    # One process: SyncBatchNorm normalises with this batch's statistics, as BatchNorm does.
    assert_same_losses(losses, reference, rtol=1e-4, atol=1e-5)


def test_syncbn_kernels_match_batchnorm(process_group):
    """SyncBatchNorm's own path (statistics gathered over the group by NCCL, CUDA kernels) against
    F.batch_norm. With one process the module falls back to F.batch_norm, so its autograd function is
    called directly, as the module calls it with more than one process."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16, device=DEVICE) * 3 + 1
    weight, bias = torch.rand(8, device=DEVICE) + 0.5, torch.randn(8, device=DEVICE)
    grad_out = torch.randn_like(x)
    results = []
    for sync in (True, False):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        mean, var = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
        if sync:
            out = SyncBatchNormFunction.apply(*inputs, mean, var, 1e-5, 0.1, process_group, 1)
        else:
            out = F.batch_norm(inputs[0], mean, var, inputs[1], inputs[2], training=True, momentum=0.1, eps=1e-5)
        out.backward(grad_out)
        results.append([out, mean, var, *(t.grad for t in inputs)])
    for synced, reference, name in zip(*results, ("output", "running mean", "running var", "dx", "dweight", "dbias")):
        torch.testing.assert_close(synced, reference, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_with_syncbn_trains_on_one_gpu(tmp_path):
    # Lightning's ddp strategy on one GPU: an NCCL process group, the DDP wrapper, bf16 (trainer=ddp's
    # precision), SyncBatchNorm in the backbone and the mask head.
    run_py(
        [*SYNCBN_RUN, f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 8 images, 2 per batch, one process: 4 optimizer steps.
    assert metrics["world_size"] == 1 and metrics["global_step"] == 4
    assert 0 <= metrics["segm_AP"] <= 1 and 0 <= metrics["bbox_AP"] <= 1


def test_grouped_nms_kernel_keeps_torchvisions_boxes_without_a_host_sync():
    # The batched RPN's NMS: the Triton kernel compiled for this GPU, against torchvision's nms on each group alone.
    from mrcnn.modeling.nms import _segments, grouped_nms_torchvision, grouped_nms_triton
    from tests.modeling.test_nms import SEGMENTS, grouped_boxes

    pytest.importorskip("triton")
    boxes, valid = grouped_boxes(8, SEGMENTS)
    boxes, valid = boxes.to(DEVICE), valid.to(DEVICE)
    for threshold in (0.5, 0.6, 0.7):  # with pairs at IoU 0.5 and float32(0.6) exactly
        # torchvision's nms per group, on the CPU: its CUDA kernel may round an IoU differently.
        expected = grouped_nms_torchvision(boxes.cpu(), valid.cpu(), SEGMENTS, threshold)
        grouped_nms_triton(boxes, valid, SEGMENTS, threshold)  # compiles the kernel, once
        torch.cuda.synchronize()
        _segments.cache_clear()  # a layout not seen before (a new padded image size) copies its segments too
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = grouped_nms_triton(boxes, valid, SEGMENTS, threshold)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got.cpu(), expected), threshold


# Without CUDA the module's mark skips it ("no CUDA", as gpu_check reads the step).
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_grouped_nms_kernel_runs_on_the_boxes_gpu_not_the_current_one():
    # Triton launches on the current device: boxes on cuda:1 while cuda:0 is current (a model moved to cuda:1
    # without torch.cuda.set_device) must still be suppressed on their own GPU.
    from mrcnn.modeling.nms import grouped_nms_torchvision, grouped_nms_triton
    from tests.modeling.test_nms import SEGMENTS, grouped_boxes

    pytest.importorskip("triton")
    boxes, valid = grouped_boxes(8, SEGMENTS)
    expected = grouped_nms_torchvision(boxes, valid, SEGMENTS, 0.5)
    with torch.cuda.device(0):
        got = grouped_nms_triton(boxes.to("cuda:1"), valid.to("cuda:1"), SEGMENTS, 0.5)
        assert got.device == torch.device("cuda:1")
        assert torch.equal(got.cpu(), expected)


def test_a_batched_training_step_waits_on_the_host_once_per_pooler():
    # Both batched switches: the CPU count (tests/modeling/test_host_syncs.py) is 2, the box and mask poolers' reads
    # of their level sizes. On the GPU, torch's sync debug mode sees every wait, also those the CPU counter cannot
    # (a blocking copy of a host tensor to the device). The targets were checked on the host, as run.py does.
    module = build(["model.batched_sampling=true", "model.batched_proposals=true"]).train()
    images, targets = shapes_batch(4, device=DEVICE)

    def step():
        module.zero_grad(set_to_none=True)
        _, losses = module.model(images, targets, targets_checked=True)
        sum(losses.values()).backward()

    step()  # compiles the NMS kernel and copies its segments to the GPU, once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 2, waits


def test_the_evaluator_waits_once_for_a_batch_of_device_predictions_and_scores_them_as_host_ones():
    from mrcnn.evaluation import CocoEvaluator
    from tests.test_evaluation import make_data

    samples = make_data(seed=5)
    predictions, targets = [p for _, p in samples], [t for t, _ in samples]
    on_host, on_device = CocoEvaluator(), CocoEvaluator()
    on_host.update(predictions, targets)
    device_predictions = [{k: v.to(DEVICE) for k, v in p.items()} for p in predictions]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            on_device.update(device_predictions, targets)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) == 1, waits  # one copy of the whole batch
    assert on_device.compute() == on_host.compute()
