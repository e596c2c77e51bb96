"""Editing (edit_img.py): SPEC token masking, known tokens kept, masked region regenerated, outpainting canvas."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import edit_img
from conftest import draw_shape_image
from models_mage import mage_vit_tiny_patch16
from taming.models.vqgan import load_vqgan_config
from util.errors import UsageError
from util.sampling import decode_tokens, image_generators

TINY = ["--model", "mage_vit_tiny_patch16", "--random_init", "--device", "cpu", "--amp", "none",
        "--num_iter", "3"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mage_vit_tiny_patch16().eval()


def parse(*argv):
    return edit_img.get_args_parser().parse_args([*TINY, *argv])


def write_image(path, width, height, seed=0):
    image = draw_shape_image("ellipse", max(width, height), random.Random(seed)).crop((0, 0, width, height))
    image.save(path)
    return str(path)


def cells(rows, cols, grid=16):
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask.flatten()


def test_token_mask_is_overlapping_cells_plus_one_ring():
    pixel_mask = torch.zeros(1, 256, 256, dtype=torch.bool)
    pixel_mask[0, 100:116, 40:72] = True  # y 100..115 touches token rows 6, 7; x 40..71 columns 2, 3, 4
    token_mask = edit_img.token_mask_from_pixels(pixel_mask, 16)
    assert torch.equal(token_mask[0], cells((5, 9), (1, 6)))
    corner = torch.zeros(1, 256, 256, dtype=torch.bool)
    corner[0, 0, 0] = True
    assert torch.equal(edit_img.token_mask_from_pixels(corner, 16)[0], cells((0, 2), (0, 2)))


def test_known_tokens_are_kept_and_masked_tokens_regenerated(model):
    canvases = torch.stack([torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(k)) for k in range(2)])
    pixel_masks = torch.zeros(2, 256, 256, dtype=torch.bool)
    pixel_masks[0, 64:128, 64:160] = True
    pixel_masks[1, 200:256, 0:30] = True
    ids_in, token_mask, ids_out = edit_img.edit_tokens(model, canvases, pixel_masks, num_iter=4, temperature=4.5,
                                                       generator=image_generators(0, [0, 1], "cpu"))
    zeroed = canvases.clone()
    zeroed[0, :, 64:128, 64:160] = 0
    zeroed[1, :, 200:256, 0:30] = 0
    assert torch.equal(ids_in, model.tokenize(zeroed))  # masked pixels are set to 0 before tokenizing
    assert token_mask.sum(1).tolist() == [6 * 8, 5 * 3]  # rows 3..8 x cols 3..10, rows 11..15 x cols 0..2
    assert torch.equal(ids_out[~token_mask], ids_in[~token_mask])
    changed = (ids_out != ids_in)[token_mask].float().mean()
    assert changed > 0.9
    assert (ids_out < model.codebook_size).all()


def test_inpaint_script_box_and_mask_image(tmp_path):
    photo = write_image(tmp_path / "photo.png", 320, 256)
    out = tmp_path / "out"
    edit_img.main(parse("--mode", "inpaint", "--input", photo, "--box", "96", "64", "160", "128",
                        "--output_dir", str(out)))
    result = Image.open(out / "photo_inpaint.png")
    assert result.size == (256, 256)
    assert Image.open(out / "grid_inpaint.png").size == (3 * 256 + 4 * 2, 256 + 2 * 2)
    # The same region as a mask image: same masking, same seed, same result.
    mask = Image.new("L", (320, 256), 0)
    mask.paste(255, (96, 64, 160, 128))
    mask.save(tmp_path / "mask.png")
    edit_img.main(parse("--mode", "inpaint", "--input", photo, "--mask_image", str(tmp_path / "mask.png"),
                        "--output_dir", str(tmp_path / "out_mask")))
    assert open(out / "photo_inpaint.png", "rb").read() == open(tmp_path / "out_mask" / "photo_inpaint.png", "rb").read()


def test_saved_edits_are_the_decoded_images_truncated_like_generated_ones(tmp_path):
    """An edit is saved as np.clip(x * 255, 0, 255).astype(np.uint8) of the decoded image, as generated images are
    (util.generation.to_uint8): truncated, not rounded."""
    photo = write_image(tmp_path / "photo.png", 256, 256)
    args = parse("--mode", "reconstruct", "--input", photo, "--output_dir", str(tmp_path / "out"))
    saved = np.array(Image.open(edit_img.main(args)["images"][0]))
    model = edit_img.build_model(args)  # the same seeded random weights
    canvas, _ = edit_img.prepare_canvas(args, photo, 256)
    decoded = decode_tokens(model, model.tokenize(canvas[None]))[0].numpy().transpose(1, 2, 0)
    truncated = np.clip(decoded * 255, 0, 255).astype(np.uint8)
    assert (np.round(decoded * 255).astype(np.uint8) != truncated).mean() > 0.1  # rounding would not pass
    np.testing.assert_array_equal(saved, truncated)


def test_box_follows_resize_and_center_crop(tmp_path):
    photo = write_image(tmp_path / "photo.png", 640, 512)  # shorter side 512 -> 256: scale 0.5, crop x 32..288
    canvas, pixel_mask = edit_img.prepare_canvas(parse("--mode", "inpaint", "--input", photo, "--box", "64", "0",
                                                       "128", "64"), photo, 256)
    assert canvas.shape == (3, 256, 256)
    rows, cols = pixel_mask.nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 31, 0, 31)


def test_outpaint_grows_the_canvas_as_asked(model, tmp_path):
    photo = write_image(tmp_path / "photo.png", 256, 256)
    args = parse("--mode", "outpaint", "--input", photo, "--outpaint", "32", "0", "64", "16")
    canvas, pixel_mask = edit_img.prepare_canvas(args, photo, 256)
    content = torch.zeros(256, 256, dtype=torch.bool)
    content[0:240, 32:192] = True  # left 32, top 0, right 64, bottom 16
    assert torch.equal(~pixel_mask, content)
    assert (canvas[:, ~content] == 0).all() and canvas[:, content].max() > 0
    _, token_mask, ids_out = edit_img.edit_tokens(model, canvas[None], pixel_mask[None], 3, 4.5,
                                                  image_generators(0, [0], "cpu"))
    assert torch.equal(~token_mask[0], cells((0, 14), (3, 11)))  # content cells minus one ring
    edit_img.main(parse("--mode", "outpaint", "--input", photo, "--outpaint_pixels", "48",
                        "--output_dir", str(tmp_path / "out")))
    assert Image.open(tmp_path / "out" / "photo_outpaint.png").size == (256, 256)


def test_other_token_grid_and_resolution(tmp_path):
    config = load_vqgan_config("config/vqgan_tiny.yaml")
    config["ddconfig"]["resolution"] = 128
    torch.manual_seed(0)
    small = mage_vit_tiny_patch16(vqgan_config=config).eval()
    assert small.grid_size == 8
    photo = write_image(tmp_path / "photo.png", 200, 150)
    canvas, pixel_mask = edit_img.prepare_canvas(parse("--mode", "inpaint", "--input", photo, "--box", "0", "0",
                                                       "40", "40"), photo, 128)
    ids_in, token_mask, ids_out = edit_img.edit_tokens(small, canvas[None], pixel_mask[None], 3, 4.5,
                                                       image_generators(0, [0], "cpu"))
    assert ids_in.shape == (1, 64) and 0 < token_mask.sum() < 64
    assert torch.equal(ids_out[~token_mask], ids_in[~token_mask])


def test_usage_errors(tmp_path):
    photo = write_image(tmp_path / "photo.png", 64, 64)
    with pytest.raises(UsageError, match="--box"):
        edit_img.main(parse("--mode", "inpaint", "--input", photo))
    with pytest.raises(UsageError, match="outpaint margins"):
        edit_img.main(parse("--mode", "outpaint", "--input", photo, "--outpaint_pixels", "128"))
    with pytest.raises(UsageError, match="neither"):
        edit_img.main(parse("--mode", "reconstruct", "--input", str(tmp_path / "nothing.png")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UsageError, match="no images"):
        edit_img.main(parse("--mode", "reconstruct", "--input", str(tmp_path / "empty")))


def write_mask(path, width, height, white=((0, 0, 4, 4),)):
    mask = Image.new("L", (width, height), 0)
    for box in white:
        mask.paste(255, box)
    mask.save(path)
    return str(path)


def edit_error_cases(tmp_path):
    """(flags, message) of every usage error that must come as one line before anything is written."""
    photo = write_image(tmp_path / "photo.png", 32, 32)
    wide = write_image(tmp_path / "wide.png", 128, 64)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "a_file").write_text("x")
    box = ("--box", "8", "8", "24", "24")
    inpaint = ("--mode", "inpaint", "--input", photo)
    return [
        ((*inpaint, "--mask_image", str(tmp_path / "missing.png")), "--mask_image '.*missing.png' does not exist"),
        ((*inpaint, "--mask_image", str(tmp_path / "garbage.png")), "mask '.*garbage.png' is not a readable image"),
        (("--mode", "reconstruct", "--input", str(tmp_path / "garbage.png")), "cannot read image '.*garbage.png'"),
        ((*inpaint, *box, "--num_iter", "0"), "--num_iter must be >= 1, got 0"),
        ((*inpaint, *box, "--batch_size", "0"), "--batch_size must be >= 1, got 0"),
        ((*inpaint, *box, "--temp", "-1"), r"--temp must be >= 0 \(0 picks the most likely tokens\), got -1.0"),
        ((*inpaint, "--mask_image", write_mask(tmp_path / "small.png", 10, 20)),
         r"mask '.*small.png' is 10x20 but image '.*photo.png' is 32x32: give a mask of the image's size"),
        ((*inpaint, "--mask_image", write_mask(tmp_path / "black.png", 32, 32, white=())),
         "mask '.*black.png' is all black: nothing to regenerate"),
        ((*inpaint, *box, "--output_dir", str(tmp_path / "a_file")), "--output_dir '.*a_file' is a file"),
        (("--mode", "inpaint", "--input", wide, "--box", "0", "0", "10", "10"),
         "the edit region of '.*wide.png' lies outside the center crop"),
    ]


def test_usage_errors_come_as_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    for flags, message in edit_error_cases(tmp_path):
        argv = [*flags] if "--output_dir" in flags else [*flags, "--output_dir", str(out)]
        with pytest.raises(UsageError, match=message) as error:
            edit_img.main(parse(*argv))
        assert "\n" not in str(error.value)
        assert not out.exists(), flags


def test_mask_of_the_same_aspect_ratio_is_resized(tmp_path):
    photo = write_image(tmp_path / "photo.png", 64, 32)
    mask = write_mask(tmp_path / "half.png", 32, 16, white=((0, 0, 16, 16),))  # left half, at half the size
    _, region = edit_img.prepare_canvas(parse("--mode", "inpaint", "--input", photo, "--mask_image", mask), photo, 32)
    assert 0.2 < region.float().mean().item() < 0.8


def test_outpaint_pixels_and_per_side_margins_together_are_refused(tmp_path, capsys):
    photo = write_image(tmp_path / "photo.png", 64, 64)
    with pytest.raises(SystemExit) as exit_info:
        parse("--mode", "outpaint", "--input", photo, "--outpaint_pixels", "4", "--outpaint", "0", "0", "8", "0")
    assert exit_info.value.code == 2
    assert "--outpaint: not allowed with argument --outpaint_pixels" in capsys.readouterr().err
