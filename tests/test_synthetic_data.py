"""The built-in dataset: deterministic ImageFolder with the advertised classes, sizes and difficulty."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from util.synthetic_data import CLASSES, fit_linear_probe, generate, image_rng, load_split_arrays, render_image


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
    assert len(CLASSES) >= 6
    for split, per_class in (("train", 6), ("val", 3)):
        folder = ImageFolder(os.path.join(dataset, split))
        assert len(folder.classes) == len(CLASSES)
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
