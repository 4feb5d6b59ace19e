"""Compressed RLE strings decoded as pycocotools decodes them; RLE checks (bad RLEs: test_bad_input.py)."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from mrcnn.data.rle import compressed_rle_counts, compressed_rle_totals, rle_problem
from tests.helpers.data import uncompressed_rle


def _random_masks(count, seed=0):
    """Masks of random sizes: noise of random density, or a rectangle (long runs, negative differences)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = (int(n) for n in rng.integers(1, 120, size=2))
        if i % 2:
            mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        else:
            mask = np.zeros((height, width), dtype=np.uint8)
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y : y + rng.integers(1, 60), x : x + rng.integers(1, 60)] = 1
        yield mask


def test_counts_equal_the_masks_runs():
    strings, totals = [], []
    for mask in _random_masks(300):
        string = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        assert compressed_rle_counts(string).tolist() == uncompressed_rle(mask)["counts"]
        assert rle_problem({"size": list(mask.shape), "counts": string}, *mask.shape) is None
        strings.append(string)
        totals.append(mask.size)
    # All strings at once give each string's total, malformed ones -1 without disturbing their neighbours.
    mixed = [s for string in strings for s in (string, "abc")]
    expected = [t for total in totals for t in (total, -1)]
    assert compressed_rle_totals(mixed).tolist() == expected


@pytest.mark.parametrize(
    "counts",
    [[0, 2**28, 5], [3, 0, 0, 7], [1_000_000, 1, 2, 3, 4], [5, 2**29 - 1], [7, 100, 3, 1, 1, 500]],
)
def test_long_and_zero_runs_round_trip_through_pycocotools(counts):
    total = sum(counts)
    string = mask_utils.frPyObjects({"size": [1, total], "counts": counts}, 1, total)["counts"].decode("ascii")
    assert compressed_rle_counts(string).tolist() == counts


@pytest.mark.parametrize(
    "string",
    [
        "abc",  # a run that comes out negative
        "é1",  # not ascii
        "\x7f",  # outside the encoding's characters
        "000p",  # ends inside a number
        "000ooooooo0",  # a number of eight characters: more than pycocotools decodes exactly
    ],
)
def test_malformed_strings(string):
    assert compressed_rle_counts(string) is None
    assert compressed_rle_totals([string]).tolist() == [-1]


def test_runs_beyond_what_pycocotools_decodes_exactly_are_malformed():
    # 2**29 needs a seventh 5-bit group, which pycocotools shifts past a 32-bit int.
    string = mask_utils.frPyObjects({"size": [1, 2**29], "counts": [0, 2**29]}, 1, 2**29)["counts"].decode()
    assert compressed_rle_counts(string) is None


def test_rle_problem_reasons():
    ok = {"size": [2, 3], "counts": [1, 2, 3]}
    assert rle_problem(ok, 2, 3) is None
    assert rle_problem(ok, 3, 2) == "RLE size differs from the image size"
    assert rle_problem({"size": [2, 3], "counts": [1, 2]}, 2, 3) == "RLE runs do not add up to the image size"
    assert rle_problem({"size": [2, 3], "counts": [True, 5]}, 2, 3) == "malformed RLE segmentation"
    assert rle_problem({"size": [2, 3], "counts": "abc"}, 2, 3) == "malformed RLE segmentation"
    # Left to the caller, who decodes all strings at once.
    assert rle_problem({"size": [2, 3], "counts": "abc"}, 2, 3, decode_strings=False) is None
