"""Overlays: masks in their instance's colour, the most confident one's where they overlap."""

import torch

from mrcnn.engine.visualize import blend_masks


def test_overlapping_masks_show_the_most_confident_ones_colour():
    canvas = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 1:5, 1:5] = True
    masks[1, 3:7, 3:7] = True
    red, blue = (255, 0, 0), (0, 0, 255)
    out = blend_masks(canvas, masks, [red, blue], 0.5, scores=torch.tensor([0.3, 0.9]))
    assert out[:, 0, 0].tolist() == [200, 200, 200]  # no mask: unchanged
    assert out[:, 1, 1].tolist() == [228, 100, 100]  # the first alone: half red
    assert out[:, 6, 6].tolist() == [100, 100, 228]  # the second alone: half blue
    assert out[:, 4, 4].tolist() == [100, 100, 228]  # both: the more confident (blue), not darkened
    assert blend_masks(canvas, masks, [red, blue], 0.5)[:, 4, 4].tolist() == [228, 100, 100]  # no scores: the first


def test_the_wandb_overlays_show_the_detections_evaluation_scores_on_images_of_many_sizes(monkeypatch):
    # Evaluation batches images of one size (each detected as alone); the overlays' images, of any sizes, are each
    # detected alone too: in one batch the padding to the largest would reach GroupNorm's statistics.
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from mrcnn.engine.build import build_module
    from mrcnn.engine.callbacks import PredictionOverlays
    from tests.helpers.config import TINY_MODEL, compose_config

    torch.manual_seed(0)
    module = build_module(compose_config([*TINY_MODEL, "data.image_size=128"])).eval()
    module.model.roi_heads.score_thresh = 0.0
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 48)]  # 96x128 and 128x96 at 128 px
    dataset = [(image, {}) for image in images]
    trainer = SimpleNamespace(
        loggers=[WandbLogger.__new__(WandbLogger)],  # only its type is read before _log
        sanity_checking=False,
        is_global_zero=True,
        val_dataloaders=SimpleNamespace(dataset=dataset),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=3)),
        global_step=3,
    )
    shown = []
    monkeypatch.setattr(PredictionOverlays, "_log", lambda self, *args: shown.append(args))
    PredictionOverlays(num_images=2).on_validation_epoch_end(trainer, module)
    [(_, step, _, _, detections, _)] = shown
    assert step == 3
    with torch.no_grad():
        alone = [module.model([image])[0][0] for image in images]
        batched, _ = module.model(images)
    for shown_one, alone_one in zip(detections, alone):
        torch.testing.assert_close(shown_one["scores"], alone_one["scores"])
    assert not torch.allclose(batched[0]["scores"][:10], alone[0]["scores"][:10], atol=1e-3)  # why
