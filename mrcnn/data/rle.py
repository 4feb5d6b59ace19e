"""Checking COCO RLE segmentations before pycocotools decodes them.

pycocotools trusts an RLE's run lengths. Runs that add up to less than
``height * width`` leave the end of the decoded mask uninitialised (values above 1,
different on every decode), and ``COCOeval`` was seen to loop forever in C on such
a ground truth, where no Python signal gets through. Runs that add up to more raise
"Invalid RLE mask representation" at decoding time, in a DataLoader worker, naming
no file. A compressed string that ends inside a number makes pycocotools read past
its end. So every RLE is checked when the json is loaded: its runs must be
non-negative and add up to exactly ``height * width``.

An uncompressed RLE (``counts`` a list of ints, COCO's crowd regions) is checked
with C-level builtins. A compressed one (``counts`` a string) is decoded here with
numpy, exactly as pycocotools' ``rleFrString`` decodes it, without running
pycocotools on a string that may be malformed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["compressed_rle_counts", "compressed_rle_totals", "decode_compressed_rles", "rle_problem"]

# A compressed RLE character is 48 + 6 bits: 5 value bits, then a "more characters follow" bit.
_FIRST_CHAR, _LAST_CHAR = 48, 48 + 63
_MORE, _VALUE_BITS, _SIGN = 0x20, 0x1F, 0x10
# Characters of one number that pycocotools decodes exactly: it shifts each 5-bit group as a 32-bit C int,
# which overflows from the seventh group on (a shift by 30). Six groups hold runs up to 2**29 pixels.
_MAX_CHARS_PER_NUMBER = 6
# pycocotools stores run lengths as uint32.
_MAX_RUN = 2**32 - 1


def compressed_rle_counts(counts: str) -> np.ndarray | None:
    """The run lengths encoded in one compressed RLE string, or ``None`` if it is malformed.

    See :func:`decode_compressed_rles`, which this calls for one string.
    """
    runs, owner, valid = decode_compressed_rles([counts])
    return runs[owner == 0] if valid[0] else None


def compressed_rle_totals(strings: Sequence[str]) -> np.ndarray:
    """The sum of the runs of each compressed RLE string (what must equal ``height * width``).

    Args:
        strings: ``n`` RLE ``counts`` strings.

    Returns:
        int64 ``[n]``: each string's total, ``-1`` for a malformed one (see
        :func:`decode_compressed_rles`).
    """
    runs, owner, valid = decode_compressed_rles(strings)
    totals = np.zeros(len(strings), dtype=np.int64)
    np.add.at(totals, owner, runs)
    totals[~valid] = -1
    return totals


def decode_compressed_rles(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes compressed RLE strings all at once, as pycocotools' ``rleFrString`` decodes each.

    A string holds numbers of 5-bit groups, one character (48 + 6 bits) per group,
    least significant first: bit 0x20 says another group follows, the last group's
    bit 0x10 is the number's sign. The first three numbers are run lengths; from the
    fourth on, each is the difference to the run two before it.

    A string is malformed when a character is outside the encoding's range, the
    string ends inside a number, a number has more groups than pycocotools decodes
    exactly (six: runs up to 2**29), or a run is negative or above pycocotools' uint32 range.
    Numpy over all strings' characters together: no per-string Python work beyond
    a few C-level string checks.

    Args:
        strings: ``n`` RLE ``counts`` strings.

    Returns:
        ``(runs, owner, valid)``: int64 ``[m]`` the run lengths of all strings in
        order, int64 ``[m]`` the string each run belongs to, bool ``[n]`` which
        strings are well formed (the runs of a malformed one are meaningless).
    """
    valid = np.array([_well_delimited(s) for s in strings], dtype=bool)
    kept = np.flatnonzero(valid)
    text = "".join(strings[i] for i in kept).encode("ascii")
    if not text:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), valid
    groups = np.frombuffer(text, dtype=np.uint8) - np.uint8(_FIRST_CHAR)
    # Every kept string ends a number with its last character, so no number spans two strings.
    ends = np.flatnonzero((groups & _MORE) == 0)  # the last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    numbers = _numbers(groups & _VALUE_BITS, starts, lengths)
    # A set sign bit in the last group makes the number negative: x |= -1 << 5k is x - 2**(5k).
    negative = (groups[ends] & _SIGN) != 0
    numbers[negative] -= np.int64(1) << (5 * np.minimum(lengths[negative], _MAX_CHARS_PER_NUMBER))

    string_ends = np.cumsum([len(strings[i]) for i in kept])
    owner = kept[np.searchsorted(string_ends, starts, side="right")]  # the string of each number
    per_string = np.bincount(owner, minlength=len(strings))
    position = np.arange(owner.size) - np.repeat(np.cumsum(per_string) - per_string, per_string)
    runs = numbers.copy()
    for chain in ((position % 2 == 1), (position >= 2) & (position % 2 == 0)):
        runs[chain] = _cumsum_by_owner(numbers[chain], owner[chain])

    bad = (lengths > _MAX_CHARS_PER_NUMBER) | (runs < 0) | (runs > _MAX_RUN)
    valid[owner[bad]] = False
    return runs, owner, valid


def _numbers(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64 numbers from their 5-bit groups (least significant first), before the sign.

    Per number, not per character: most numbers are one or two groups, so the k-th
    pass only touches the few numbers longer than k.

    Args:
        values: uint8 5-bit value of every character.
        starts, lengths: first character and number of characters of each number.
    """
    numbers = values[starts].astype(np.int64)
    for k in range(1, min(int(lengths.max()), _MAX_CHARS_PER_NUMBER)):
        longer = np.flatnonzero(lengths > k)
        numbers[longer] |= values[starts[longer] + k].astype(np.int64) << (5 * k)
    return numbers


def _cumsum_by_owner(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Cumulative sums of ``values`` restarting wherever ``owner`` (sorted) changes."""
    if values.size == 0:
        return values
    total = np.cumsum(values)
    segment_start = np.concatenate([[True], owner[1:] != owner[:-1]])
    before_segment = (total - values)[segment_start]  # the sum of everything before each segment
    return total - np.repeat(before_segment, np.diff(np.flatnonzero(np.append(segment_start, True))))


def _well_delimited(counts: str) -> bool:
    """C-level checks of one string: ascii, every character in the encoding's range, the last one ending a number."""
    if not counts:
        return True
    return (
        counts.isascii()
        and min(counts) >= chr(_FIRST_CHAR)
        and max(counts) <= chr(_LAST_CHAR)
        and not (ord(counts[-1]) - _FIRST_CHAR) & _MORE
    )


def rle_problem(segmentation: dict, height: int, width: int, decode_strings: bool = True) -> str | None:
    """Why an RLE segmentation of a ``height x width`` image is unusable, or ``None`` if it is fine.

    Args:
        segmentation: the annotation's ``segmentation`` dict.
        height, width: the image's size, from the json.
        decode_strings: decode a compressed string's runs here. ``False`` leaves them
            to the caller, who checks many strings at once with
            :func:`compressed_rle_totals` (five times faster than one at a time).

    Returns:
        A skip reason: a malformed RLE (no ``counts`` or ``size``, values of the wrong
        types, negative or undecodable runs), a size other than the image's, or runs
        that do not add up to ``height * width``.
    """
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(s) is int for s in size)):
        return "malformed RLE segmentation"
    if size != [height, width]:
        return "RLE size differs from the image size"
    if isinstance(counts, list):
        # bool is an int subclass but not a run length; type() in C, as for polygons.
        if not set(map(type, counts)) <= {int} or (counts and min(counts) < 0):
            return "malformed RLE segmentation"
        total = sum(counts)
    elif isinstance(counts, str):
        if not decode_strings:
            return None
        total = int(compressed_rle_totals([counts])[0])
        if total < 0:
            return "malformed RLE segmentation"
    else:
        return "malformed RLE segmentation"
    if total != height * width:
        return "RLE runs do not add up to the image size"
    return None
