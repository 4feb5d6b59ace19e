"""Every ablation at setting=paper trains 2 steps and validates, end to end, on a tiny COCO-layout data set.

One process runs one job of each experiment (the smallest set that covers them all: each experiment's cheapest
variant). The model is the paper's (ResNet-50 at width 64, frozen BN, a local ImageNet-shaped weights file of
random numbers, 80 COCO classes, the per-backbone heads); this test shrinks only what a 2-core CPU cannot afford,
and says so: images at 64 px instead of 800 (data.min_size / max_size), 64 sampled RoIs per image and 100 test
proposals for both backbones (model.rois_per_image, model.rpn_post_nms_top_n_test), one validation batch, no
checkpoint files. Measured on the shared 2-core machine (load about 6): 147 s for the four jobs. No case runs at
the full 800 px: one job of the paper's ResNet-50-FPN with its MLP mask head took over 2 min at 128 px already.
"""

import json

import pytest
import torch
import torchvision

import mrcnn.engine.train
from tests.helpers.config import compose_config
from tests.helpers.data import make_coco_split

# experiment -> the variant it runs here (each ablation's cheapest; ablation_mask_loss on C4, as setting=paper sweeps).
JOBS = {
    "ablation_backbone": ["model/backbone=fpn"],
    "ablation_mask_head": ["model/mask_head=fcn"],
    "ablation_mask_loss": ["model/backbone=c4", "ablation/mask_loss=sigmoid"],
    "ablation_roialign": ["model/pooler=roi_align"],
}
SHRUNK = [
    "data.min_size=64",
    "data.max_size=64",
    "model.rois_per_image=64",
    "model.rpn_post_nms_top_n_test=100",
    "trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "~callbacks.best_checkpoint",
    "~callbacks.last_checkpoint",
]


@pytest.fixture(scope="module")
def coco_and_weights(tmp_path_factory):
    """COCO's layout with the 80 COCO class names, and a ResNet-50 state dict saved as torchvision's would be."""
    root = tmp_path_factory.mktemp("coco")
    names = compose_config(["data=coco", "data.root=/unused"]).data.classes
    categories = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(names)]
    make_coco_split(root, "train2017", seed=0, categories=categories)
    make_coco_split(root, "val2017", seed=1, categories=categories)
    weights = root / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    return root, weights


# Slow (about 27 s: one variant of each experiment, a full-width ResNet-50 model, trained at setting=paper). The default
# suite composes every experiment at every setting and checks setting=paper's recipe key by key (tests/test_settings.py).
@pytest.mark.slow
def test_every_experiment_at_setting_paper_trains_two_steps_and_validates(coco_and_weights, tmp_path):
    root, weights = coco_and_weights
    for experiment, variant in JOBS.items():
        cfg = compose_config(
            [
                f"experiment={experiment}",
                "setting=paper",
                f"data.root={root}",
                f"model.backbone_weights={weights}",
                *variant,
                "trainer.max_steps=2",
                "data.datamodule.num_workers=0",
                "data.datamodule.persistent_workers=false",
                *SHRUNK,
            ],
            run_dir=str(tmp_path / experiment),
        )
        assert cfg.model.depth == 50 and cfg.model.width == 64 and cfg.model.norm == "frozen_bn"
        metrics = mrcnn.engine.train.train(cfg)
        assert {"segm_AP", "bbox_AP"} <= set(metrics), experiment
        assert json.loads((tmp_path / experiment / "metrics.json").read_text())["global_step"] == 2, experiment
