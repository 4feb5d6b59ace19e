"""OmegaConf resolvers that read dataset facts from the data itself (one place per fact).

``${mrcnn.coco_classes:<json>}`` gives the category names of a COCO-format json in
category-id order, so ``configs/data/coco_format.yaml`` can derive ``classes`` and
``num_classes`` (which the model config reads) from the user's json instead of
repeating them. Registered on import; ``mrcnn/config.py`` imports this module.
"""

from __future__ import annotations

import os
from functools import lru_cache

from omegaconf import ListConfig, OmegaConf

from mrcnn.errors import raises_command_errors

__all__ = ["coco_classes", "register_data_resolvers"]


@lru_cache(maxsize=8)
def _cached_names(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    # Keyed by modification time and size too, so an edited json is read again.
    from mrcnn.data.coco import read_category_names  # torch and pycocotools: only when a config reads a json

    return tuple(read_category_names(path))


def coco_classes(path: str) -> ListConfig:
    """Category names of the COCO json at ``path``, in category-id order.

    Raises:
        FileNotFoundError: naming the path (set ``data.train_json``); IsADirectoryError: the path is a folder.
        ValueError: the json is empty, malformed or has no categories.
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"COCO json {path!r} is a folder; give the json file (data.train_json=<folder>/<name>.json)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO json not found: {path!r} (set data.train_json=/path/to/annotations.json)")
    stat = os.stat(path)
    return ListConfig(list(_cached_names(path, stat.st_mtime_ns, stat.st_size)))


def register_data_resolvers() -> None:
    """Registers ``${mrcnn.coco_classes:path}`` (idempotent)."""
    if not OmegaConf.has_resolver("mrcnn.coco_classes"):
        # A json that cannot give its classes is a mistake in the input: said alone (mrcnn.errors), not as a
        # traceback through the code that first resolved the config.
        OmegaConf.register_new_resolver("mrcnn.coco_classes", raises_command_errors(coco_classes))


register_data_resolvers()
