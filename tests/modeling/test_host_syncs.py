"""Host synchronisations of a training step, counted on the CPU (issue 22), and the counter itself.

A GPU step that reads a device value on the host (``item``, ``nonzero``, a boolean mask, a variable-length NMS
output, a blocking copy) waits there until the GPU has caught up, and the host stops queueing work.
``tests/helpers/host_syncs.py`` counts those calls on the CPU; the test below fails when a change adds one.
"""

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate

from mrcnn.engine.build import build
from tests.helpers.config import compose_config
from tests.helpers.host_syncs import SyncCounter, count_host_syncs, counting_host_syncs

# ---- the counter ---------------------------------------------------------------------------------------------
x = torch.arange(10.0)
mask = x > 4.5
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
scores = torch.tensor([0.9, 0.8, 0.7])


def _set_masked(value):
    y = x.clone()
    y[mask] = value
    return y


def _backward_of_mask_indexing():
    y = x.clone().requires_grad_()
    y[mask].sum().backward()


# Each pattern and the one name it must be counted under, exactly once.
PATTERNS = {
    "item": (lambda: x.sum().item(), "aten._local_scalar_dense"),
    "bool": (lambda: bool(mask.any()), "aten._local_scalar_dense"),
    "if_any": (lambda: 1 if mask.any() else 0, "aten._local_scalar_dense"),
    "int": (lambda: int(x.argmax()), "aten._local_scalar_dense"),
    "float": (lambda: float(x.max()), "aten._local_scalar_dense"),
    "tensor_slice_bound": (lambda: x[: x.argmax()], "aten._local_scalar_dense"),
    "where_one_arg": (lambda: torch.where(mask), "aten.nonzero"),
    "nonzero": (lambda: mask.nonzero(), "aten.nonzero"),
    "boolean_mask_index": (lambda: x[mask], "aten.index(bool mask)"),
    "boolean_mask_assign": (lambda: _set_masked(0.0), "aten.index_put_(bool mask)"),
    "masked_select": (lambda: x.masked_select(mask), "aten.masked_select"),
    "unique": (lambda: torch.unique(mask.long()), "aten._unique2"),
    "unique_consecutive": (lambda: torch.unique_consecutive(mask.long()), "aten.unique_consecutive"),
    "unique_dim": (lambda: torch.unique(mask.long()[None], dim=1), "aten.unique_dim"),
    "equal": (lambda: torch.equal(x, x), "aten.equal"),
    "allclose": (lambda: torch.allclose(x, x), "aten.allclose"),
    "repeat_interleave": (lambda: torch.repeat_interleave(torch.tensor([1, 2])), "aten.repeat_interleave"),
    "bincount": (lambda: torch.bincount(torch.tensor([1, 2])), "aten.bincount"),
    "nms": (lambda: torchvision.ops.nms(boxes, scores, 0.5), "torchvision.nms"),
    "batched_nms": (
        lambda: torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5),
        "torchvision.nms",
    ),
    "tolist": (lambda: x.tolist(), "Tensor.tolist"),
    "numpy": (lambda: x.numpy(), "Tensor.numpy"),
    "np_asarray": (lambda: np.asarray(x), "Tensor.__array__"),
    "cpu": (lambda: x.cpu(), "Tensor.cpu"),
    "to_cpu": (lambda: x.to("cpu"), 'Tensor.to("cpu")'),
    "tensor_on_device": (lambda: torch.tensor([1.0, 2.0], device=x.device), "torch.tensor(host data, device=...)"),
    "as_tensor_on_device": (lambda: torch.as_tensor([1.0], device=x.device), "torch.as_tensor(host data, device=...)"),
    "new_tensor": (lambda: x.new_tensor([1.0]), "Tensor.new_tensor(host data)"),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_each_known_pattern_is_counted_once(name):
    fn, expected = PATTERNS[name]
    _, counts = count_host_syncs(fn)
    assert dict(counts) == {expected: 1}, counts.report()


def test_the_backward_of_boolean_mask_indexing_is_counted_too():
    _, counts = count_host_syncs(_backward_of_mask_indexing)
    assert dict(counts) == {"aten.index(bool mask)": 1, "aten.index_put(bool mask)": 1}, counts.report()


def test_sync_free_code_counts_zero():
    def sync_free():
        y = torch.where(mask, x, 0.0)  # the three-argument where: elementwise
        top = torch.topk(y, 3).indices
        z = y[top] + x[torch.tensor([1, 2, 3])]  # integer indices
        z = z.masked_fill(z > 8, 0.0).clamp(min=0)
        torch._assert_async(torch.isfinite(z).all())
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        return x.cumsum(0), len(x), x.shape[0], torch.tensor([1.0]), torch.randperm(4), z

    _, counts = count_host_syncs(sync_free)
    assert sum(counts.values()) == 0, counts.report()


def test_it_says_where_each_sync_came_from():
    _, counts = count_host_syncs(lambda: x.sum().item())
    ((name, place),) = counts.where
    assert name == "aten._local_scalar_dense" and "test_host_syncs.py" in place and "<lambda>" in place


# ---- an iteration of run.py's training loop ----------------------------------------------------------------
# Reads that the counter sees on the CPU but that read tensors living on the host in a GPU run too, by the frames
# they run under: loading and collating the next batch in the main process (no loader workers), the module's checks
# of a batch before it moves to the device (on_before_batch_transfer), torchvision's transform drawing the training
# size from the CPU generator, our CPU RoIAlign backward (a GPU runs torchvision's kernel), the batched RPN's CPU NMS
# (a GPU runs the Triton kernel, whose launch tests/modeling/test_nms.py counts: none), and the loss watch's reads
# of its host copies (mrcnn.lit_module.LossWatch.check and the check_finite it calls).
HOST_SIDE = (
    ("/torch/utils/data/", None),
    ("/mrcnn/data/", None),
    (None, "on_before_batch_transfer"),
    ("/torchvision/models/detection/transform.py", "torch_choice"),
    ("/mrcnn/modeling/roi_align.py", None),
    ("/mrcnn/modeling/nms.py", "grouped_nms_torchvision"),
    ("/mrcnn/lit_module.py", "check"),
)


class CountSyncsPerIteration(L.Callback):
    """Counts the host syncs of each iteration of the training loop, from one batch's start to the next one's.

    So everything a step does is in: training_step, backward, the optimizer step, every callback's hooks, the progress
    bar and the loggers, but not what reads host data only (``HOST_SIDE``), such as the loading of the next batch: the
    counts are device syncs. Put it first among the callbacks.
    """

    def __init__(self):
        self.steps: list[SyncCounter] = []
        self._counting = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop()
        self.steps.append(SyncCounter(HOST_SIDE))
        self._counting = counting_host_syncs(self.steps[-1])
        self._counting.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def _stop(self):
        if self._counting is not None:
            self._counting.__exit__(None, None, None)
            self._counting = None


# The recorded iterations: 4 steps, loggers writing every 3rd (step 2); step 1 is an ordinary step.
ORDINARY_STEP, LOGGING_STEP = 1, 2


def _training_loop_syncs(overrides, tmp_path) -> list[SyncCounter]:
    """Host syncs of each iteration of a run.py training loop (its callbacks, progress bar and CSV logger)."""
    cfg = compose_config(
        [
            "data.num_train_images=8",
            "data.num_val_images=2",
            "data.datamodule.batch_size=2",
            "data.datamodule.num_workers=0",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=3",
            "trainer.limit_val_batches=0",
            "++trainer.num_sanity_val_steps=0",
            *overrides,
        ],
        run_dir=str(tmp_path),
    )
    L.seed_everything(0)
    datamodule, module, trainer = build(cfg)
    counter = CountSyncsPerIteration()
    trainer.callbacks.insert(0, counter)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.progress_bar_callback is not None and trainer.loggers  # what a user's run has
    return counter.steps


# Recorded device syncs per iteration of the training loop (batch 2, 64x64; benchmarks/README.md has the before/after
# at 128x128), on an ordinary step: the model's, as the progress bar, the loss watch and the callbacks add none.
# The goal is at most 8.
# model.batched_proposals and model.batched_sampling (off by default until measured on a GPU) turn the RPN's
# per-image proposal filtering (28 syncs in small) into none (on a GPU its NMS is one kernel for every image and
# level), its anchor matching and sampling (16) into none, and the RoI heads' sampling, pooling and losses (11) into
# 2: one read per pooler (the box pooler's level sizes; the mask pooler's level sizes of the positives, whose sum
# sizes the mask head). C4 (one map, no mask pooler: the mask head reads res5's box features) reads only the
# positives' count with both switches; per image, C4 and C5 take that count from the index lists they already read.
MAX_SYNCS = {
    "small": 55,
    "small_c4": 31,
    "small_c5": 31,
    "c4_batched": 1,
    "small_batched": 2,
    "torchvision_r50_fpn": 33,
    "r50_batched": 2,
}
# On a logging step (trainer.log_every_n_steps) the loggers read the logged values: the six losses, the learning rate
# and the throughput (the last two host tensors, read without a wait on a GPU). The first read waits for the step;
# the others find it done.
MAX_LOGGING_SYNCS = 8


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("small", ["data.image_size=64"]),
        # C4 runs res5 on every sampled RoI: 16 an image keep it quick (the syncs do not depend on the count).
        ("small_c4", ["data.image_size=64", "model/backbone=c4", "model.rois_per_image=16"]),
        ("small_c5", ["data.image_size=64", "model/backbone=c5"]),
        (
            "c4_batched",
            [
                "data.image_size=64",
                "model/backbone=c4",
                "model.rois_per_image=16",
                "model.batched_proposals=true",
                "model.batched_sampling=true",
            ],
        ),
        ("small_batched", ["data.image_size=64", "model.batched_proposals=true", "model.batched_sampling=true"]),
        (
            "torchvision_r50_fpn",
            ["model=torchvision_r50_fpn", "data.image_size=64", "data.min_size=64", "data.max_size=64"],
        ),
        (
            "r50_batched",
            [
                "model=torchvision_r50_fpn",
                "model.batched_proposals=true",
                "model.batched_sampling=true",
                "model.rois_per_image=128",  # a quarter of the RoIs through the CPU RoIAlign: the same syncs
                "data.image_size=64",
                "data.min_size=64",
                "data.max_size=64",
            ],
        ),
    ],
)
def test_a_training_step_waits_on_the_host_at_most_the_recorded_number_of_times(model, overrides, tmp_path):
    steps = _training_loop_syncs(overrides, tmp_path)
    for step, ceiling in ((ORDINARY_STEP, MAX_SYNCS[model]), (LOGGING_STEP, MAX_SYNCS[model] + MAX_LOGGING_SYNCS)):
        counts = steps[step]
        print(f"step {step}: {sum(counts.values())} device syncs\n{counts.report()}")
        assert sum(counts.values()) <= ceiling, (
            f"step {step}: {sum(counts.values())} host syncs in an iteration of the training loop, more than the "
            f"{ceiling} recorded:\n{counts.report()}"
        )


# ---- a validation step ----------------------------------------------------------------------------------------
class CountSyncsPerValidationBatch(L.Callback):
    """Counts the host syncs of each validation batch, leaving out the evaluator's update (which
    tests/test_evaluation.py counts: one read of a batch's predictions) and, as in training, ``HOST_SIDE``."""

    def __init__(self):
        self.batches: list[SyncCounter] = []
        self._counting = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches.append(SyncCounter((*HOST_SIDE, ("/mrcnn/evaluation.py", "update"))))
        self._counting = counting_host_syncs(self.batches[-1])
        self._counting.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._counting.__exit__(None, None, None)
        self._counting = None


# Recorded at batch 2, 64x64: the model's forward with targets (losses and detections). Before the targets were
# checked and stripped of crowd regions on the host, and the evaluator's targets kept there, the step also read every
# target's boxes and crowd flags from the device, and the evaluator read each image's targets and predictions: 66 in
# all for "small".
MAX_VALIDATION_SYNCS = {"small": 28, "small_batched": 5}


@pytest.mark.parametrize(
    "model, overrides",
    [("small", []), ("small_batched", ["model.batched_proposals=true", "model.batched_sampling=true"])],
)
def test_a_validation_step_reads_no_target_on_the_device(model, overrides, tmp_path):
    cfg = compose_config(
        [
            "data.num_train_images=2",
            "data.num_val_images=4",
            "data.datamodule.batch_size=2",
            "data.datamodule.num_workers=0",
            "data.image_size=64",
            *overrides,
        ],
        run_dir=str(tmp_path),
    )
    L.seed_everything(0)
    datamodule, module, trainer = build(cfg)
    counter = CountSyncsPerValidationBatch()
    trainer.callbacks.insert(0, counter)
    trainer.validate(module, datamodule=datamodule)
    assert len(counter.batches) == 2
    for counts in counter.batches:
        print(f"{sum(counts.values())} device syncs\n{counts.report()}")
        assert sum(counts.values()) <= MAX_VALIDATION_SYNCS[model], counts.report()
        places = "\n".join(place for _, place in counts.where)
        assert "check_targets" not in places and "drop_crowd" not in places, counts.report()


# ---- inference ------------------------------------------------------------------------------------------------
def _inference_syncs(detections_per_img: int, overrides=()) -> tuple[SyncCounter, list[int]]:
    cfg = compose_config(
        [
            "model=torchvision_r50_fpn",
            "data.image_size=128",
            "data.min_size=128",
            "data.max_size=128",
            "model.box_score_thresh=0.0",  # a random model: keep every detection, up to the cap
            f"model.detections_per_img={detections_per_img}",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model.net).eval()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 96)]
    counts = SyncCounter(HOST_SIDE)  # the batched RPN's CPU NMS aside: a GPU runs the kernel
    with torch.no_grad(), counting_host_syncs(counts):
        detections, _ = model(images)
    return counts, [len(d["masks"]) for d in detections]


def test_inference_waits_on_the_host_the_same_number_of_times_whatever_the_number_of_detections():
    # torchvision pastes each detection's mask after reading its box on the host (about 13 reads a detection: 2642
    # for 2 x 100 detections at 256 px, 36 without); mrcnn.modeling.transform.paste_masks pastes them all at once.
    (few, few_detections), (many, many_detections) = _inference_syncs(5), _inference_syncs(100)
    assert few_detections == [5, 5] and many_detections == [100, 100]
    assert sum(many.values()) == sum(few.values()) <= 62, (few.report(), many.report())  # recorded at 128 px


def test_batched_inference_waits_on_the_host_three_times_for_the_whole_batch():
    # model.batched_proposals: the RPN's proposals and the detections of all images at once (grouped NMS); what is
    # left: the box pooler's level sizes, the detections' count per image, the mask pooler's level sizes.
    counts, detections = _inference_syncs(100, ["model.batched_proposals=true"])
    assert detections == [100, 100]
    assert sum(counts.values()) == 3, counts.report()
