"""OmegaConf resolvers used by the configs, so each fact is written once and derived elsewhere."""

from omegaconf import OmegaConf

import mrcnn.data.resolvers  # noqa: F401  (registers ${mrcnn.coco_classes:...})
from mrcnn.modeling.backbone import stage_channels


def register_resolvers() -> None:
    """Register ``${mrcnn.stage_channels:depth,stage[,width]}`` and ``${mrcnn.per_level:sizes}`` (idempotent)."""
    resolvers = {
        # Channels of a ResNet stage, e.g. ${mrcnn.stage_channels:50,4} -> 1024; optional third argument: width.
        "mrcnn.stage_channels": lambda depth, stage, width=64: stage_channels(int(depth), int(stage), int(width)),
        # One anchor size per FPN level: [32, 64] -> [[32], [64]].
        "mrcnn.per_level": lambda sizes: OmegaConf.create([[int(s)] for s in sizes]),
        # All anchor sizes on one feature map (C4/C5): [32, 64] -> [[32, 64]].
        "mrcnn.single_level": lambda sizes: OmegaConf.create([[int(s) for s in sizes]]),
        "mrcnn.mul": lambda a, b: a * b,
        "mrcnn.len": lambda seq: len(seq),
    }
    # List-valued resolvers return a ListConfig so OmegaConf.resolve() can store them in place.
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
