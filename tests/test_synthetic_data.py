"""The built-in dataset: deterministic ImageFolder with the advertised classes, sizes and difficulty."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from util.synthetic_data import (BACKGROUND_COLOURS, CLASSES, LUMA, MIN_CONTRAST, OBJECT_COLOURS, fit_linear_probe,
                                 generate, image_rng, load_split_arrays, render_image)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def folder_digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".png"):
                with Image.open(os.path.join(folder, name)) as image:
                    digest.update(name.encode() + np.asarray(image).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=6, num_val=3, size=32, seed=0)
    return root


def test_layout_classes_and_sizes(dataset):
    for split, per_class in (("train", 6), ("val", 3)):
        folder = ImageFolder(os.path.join(dataset, split))
        assert folder.classes == [f"{k}_{name}" for k, name in enumerate(CLASSES)]  # ImageFolder label k is CLASSES[k]
        assert np.bincount(folder.targets).tolist() == [per_class] * len(CLASSES)
        for path, _ in folder.samples:
            with Image.open(path) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    with open(os.path.join(dataset, "dataset.json")) as f:
        assert json.load(f)["classes"] == folder.classes


def test_deterministic_from_seed(dataset, tmp_path):
    generate(tmp_path / "same", num_train=6, num_val=3, size=32, seed=0)
    generate(tmp_path / "other", num_train=6, num_val=3, size=32, seed=1)
    assert folder_digest(tmp_path / "same") == folder_digest(dataset)
    assert folder_digest(tmp_path / "other") != folder_digest(dataset)


def test_rerun_with_same_settings_is_a_no_op(dataset):
    before = os.path.getmtime(os.path.join(dataset, "train", "0_disc", "00000.png"))
    generate(dataset, num_train=6, num_val=3, size=32, seed=0)
    assert os.path.getmtime(os.path.join(dataset, "train", "0_disc", "00000.png")) == before


def test_images_vary_within_a_class():
    images = [np.asarray(render_image(0, 32, image_rng(0, "train", 0, k)), dtype=float) for k in range(8)]
    mean_colours = np.array([image.mean(axis=(0, 1)) for image in images])
    assert mean_colours.std(axis=0).min() > 10  # colour varies
    assert all(np.abs(a - b).mean() > 10 for a, b in zip(images, images[1:]))


def test_flat_palette_colours_with_a_lighter_object():
    """Backgrounds are one flat palette colour and objects a lighter palette colour: the tokenizer then needs
    one code per flat region instead of a spread of shades."""
    backgrounds, objects = set(), set()
    for k in range(40):
        image = np.asarray(render_image(0, 32, image_rng(0, "train", 0, k)), dtype=float).reshape(-1, 3)
        colours, counts = np.unique(image, axis=0, return_counts=True)
        background, fill = colours[counts.argmax()], image[np.abs(image - colours[counts.argmax()]).sum(1).argmax()]
        assert counts.max() > 0.5 * len(image)  # a flat background covers most of a disc image
        assert any((background == c).all() for c in BACKGROUND_COLOURS)
        assert any((fill == c).all() for c in OBJECT_COLOURS)
        assert (fill - background) @ LUMA >= MIN_CONTRAST
        backgrounds.add(tuple(background))
        objects.add(tuple(fill))
    assert len(backgrounds) >= 4 and len(objects) >= 4


@pytest.mark.parametrize("name", ["stripes", "half"])
def test_rotations_are_multiples_of_45_degrees(name):
    """Edges run horizontally, vertically or diagonally, so that a 4x4-pixel token grid can continue them:
    a stripes or half image is unchanged by a one-pixel shift along one of those four directions."""
    label = CLASSES.index(name)
    for k in range(20):
        image = np.asarray(render_image(label, 32, image_rng(0, "train", label, k)), dtype=float)
        shifts = [image[1:, :] - image[:-1, :], image[:, 1:] - image[:, :-1],
                  image[1:, 1:] - image[:-1, :-1], image[1:, :-1] - image[:-1, 1:]]
        assert min(np.abs(shift).mean() for shift in shifts) < 0.5


def test_raw_pixel_probe_is_far_from_perfect(tmp_path):
    """The dataset is not solvable from raw pixels by a linear model (it is by shape-aware features)."""
    generate(tmp_path, num_train=80, num_val=20, size=32, seed=0)
    accuracy, _ = fit_linear_probe(*load_split_arrays(tmp_path, "train"), *load_split_arrays(tmp_path, "val"),
                                   weight_decays=(1e-2,))
    assert 1.0 / len(CLASSES) < accuracy < 0.75


def test_regenerating_with_other_settings_replaces_the_images(tmp_path):
    generate(tmp_path, num_train=4, num_val=2, size=16, seed=0)
    generate(tmp_path, num_train=2, num_val=1, size=16, seed=0)
    assert np.bincount(ImageFolder(os.path.join(tmp_path, "train")).targets).tolist() == [2] * len(CLASSES)
