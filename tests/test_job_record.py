"""What a job records about the model it built and what it cost (``mrcnn.reporting.job_record``)."""

import json
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.reporting import job_record
from mrcnn.reporting.job_record import JobRecord, count_parameters, describe_model
from tests.helpers.config import TINY_MODEL, compose_config


@pytest.mark.parametrize(
    "overrides, backbone, roi_heads",
    [
        (["model/backbone=c4", "model.width=16"], "ResNet-18-C4", "Res5RoIHeads"),  # res5 counted in the box head
        (["model/backbone=c5"], "ResNet-18-C5", "RoIHeads"),
        (["model.depth=50"], "ResNet-50-FPN", "RoIHeads"),
    ],
)
def test_the_description_is_read_from_the_built_modules(overrides, backbone, roi_heads):
    net = instantiate(compose_config([*TINY_MODEL, *overrides]).model.net)
    built = describe_model(net)
    assert built["backbone"] == backbone and built["roi_heads"] == roi_heads
    assert built["backbone.width"] == (16 if "model.width=16" in overrides else 64)
    assert built["backbone.norm"] == "GroupNorm"
    json.dumps(built)  # plain JSON values


def test_the_description_names_each_switch_and_its_settings():
    net = instantiate(
        compose_config(
            [*TINY_MODEL, "model/pooler=roi_warp_max", "model/mask_loss=softmax", "model.mask_target_form=binary"]
        ).model.net
    )
    built = describe_model(net)
    assert (built["pooler"], built["pooler.mode"], built["pooler.sampling_ratio"]) == ("RoIWarpPooler", "max", 2)
    assert (built["pooler.box_size"], built["pooler.mask_size"]) == (7, 14)
    assert (built["mask_loss"], built["mask_targets"]) == ("SoftmaxMaskLoss", "binary")
    assert (built["mask_head"], built["mask_head.convs"], built["mask_head.width"]) == ("FCNMaskHead", 4, 16)
    mlp = describe_model(instantiate(compose_config([*TINY_MODEL, "model/mask_head=mlp3"]).model.net))
    assert mlp["mask_head.fc"] == [64, 64, 64] and mlp["mask_head.input_size"] == 14  # 4 x mask_head_dim 16


def test_parameter_counts():
    net = instantiate(compose_config(TINY_MODEL).model.net)
    counts = count_parameters(net)
    assert counts["total"] == sum(p.numel() for p in net.parameters())
    assert 0 < counts["mask_head"] == sum(p.numel() for p in net.roi_heads.mask_head.parameters()) < counts["total"]


def test_the_callback_writes_the_model_parameters_median_step_and_wall_time(tmp_path, monkeypatch):
    net = instantiate(compose_config(TINY_MODEL).model.net)
    # A clock the test moves: real sleeps overrun on a busy machine.
    now = [100.0]
    monkeypatch.setattr(job_record, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    callback = JobRecord(str(tmp_path / "job" / "job.json"), seed=3)
    trainer, module = SimpleNamespace(is_global_zero=True), SimpleNamespace(model=net, device=torch.device("cpu"))
    callback.setup(trainer, module, "fit")
    for seconds in (0.03, 0.01, 0.02):
        callback.on_train_batch_start(trainer, module, None, 0)
        now[0] += seconds
        callback.on_train_batch_end(trainer, module, None, None, 0)
        now[0] += 0.5  # between steps: not a step's time
    callback.teardown(trainer, module, "fit")
    record = json.loads((tmp_path / "job" / "job.json").read_text())
    assert record["model"] == describe_model(net) and record["parameters"] == count_parameters(net)
    assert record["train_steps"] == 3 and record["step_time_median_s"] == pytest.approx(0.02)
    assert record["wall_time_s"] == pytest.approx(1.56)
    # What the numbers depend on beyond the config (README, "Reproducibility").
    environment = record["environment"]
    assert environment["seed"] == 3 and environment["torch_threads"] == torch.get_num_threads()
    assert environment["torch"] == torch.__version__ and environment["deterministic"] is False
    assert {"torchvision", "cuda", "cudnn", "device"} <= environment.keys() and environment["device"]
    # Not rank zero: nothing written.
    (tmp_path / "job" / "job.json").unlink()
    callback.teardown(SimpleNamespace(is_global_zero=False), module, "validate")
    assert not (tmp_path / "job" / "job.json").exists()
