"""Fine-tuning augmentation: every RandAugment op of the reference recipe runs on current libraries and gives the
reference's results at the magnitude extremes; --aa none; a fine-tuning run over a few hundred images."""
import copy
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from timm.data.auto_augment import RandAugment

import main_finetune
from util.errors import UsageError
from train_support import parse, write_tokenizer_config
from util import datasets
from util.synthetic_data import generate

RECIPE = "rand-m9-mstd0.5-inc1"
# The ops of rand-*-inc1 (timm's _RAND_INCREASING_TRANSFORMS, the same list in timm 0.3.2 and 1.0).
RECIPE_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def finetune_argv(*extra):
    return ["--input_size", "32", "--data_path", "unused", *map(str, extra)]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A photo-like RGB image (gradients, shapes, sensor noise; JPEG) read by the training data reader."""
    folder = tmp_path_factory.mktemp("photo") / "class_0"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:48]
    pixels = np.stack([40 + 4 * x, 30 + 5 * y, 200 - 2 * (x + y)], -1) + rng.normal(0, 12, (40, 48, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 6, 30, 28), fill=(230, 200, 40))
    draw.rectangle((28, 20, 44, 36), fill=(20, 40, 120))
    image.save(folder / "0.jpg", quality=90)
    return datasets.SeededImageFolder(str(folder.parent), None).load_image(0)[0]


def recipe_rand_augment(*extra):
    transform = datasets.finetune_train_transform(parse(main_finetune, finetune_argv(*extra)))
    [rand_augment] = [step for step in transform.transforms if isinstance(step, RandAugment)]
    return rand_augment


def fixed(op, magnitude, magnitude_std=0.0):
    """A copy of the recipe's op that always applies, at `magnitude` (with noise `magnitude_std`)."""
    op = copy.copy(op)
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, magnitude_std
    return op


def test_recipe_has_the_reference_ops_at_magnitude_9_with_noise_and_reference_fill():
    rand_augment = recipe_rand_augment()
    assert tuple(op.name for op in rand_augment.ops) == RECIPE_OPS
    assert rand_augment.num_layers == 2
    for op in rand_augment.ops:
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 9, 0.5, None)
        assert op.kwargs["fillcolor"] == (124, 116, 104)  # the ImageNet mean, as in the reference
        assert op.kwargs["resample"] == Image.BICUBIC


@pytest.mark.parametrize("magnitude", [0, 10])
def test_every_recipe_op_runs_at_the_magnitude_extremes(photo, magnitude):
    for op in recipe_rand_augment().ops:
        for seed in range(2):  # both signs of the signed ops (rotate, shear, translate, enhance)
            random.seed(seed)
            result = fixed(op, magnitude)(photo)
            assert result.mode == "RGB" and result.size == photo.size, op.name


def test_every_recipe_op_runs_under_the_noisy_magnitude_draw(photo):
    """m9 with mstd 0.5 clamps draws above 10 to 10: about 2 % of draws, so 300 draws reach it."""
    for op in recipe_rand_augment().ops:
        random.seed(0)
        results = [np.asarray(fixed(op, 9, 0.5)(photo)) for _ in range(300)]
        if op.name == "PosterizeIncreasing":
            assert any(not result.any() for result in results)  # some draws hit 10: 0 bits, a black image


@pytest.mark.parametrize("magnitude, bits", [(0, 4), (2.5, 3), (5, 2), (7.5, 1), (9, 1), (10, 0)])
def test_posterize_keeps_the_reference_bits_and_0_bits_is_black(photo, magnitude, bits):
    """PosterizeIncreasing keeps 4 - int(m / 10 * 4) bits. Pillow <= 12 computed `pixel & mask` for 0 bits too
    (a black image), as the reference saw; Pillow 13 raises for 0 bits."""
    [op] = [op for op in recipe_rand_augment().ops if op.name == "PosterizeIncreasing"]
    mask = 0xFF & ~(2 ** (8 - bits) - 1)
    expected = np.asarray(photo) & mask
    assert np.array_equal(np.asarray(fixed(op, magnitude)(photo)), expected)
    if bits == 0:
        assert not expected.any()


def test_autoaugment_v0_posterize_at_0_bits_is_black(photo):
    """AutoAugment 'v0' has ('Posterize', 0.8, 2), 0 bits by its design ("results in black image")."""
    transform = datasets.finetune_train_transform(parse(main_finetune, finetune_argv("--aa", "v0")))
    [auto_augment] = [step for step in transform.transforms if hasattr(step, "policy")]
    posterize = next(op for sub_policy in auto_augment.policy for op in sub_policy if op.name == "Posterize")
    assert not np.asarray(fixed(posterize, 2)(photo)).any()


def test_the_default_train_transform_runs_on_many_draws(photo):
    transform = datasets.finetune_train_transform(parse(main_finetune, finetune_argv()))
    for seed in range(200):
        with datasets.seeded_rng(seed):
            assert transform(photo).shape == (3, 32, 32)


@pytest.mark.parametrize("off", ["none", "None", ""])
def test_aa_none_turns_rand_augment_off(off):
    args = parse(main_finetune, finetune_argv("--aa", off))
    transform = datasets.finetune_train_transform(args)
    assert not any(isinstance(step, RandAugment) for step in transform.transforms)
    assert "none" in main_finetune.get_args_parser().format_help()


def test_unknown_aa_policy_is_a_usage_error(tmp_path):
    for split in ("train", "val"):
        os.makedirs(tmp_path / split)
    args = parse(main_finetune, ["--data_path", str(tmp_path), "--aa", "rand-m9-x3"])
    with pytest.raises(UsageError, match="--aa 'rand-m9-x3'"):
        main_finetune.check_args(args)


@pytest.mark.slow
def test_finetuning_400_images_with_the_default_augmentation_completes(tmp_path, monkeypatch):
    """8 classes x 50 32-pixel images, one epoch with the default --aa/--reprob. With --seed 0 an image of this
    epoch draws 0-bit posterize (about 1 image in 660 does), where Pillow 13 raised before."""
    import models_mage
    data = tmp_path / "data"
    generate(str(data), num_train=50, num_val=4, size=32)
    config = write_tokenizer_config(str(tmp_path))
    torch.manual_seed(0)
    checkpoint = tmp_path / "mage.pth"
    torch.save({"model": models_mage.mage_vit_tiny_patch16(vqgan_config=config).state_dict()}, checkpoint)
    argv = ["--model", "vit_tiny_patch16", "--vqgan_config", config, "--input_size", "32",
            "--data_path", str(data), "--finetune", str(checkpoint), "--nb_classes", "8", "--batch_size", "32",
            "--epochs", "1", "--warmup_epochs", "0", "--output_dir", str(tmp_path / "out"), "--log_dir", "",
            "--amp", "none", "--num_workers", "0", "--device", "cpu", "--seed", "0"]
    args = parse(main_finetune, argv)
    assert args.aa == RECIPE and args.reprob == 0.25

    zero_bit_draws = []
    posterize = datasets._posterize_0_bits_black

    def counting_posterize(img, bits_to_keep, **kwargs):  # counts, then runs the project's op
        zero_bit_draws.extend([bits_to_keep] if bits_to_keep <= 0 else [])
        return posterize(img, bits_to_keep, **kwargs)

    monkeypatch.setattr(datasets, "_posterize_0_bits_black", counting_posterize)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main_finetune.main(args)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "out" / "checkpoint-last.pth").exists()
    assert zero_bit_draws  # the run met the case that crashed
