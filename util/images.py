"""Reading image files as 8-bit RGB (or grey) whatever their bit depth: every script reads images through here.

PIL's `convert("RGB")` clips the 16-bit and 32-bit grey modes instead of scaling them: a 16-bit grey PNG (mode
I;16) comes out almost all white. `to_8bit` scales them to 0-255 first:

- I;16, I;16L, I;16B, I;16N (16-bit grey) and I (32-bit integers, which older Pillow gives for 16-bit PNGs):
  value * 255 / 65535, rounded (values outside 0-65535 are clipped);
- F (32-bit float): 0-1 scaled to 0-255 when every value lies in [0, 1], else taken as 0-255; clipped.

16-bit RGB, RGBA and grey+alpha PNGs need nothing: Pillow already decodes them to 8-bit RGB / RGBA (the high
byte of each value, within 1/255 of the exact scaling). Alpha is dropped, as `convert("RGB")` does.
"""
import numpy as np
from PIL import Image

WIDE_GREY_MODES = ("I", "F")  # plus every "I;16..." and "I;32..." mode


def is_wide_grey(mode):
    return mode in WIDE_GREY_MODES or mode.startswith(("I;16", "I;32"))


def to_8bit(image):
    """`image` in an 8-bit mode: wide grey modes (16/32-bit integer, float) scaled to mode L, others unchanged."""
    if not is_wide_grey(image.mode):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image):
    """8-bit RGB of a PIL image of any mode."""
    return to_8bit(image).convert("RGB")


def to_grey(image):
    """8-bit grey (mode L) of a PIL image of any mode."""
    return to_8bit(image).convert("L")


def open_rgb(path):
    """Read an image file as 8-bit RGB (a PIL image, fully loaded; the file is closed)."""
    with open(path, "rb") as f, Image.open(f) as image:
        return to_rgb(image)


def image_size(path):
    """(width, height) of an image file, from its header (nothing is decoded)."""
    with open(path, "rb") as f, Image.open(f) as image:
        return image.size


def open_grey(path):
    """Read an image file as 8-bit grey (mode L), e.g. a mask."""
    with open(path, "rb") as f, Image.open(f) as image:
        return to_grey(image)
