"""16-bit images are scaled to 8 bits, not clipped, wherever the project reads images."""
import argparse
import ast
import glob
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_imgnet_val
from conftest import REPO_ROOT
from edit_img import prepare_canvas
from util.datasets import SeededImageFolder, eval_transform
from util.images import open_grey, open_rgb, to_rgb

SIDE = 24
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def write_png16(path, values):
    """A real 16-bit PNG (bit depth 16) of uint16 `values` (H, W) or (H, W, C), written with zlib: PIL cannot
    write 16-bit colour PNGs."""
    values = np.asarray(values, dtype=">u2")
    height, width = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    raw = b"".join(b"\x00" + values[y].tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))
    return str(path)


def ground_truth(channels, seed=0):
    """8-bit values (H, W, C) with every level from black to white, and the same image at 16 bits (x 257)."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, SIDE * SIDE).round().reshape(SIDE, SIDE)
    values = np.stack([gradient] + [rng.integers(0, 256, (SIDE, SIDE)) for _ in range(channels - 1)], axis=-1)
    return values.astype(np.uint8), values.astype(np.uint16) * 257


def expected_rgb(values8):
    """What an 8-bit image of these values reads as in RGB (grey replicated, alpha dropped)."""
    if values8.shape[2] <= 2:
        return np.repeat(values8[..., :1], 3, axis=2)
    return values8[..., :3]


def sixteen_bit_files(folder):
    """(path, 8-bit ground truth RGB) of 16-bit files in every mode a reader meets."""
    files = []
    for channels in (1, 2, 3, 4):
        values8, values16 = ground_truth(channels, seed=channels)
        path = write_png16(os.path.join(folder, f"png16_{channels}ch.png"), values16.squeeze(2) if channels == 1
                           else values16)
        files.append((path, expected_rgb(values8)))
    values8, values16 = ground_truth(1)
    pil_path = os.path.join(folder, "pil_I16.png")
    Image.fromarray(values16[..., 0]).save(pil_path)  # PIL writes mode I;16 as a 16-bit grey PNG
    files.append((pil_path, expected_rgb(values8)))
    float_path = os.path.join(folder, "float.tiff")
    Image.fromarray((values8[..., 0] / 255.0).astype(np.float32)).save(float_path)  # mode F in [0, 1]
    files.append((float_path, expected_rgb(values8)))
    return files


def test_16_bit_files_read_within_one_level_of_8_bit(tmp_path):
    for path, expected in sixteen_bit_files(str(tmp_path)):
        with Image.open(path) as raw:
            mode = raw.mode
        image = open_rgb(path)
        assert image.mode == "RGB" and image.size == (SIDE, SIDE)
        difference = np.abs(np.asarray(image, dtype=int) - expected.astype(int)).max()
        assert difference <= 1, f"{os.path.basename(path)} (PIL mode {mode}) differs by {difference}/255"


def test_16_bit_grey_png_is_not_clipped_to_white(tmp_path):
    """The observed failure: PIL's convert('RGB') turns a 16-bit grey image almost all white."""
    values8, values16 = ground_truth(1)
    path = tmp_path / "grey16.png"
    Image.fromarray(values16[..., 0]).save(path)
    assert (np.asarray(open_rgb(path)) == 255).mean() < 0.01
    assert np.array_equal(np.asarray(open_grey(path)), values8[..., 0])


def test_training_datasets_read_16_bit_images_correctly(tmp_path):
    """SeededImageFolder serves pre-training, the token cache, the probe, fine-tuning and the tokenizer."""
    values8, values16 = ground_truth(1)
    for name, values in (("eight", values8), ("sixteen", values16)):
        folder = tmp_path / name / "class_a"
        folder.mkdir(parents=True)
        Image.fromarray(values[..., 0]).save(folder / "0.png")  # 8-bit L and 16-bit I;16 PNGs
    transform = eval_transform(16)
    eight = SeededImageFolder(str(tmp_path / "eight"), transform)[0][0]
    sixteen = SeededImageFolder(str(tmp_path / "sixteen"), transform)[0][0]
    assert (eight - sixteen).abs().max().item() <= 1 / 255 + 1e-6


def test_fid_reference_preparation_reads_16_bit_images(tmp_path):
    values8, values16 = ground_truth(1)
    for name in ("eight", "sixteen"):
        (tmp_path / name / "val" / "class_a").mkdir(parents=True)
    Image.fromarray(values8[..., 0]).save(tmp_path / "eight" / "val" / "class_a" / "0.png")
    Image.fromarray(values16[..., 0]).save(tmp_path / "sixteen" / "val" / "class_a" / "0.png")
    for name in ("eight", "sixteen"):
        prepare_imgnet_val.main(prepare_imgnet_val.get_args_parser().parse_args(
            ["--data_path", str(tmp_path / name), "--output_dir", str(tmp_path / f"out_{name}"), "--image_size", "16",
             "--num_workers", "0"]))
    eight = np.asarray(Image.open(tmp_path / "out_eight" / "00000.png"), dtype=int)
    sixteen = np.asarray(Image.open(tmp_path / "out_sixteen" / "00000.png"), dtype=int)
    assert np.abs(eight - sixteen).max() <= 1


def test_editing_reads_16_bit_inputs_and_masks(tmp_path):
    values8, values16 = ground_truth(1)
    Image.fromarray(values8[..., 0]).save(tmp_path / "eight.png")
    Image.fromarray(values16[..., 0]).save(tmp_path / "sixteen.png")
    mask = np.full((SIDE, SIDE), 20000, dtype=np.uint16)  # 78 of 255: black
    mask[4:12, 4:12] = 40000  # 156 of 255: white; clipped instead of scaled, the whole mask would be white
    Image.fromarray(mask).save(tmp_path / "mask16.png")
    args = argparse.Namespace(mode="inpaint", box=None, mask_image=str(tmp_path / "mask16.png"))
    canvas8, region8 = prepare_canvas(args, str(tmp_path / "eight.png"), 16)
    canvas16, region16 = prepare_canvas(args, str(tmp_path / "sixteen.png"), 16)
    assert (canvas8 - canvas16).abs().max().item() <= 1 / 255 + 1e-6
    assert torch.equal(region8, region16) and 0 < region16.float().mean().item() < 0.5


def test_no_script_reads_images_around_the_helper():
    """Every image file is read through util/images.py: no Image.open or convert('RGB') elsewhere."""
    offenders = []
    for path in glob.glob(os.path.join(REPO_ROOT, "*.py")) + glob.glob(os.path.join(REPO_ROOT, "util", "*.py")):
        if path.endswith(os.path.join("util", "images.py")):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                is_open = node.func.attr == "open" and getattr(node.func.value, "id", "") == "Image"
                is_convert = node.func.attr == "convert" and any(
                    isinstance(a, ast.Constant) and a.value in ("RGB", "L") for a in node.args)
                if is_open or is_convert:
                    offenders.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"read images with util.images.open_rgb / open_grey / to_rgb instead: {offenders}"


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_grey_modes_in_memory(mode):
    values8, values16 = ground_truth(1)
    grey16 = values16[..., 0]
    if mode == "I;16B":
        image = Image.frombytes(mode, (SIDE, SIDE), grey16.astype(">u2").tobytes())
    elif mode == "I":
        image = Image.fromarray(grey16.astype(np.int32))
    elif mode == "F":
        image = Image.fromarray((grey16 / 65535).astype(np.float32))
    else:
        image = Image.fromarray(grey16)
    assert image.mode == mode
    assert np.abs(np.asarray(to_rgb(image), dtype=int)[..., 0] - values8[..., 0]).max() <= 1
