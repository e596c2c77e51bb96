"""prepare_imgnet_val.py: ImageFolder split -> Resize(256) bilinear + CenterCrop(256) PNGs, resumable."""
import os
import random

import numpy as np
import torchvision.transforms as T
from PIL import Image

import prepare_imgnet_val
from conftest import draw_shape_image


def write_val_split(root):
    """3 classes x 2 images of different non-square sizes."""
    rng = random.Random(0)
    sources = []
    for label, (width, height) in enumerate([(320, 240), (200, 300), (512, 384)]):
        folder = os.path.join(root, "val", f"n{label:08d}")
        os.makedirs(folder)
        for k in range(2):
            path = os.path.join(folder, f"img_{k}.JPEG")
            draw_shape_image("ellipse", max(width, height), rng).crop((0, 0, width, height)).save(path, format="JPEG")
            sources.append(path)
    return sources


def run(data_path, output_dir, num_workers):
    args = prepare_imgnet_val.get_args_parser().parse_args(
        ["--data_path", str(data_path), "--output_dir", str(output_dir), "--num_workers", str(num_workers)])
    prepare_imgnet_val.main(args)


def test_writes_256_pngs_like_the_reference_transform_and_resumes(tmp_path):
    sources = write_val_split(tmp_path / "imagenet")
    output_dir = tmp_path / "val256"
    run(tmp_path / "imagenet", output_dir, num_workers=2)
    names = sorted(os.listdir(output_dir))
    assert names == [f"{k:05d}.png" for k in range(len(sources))]
    reference = T.Compose([T.Resize(256), T.CenterCrop(256)])
    for name, source in zip(names, sources):
        written = Image.open(output_dir / name)
        assert written.format == "PNG" and written.size == (256, 256) and written.mode == "RGB"
        expected = np.asarray(reference(Image.open(source).convert("RGB")))
        assert np.array_equal(np.asarray(written), expected)

    # Resume: a deleted file and a partial temp file from a killed run; the others stay untouched.
    os.remove(output_dir / "00003.png")
    (output_dir / ".00004.png.123.tmp").write_bytes(b"partial")
    mtimes = {n: os.path.getmtime(output_dir / n) for n in names if n != "00003.png"}
    run(tmp_path / "imagenet", output_dir, num_workers=0)
    assert sorted(os.listdir(output_dir)) == names
    assert {n: os.path.getmtime(output_dir / n) for n in mtimes} == mtimes
    expected = np.asarray(reference(Image.open(sources[3]).convert("RGB")))
    assert np.array_equal(np.asarray(Image.open(output_dir / "00003.png")), expected)
