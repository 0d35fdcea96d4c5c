"""The one image decoder: sizes and pixels as a browser shows them (EXIF orientation applied), within a pixel cap.

Prediction, dataset building and evaluation all read images here, so a phone photo stored sideways with an
orientation tag has the same upright size and pixels everywhere, and a file that is not an image, or one whose
header claims more pixels than MAX_IMAGE_PIXELS, is refused before any pixel is decoded.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # EXIF tag
# How stored pixels become upright for each EXIF orientation, as browsers and ImageOps.exif_transpose turn them.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
DEFAULT_MAX_PIXELS = 50_000_000

_max_pixels = DEFAULT_MAX_PIXELS


class ImageError(ValueError):
    """A file we will not decode: not an image, unreadable, or too many pixels; the message says which."""


@dataclass(frozen=True)
class ImageInfo:
    """An image's upright size, its EXIF orientation (1 = stored upright) and its file format."""

    width: int
    height: int
    orientation: int
    format: str

    @property
    def rotated(self) -> bool:
        return self.orientation in UPRIGHT


def set_max_pixels(limit: int) -> None:
    """The process-wide cap (MAX_IMAGE_PIXELS); Pillow's own bomb check is aligned with it."""
    global _max_pixels
    _max_pixels = max(1, int(limit))
    Image.MAX_IMAGE_PIXELS = _max_pixels


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image with only its header read, refused when its dimensions exceed the cap."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{Path(path).name} has more pixels than MAX_IMAGE_PIXELS={_max_pixels}") from exc
    except (OSError, ValueError, SyntaxError, ImportError) as exc:
        # ImportError: Ultralytics' Image.open looks for an optional HEIF plugin on unknown files; it is not installed
        raise ImageError(f"{Path(path).name} is not a readable image") from exc
    with image:
        width, height = image.size
        if width * height > _max_pixels:
            raise ImageError(f"{Path(path).name} is {width}x{height}, more pixels than MAX_IMAGE_PIXELS={_max_pixels}")
        yield image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation from the file's header; a PNG's EXIF after its pixel data is ignored, so sizing never decodes."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError):  # a broken EXIF block: show the pixels as stored
        return 1


def probe(path: Path) -> ImageInfo:
    """The upright size and orientation from the header, without decoding pixels."""
    with _opened(path) as image:
        orientation = _orientation(image)
        width, height = image.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(width, height, orientation, (image.format or "").lower())


def upright(path: Path) -> Image.Image:
    """The decoded image in RGB, turned upright."""
    with _opened(path) as image:
        orientation = _orientation(image)
        try:
            if image.mode.startswith("I"):  # 16/32-bit grey: keep the high byte, as OpenCV does
                rgb = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)).convert("RGB")
            else:
                rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{Path(path).name} is not a readable image: {exc}") from exc
    return rgb.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else rgb


def read_image(path: Path) -> np.ndarray:
    """The upright pixels in BGR, the order Ultralytics expects of arrays."""
    return cv2.cvtColor(np.asarray(upright(path)), cv2.COLOR_RGB2BGR)


def write_upright(path: Path, target: Path) -> Path:
    """A lossless upright copy (PNG) for readers that do not apply EXIF orientation the way we do."""
    target = target.with_suffix(".png")
    upright(path).save(target, format="PNG", compress_level=1)
    return target
