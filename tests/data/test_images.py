"""The shared image reader: EXIF orientation, 16-bit scaling, sizes (bad images: test_bad_input.py)."""

import numpy as np
import pytest
from PIL import Image

from mrcnn.data.images import UnsupportedImageError, read_image, read_image_size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_upright(tmp_path, orientation):
    """Each orientation's file reads as Pillow's exif_transpose shows it; sizes swap for 5-8."""
    stored = (np.arange(6 * 10 * 3).reshape(6, 10, 3) * 5 % 251).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = {
        1: stored,
        2: stored[:, ::-1],
        3: stored[::-1, ::-1],
        4: stored[::-1],
        5: stored.transpose(1, 0, 2),
        6: np.rot90(stored, k=-1),
        7: stored[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(stored, k=1),
    }[orientation]
    np.testing.assert_array_equal(read_image(path), upright)
    assert read_image_size(path) == upright.shape[:2]


def test_16bit_grayscale_keeps_its_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    pixels = read_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 5, 3)
    assert pixels[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    assert (pixels == pixels[:, :, :1]).all()


def test_32bit_integer_image_is_refused(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.arange(12, dtype=np.int32).reshape(3, 4) * 100_000).save(path)
    with pytest.raises(UnsupportedImageError, match=r"wide\.tif is a 32-bit integer TIFF image \(PIL mode I\)"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.jpg"):
        read_image(tmp_path / "nope.jpg")
