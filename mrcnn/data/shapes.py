"""A synthetic instance-segmentation dataset of coloured shapes, generated on the fly.

It is the project's default dataset: it needs no files, trains in minutes on a
CPU and still exercises what the Mask R-CNN paper's ablations measure:

* thin and curved boundaries (``ring``, ``crescent``) and sharp concavities
  (``star``), where mask resolution and RoI alignment matter;
* objects from a few pixels to most of the image (sizes log-uniform);
* overlapping instances of different classes that occlude each other, so
  per-class masks compete inside one RoI (sigmoid vs. softmax mask loss);
* colour that carries no class information and a textured, noisy background,
  so the model has to use shape.

Item ``i`` of a given ``(seed, split)`` is a pure function of those three
numbers: it does not depend on worker, process or access order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mrcnn.data.transforms import to_sample, transform_instances

__all__ = ["SHAPE_CLASSES", "ShapesDataset"]

# Shape name -> rasteriser, filled in below the rasterisers.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "triangle", "square", "ring", "crescent", "star")

_SPLITS = {"train": 0, "val": 1, "test": 2}

# Attempts at placing one instance before giving up on it (see ShapesDataset.generate).
_MAX_PLACEMENT_TRIES = 20

# Minimum RGB distance (0..255 units) between an instance's colour and what lies under it.
_MIN_COLOUR_DISTANCE = 60.0
_COLOUR_CANDIDATES = 8

# Side of the coarse random grid that is smoothly upsampled into the background texture.
_TEXTURE_GRID = 6


# ----------------------------------------------------------------------------------
# Rasterisers. Each takes pixel-centre coordinates relative to the shape centre,
# ``u`` of shape [1, w] (x) and ``v`` of shape [h, 1] (y), the outer radius ``r``
# and a random generator, and returns a bool mask [h, w]. Keeping u and v as a row
# and a column lets numpy broadcast, so per-row quantities cost O(h), not O(h*w).
# ----------------------------------------------------------------------------------


def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for all pixel centres at once.

    Args:
        u: ``[1, w]`` x coordinates.
        v: ``[h, 1]`` y coordinates.
        vertices: ``[V, 2]`` polygon vertices ``(x, y)`` in order.

    Returns:
        bool ``[h, w]``.
    """
    inside = np.zeros((v.shape[0], u.shape[1]), dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:  # a loop over the few edges, vectorised over pixels
        if y0 != y1:
            # Does the horizontal ray to the left of each pixel cross this edge?
            spans_row = (y0 > v) != (y1 > v)  # [h, 1]
            x_cross = x0 + (v - y0) * (x1 - x0) / (y1 - y0)  # [h, 1]
            inside ^= spans_row & (u < x_cross)
        x0, y0 = x1, y1
    return inside


def _regular_vertices(radii: np.ndarray, rotation: float) -> np.ndarray:
    """Vertices at equal angular steps with the given radii, starting at ``rotation``."""
    angles = rotation + np.arange(len(radii)) * (2 * np.pi / len(radii))
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _circle(u, v, r, rng):
    return u * u + v * v <= r * r


def _ring(u, v, r, rng):
    # A thin annulus: the band is 30-50% of the radius and at least 3 px. Thinner
    # bands (1-2 px) are below what stride-4 features can resolve at 28x28 mask
    # resolution, so no model variant can segment them and they only add noise.
    band = max(3.0, rng.uniform(0.3, 0.5) * r)
    d2 = u * u + v * v
    return (d2 <= r * r) & (d2 >= (r - band) ** 2)


def _crescent(u, v, r, rng):
    # A disk minus a smaller disk shifted towards a random direction. The cut
    # disk always reaches past the rim (offset + radius > r), so the result is
    # a crescent with two horns rather than a disk with a hole.
    cut_r = rng.uniform(0.7, 0.95) * r
    offset = rng.uniform(0.35, 0.6) * r
    angle = rng.uniform(0, 2 * np.pi)
    cu, cv = u - offset * np.cos(angle), v - offset * np.sin(angle)
    return (u * u + v * v <= r * r) & (cu * cu + cv * cv > cut_r * cut_r)


def _triangle(u, v, r, rng):
    return _polygon_mask(u, v, _regular_vertices(np.full(3, r), rng.uniform(0, 2 * np.pi)))


def _square(u, v, r, rng):
    return _polygon_mask(u, v, _regular_vertices(np.full(4, r), rng.uniform(0, 2 * np.pi)))


def _star(u, v, r, rng):
    # Five points; alternating outer and inner vertices give sharp concave corners.
    inner = rng.uniform(0.38, 0.5) * r
    radii = np.tile([r, inner], 5)
    return _polygon_mask(u, v, _regular_vertices(radii, rng.uniform(0, 2 * np.pi)))


_RASTERISERS: dict[str, Callable] = {
    "circle": _circle,
    "triangle": _triangle,
    "square": _square,
    "ring": _ring,
    "crescent": _crescent,
    "star": _star,
}
assert tuple(_RASTERISERS) == SHAPE_CLASSES


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` linear-interpolation weights that upsample n_in points to n_out."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    mat[np.arange(n_out), lo] = 1 - frac
    mat[np.arange(n_out), lo + 1] = frac
    return mat


class ShapesDataset(torch.utils.data.Dataset):
    """Synthetic images of overlapping coloured shapes with instance masks.

    Each image has a background made of a colour gradient plus a smooth random
    texture. Instances are painted one after another, each with a random class,
    size (outer diameter drawn log-uniformly in ``[min_size, max_size]``),
    position, rotation and colour; a later instance occludes the earlier ones,
    whose masks lose the covered pixels. A placement that would leave any
    instance (old or new) with less than ``min_visible_fraction`` of its full
    in-image area, or fewer than ``min_area`` pixels, is rejected and redrawn
    (up to 20 times, then the instance is skipped). Rejecting instead of
    deleting afterwards means no unlabelled fragment of a dropped instance is
    left in the picture. Boxes are computed from the visible masks.

    Args:
        num_images: number of items (``len(dataset)``).
        image_size: ``H`` or ``(H, W)`` in pixels.
        classes: shape names, any of ``"circle", "triangle", "square", "ring",
            "crescent", "star"``; label ``i + 1`` is ``classes[i]``.
        min_objects: minimum number of instances drawn per image; 0 allows
            empty images.
        max_objects: maximum number of instances per image.
        min_size: smallest outer diameter in pixels.
        max_size: largest outer diameter in pixels; ``None`` means 60% of the
            shorter image side.
        min_visible_fraction: smallest visible part of an instance, as a
            fraction of its unoccluded area inside the image.
        min_area: smallest visible instance area in pixels.
        noise_std: standard deviation of Gaussian pixel noise added to the
            whole image, in units of the 0..1 intensity range; 0 disables it.
        seed: base seed; item ``i`` is generated from ``(seed, split, i)``.
        split: ``"train"``, ``"val"`` or ``"test"``; each gives an independent
            stream of images for the same seed.
        transforms: an optional :class:`mrcnn.data.transforms.InstanceTransform`
            on the uint8 numpy arrays; a training item's draw follows from its
            index (:class:`mrcnn.data.samplers.SampleIndex`).
    """

    def __init__(
        self,
        num_images: int = 1000,
        image_size: int | Sequence[int] = 128,
        classes: Sequence[str] = SHAPE_CLASSES,
        min_objects: int = 1,
        max_objects: int = 6,
        min_size: float = 8.0,
        max_size: float | None = None,
        min_visible_fraction: float = 0.3,
        min_area: int = 10,
        noise_std: float = 0.03,
        seed: int = 0,
        split: str = "train",
        transforms: Callable | None = None,
    ):
        if isinstance(classes, str):
            raise ValueError(f"classes must be a sequence of names, got the string {classes!r}")
        classes = tuple(str(c) for c in classes)
        unknown = [c for c in classes if c not in _RASTERISERS]
        if unknown or not classes:
            raise ValueError(f"Unknown shape classes {unknown or classes}; valid names are {list(SHAPE_CLASSES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"Duplicate shape classes in {list(classes)}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        height, width = (int(s) for s in image_size)
        if max_size is None:
            max_size = 0.6 * min(height, width)
        if not 0 <= min_objects <= max_objects:
            raise ValueError(f"Need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 0 < min_size <= max_size:
            raise ValueError(f"Need 0 < min_size <= max_size, got {min_size}, {max_size}")

        self.num_images = int(num_images)
        self.image_size = (height, width)
        self.class_names = list(classes)
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.min_visible_fraction = float(min_visible_fraction)
        self.min_area = max(1, int(min_area))  # an instance always has at least one pixel
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.split = split
        self.transforms = transforms

        # Fixed per dataset, reused by every image.
        self._texture_rows = _interp_matrix(height, _TEXTURE_GRID)
        self._texture_cols = _interp_matrix(width, _TEXTURE_GRID)
        self._ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
        self._xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (labels run 1..K)."""
        return len(self.class_names)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every item (all alike), for ``aspect_ratio_grouping``."""
        return [self.image_size] * self.num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Returns ``(image float32 [3, H, W], target)`` following the data contract."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image, masks, labels = self.generate(index)
        image, masks, boxes, fields = transform_instances(
            self.transforms, image, masks, {"labels": labels}, index=index
        )
        return to_sample(image, masks, fields["labels"], image_id=int(index) + 1, boxes=boxes)

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draws item ``index`` before any transform.

        Returns:
            image: uint8 ``[H, W, 3]``.
            masks: uint8 ``[N, H, W]`` visible (occlusion-applied) masks, each
                non-empty, no pixel in two masks.
            labels: int64 ``[N]`` in 1..K.
        """
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        height, width = self.image_size
        canvas = self._background(rng)  # float32 [H, W, 3], 0..255
        owner = np.zeros((height, width), dtype=np.int32)  # 0 = background, k = k-th accepted instance
        full_area: list[int] = []
        visible_area = np.zeros(0, dtype=np.int64)
        colours: list[np.ndarray] = []
        labels: list[int] = []

        log_min, log_max = np.log(self.min_size), np.log(self.max_size)
        num_objects = rng.integers(self.min_objects, self.max_objects + 1)
        for _ in range(num_objects):
            for _ in range(_MAX_PLACEMENT_TRIES):
                class_idx = int(rng.integers(self.num_classes))
                radius = 0.5 * float(np.exp(rng.uniform(log_min, log_max)))
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
                # Only the window around the shape is rasterised.
                x0, x1 = max(0, int(cx - radius)), min(width, int(np.ceil(cx + radius)) + 1)
                y0, y1 = max(0, int(cy - radius)), min(height, int(np.ceil(cy + radius)) + 1)
                u, v = self._xs[:, x0:x1] - cx, self._ys[y0:y1] - cy
                shape = _RASTERISERS[self.class_names[class_idx]](u, v, radius, rng)
                area = int(shape.sum())
                if area < self.min_area:
                    continue
                # How many visible pixels each earlier instance would lose.
                window_owner = owner[y0:y1, x0:x1]
                lost = np.bincount(window_owner[shape], minlength=len(labels) + 1)[1:]
                remaining = visible_area - lost
                if np.any(remaining < np.maximum(self.min_area, self.min_visible_fraction * np.array(full_area))):
                    continue
                covered = np.flatnonzero(lost)
                colour = self._pick_colour(rng, canvas[y0:y1, x0:x1][shape], [colours[k] for k in covered])
                self._paint(rng, canvas[y0:y1, x0:x1], shape, u, v, radius, colour)
                window_owner[shape] = len(labels) + 1
                visible_area = np.append(remaining, area)
                full_area.append(area)
                colours.append(colour)
                labels.append(class_idx + 1)
                break

        if self.noise_std > 0:
            canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * (255.0 * self.noise_std)
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        ids = np.arange(1, len(labels) + 1, dtype=np.int32)
        masks = (owner[None] == ids[:, None, None]).astype(np.uint8)
        return image, masks, np.asarray(labels, dtype=np.int64)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A linear colour gradient plus a smooth random texture, float32 ``[H, W, 3]`` in 0..255."""
        height, width = self.image_size
        start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        # Position along the gradient direction, scaled to 0..1 over the image.
        t = np.cos(angle) * self._xs / width + np.sin(angle) * self._ys / height
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = start + t[..., None] * (end - start)
        # Smooth blotches: a coarse random grid upsampled bilinearly (two small
        # matrix products per channel), so the background has structure at
        # object scale without the hard edges that would look like objects.
        grid = rng.normal(0, 30, size=(3, _TEXTURE_GRID, _TEXTURE_GRID)).astype(np.float32)
        texture = self._texture_rows @ grid @ self._texture_cols.T  # [3, H, W]
        canvas += texture.transpose(1, 2, 0)
        return canvas

    @staticmethod
    def _pick_colour(rng: np.random.Generator, under: np.ndarray, covered: list[np.ndarray]) -> np.ndarray:
        """A random colour that stands out from what the new instance covers.

        Colour is drawn independently of the class; candidates too close to the
        mean background colour under the shape, or to an instance it overlaps,
        are skipped so that no boundary is invisible.
        """
        candidates = rng.uniform(0, 255, size=(_COLOUR_CANDIDATES, 3)).astype(np.float32)
        references = np.stack([under.mean(axis=0), *covered])  # [R, 3]
        dist = np.linalg.norm(candidates[:, None] - references[None], axis=2).min(axis=1)
        ok = np.flatnonzero(dist >= _MIN_COLOUR_DISTANCE)
        return candidates[ok[0]] if len(ok) else candidates[dist.argmax()]

    @staticmethod
    def _paint(rng, window, shape, u, v, radius, colour) -> None:
        """Paints ``colour`` into ``window[shape]`` with a mild directional shading."""
        angle = rng.uniform(0, 2 * np.pi)
        strength = rng.uniform(0, 0.25)
        shade = 1.0 + strength * (np.cos(angle) * u + np.sin(angle) * v) / radius  # [h, w]
        window[shape] = colour * shade[shape][:, None]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_images={self.num_images}, image_size={self.image_size}, "
            f"classes={self.class_names}, split={self.split!r}, seed={self.seed})"
        )
