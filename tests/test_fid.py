"""FID/IS through torch-fidelity (util/fid.py): offline with a registered small extractor; Inception if present."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from conftest import draw_shape_image
from util.fid import (FidWeightsError, PIXEL_STATS, PixelStatsFeatureExtractor, compute_metrics,
                      inception_cache_path, register_pixel_stats_extractor, resolve_inception_weights)


def write_shapes(folder, seed, count=20, size=64):
    os.makedirs(folder)
    rng = random.Random(seed)
    for k in range(count):
        draw_shape_image(("ellipse", "rectangle")[k % 2], size, rng).save(os.path.join(folder, f"{k:05d}.png"))
    return str(folder)


def write_noise(folder, seed, count=20, size=64):
    os.makedirs(folder)
    rng = np.random.RandomState(seed)
    for k in range(count):
        Image.fromarray((rng.rand(size, size, 3) * 80).astype(np.uint8)).save(os.path.join(folder, f"{k:05d}.png"))
    return str(folder)


def test_small_extractor_is_registered_through_torch_fidelity():
    assert register_pixel_stats_extractor() == PIXEL_STATS
    assert register_pixel_stats_extractor() == PIXEL_STATS  # idempotent
    assert FEATURE_EXTRACTORS_REGISTRY[PIXEL_STATS] is PixelStatsFeatureExtractor


def test_fid_against_itself_is_zero_and_against_a_different_folder_large(tmp_path):
    shapes = write_shapes(tmp_path / "shapes", seed=0)
    more_shapes = write_shapes(tmp_path / "more_shapes", seed=1)
    noise = write_noise(tmp_path / "noise", seed=2)
    same = compute_metrics(shapes, shapes, feature_extractor=PIXEL_STATS, kid=True, prc=True)
    similar = compute_metrics(shapes, more_shapes, feature_extractor=PIXEL_STATS)
    different = compute_metrics(shapes, noise, feature_extractor=PIXEL_STATS, kid=True, prc=True)
    fid = "frechet_inception_distance"
    assert abs(same[fid]) < 1e-6
    assert different[fid] > 10 * similar[fid] > 0
    assert same["precision"] == 1.0 and different["precision"] == 0.0
    assert different["kernel_inception_distance_mean"] > same["kernel_inception_distance_mean"]


def test_inception_score_is_one_for_identical_images_and_higher_for_varied_ones(tmp_path):
    """IS is measured on the first (generated) folder: copies of one image have one class distribution."""
    shapes = write_shapes(tmp_path / "shapes", seed=0)
    copies = tmp_path / "copies"
    os.makedirs(copies)
    for k in range(20):
        shutil.copy(os.path.join(shapes, "00000.png"), copies / f"{k:05d}.png")
    identical = compute_metrics(str(copies), shapes, feature_extractor=PIXEL_STATS, fid=False)
    varied = compute_metrics(shapes, str(copies), feature_extractor=PIXEL_STATS, fid=False)
    assert identical["inception_score_mean"] == pytest.approx(1.0, abs=1e-4)
    assert varied["inception_score_mean"] > 1.1  # 1.14 for these 20 shapes


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FidWeightsError, match="--fid_weights"):
        resolve_inception_weights(str(tmp_path / "missing.pth"))
    # No network: an unreachable address stands for it.
    with pytest.raises(FidWeightsError, match="cannot download.*--fid_weights"):
        resolve_inception_weights(None, url="http://127.0.0.1:9/weights-inception.pth")
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"fc": object}, unsafe)
    with pytest.raises(FidWeightsError, match="unusable"):
        resolve_inception_weights(str(unsafe))


@pytest.mark.slow
def test_weights_that_are_not_torch_fidelitys_inception_say_what_is_wrong(tmp_path, random_inception_weights):
    assert resolve_inception_weights(random_inception_weights) == random_inception_weights
    state = torch.load(random_inception_weights, weights_only=True)
    cases = {
        "wrong_keys.pth": ({"state_dict": {"a": torch.zeros(3)}}, r"not a state dict .*\['state_dict'\]"),
        "other_keys.pth": ({"a": torch.zeros(3)}, rf"{len(state)} of {len(state)} keys missing .*1 unexpected"),
        "one_missing.pth": ({k: v for k, v in state.items() if k != "fc.bias"},
                            r"1 of \d+ keys missing \(first: fc.bias\), 0 unexpected, 0 with another shape"),
        "reshaped.pth": ({**state, "fc.weight": state["fc.weight"][:10]},
                         r"0 unexpected, 1 with another shape \(first: fc.weight is \(10, 2048\), expected "
                         r"\(1008, 2048\)\)"),
        "list.pth": ([torch.zeros(1)], "not a state dict but a list"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(FidWeightsError, match=message) as error:
            resolve_inception_weights(str(tmp_path / name))
        assert "\n" not in str(error.value) and str(error.value).count("Mixed_") <= 1  # one line, no key list


def local_inception_weights():
    path = os.environ.get("MAGE_FID_WEIGHTS") or inception_cache_path()
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(local_inception_weights() is None,
                    reason="no Inception weights on disk (set MAGE_FID_WEIGHTS or put "
                           "weights-inception-2015-12-05-6726825d.pth in the torch hub cache)")
def test_real_inception_fid(tmp_path):
    shapes = write_shapes(tmp_path / "shapes", seed=0, count=12)
    noise = write_noise(tmp_path / "noise", seed=2, count=12)
    weights = local_inception_weights()
    same = compute_metrics(shapes, shapes, weights_path=weights)
    different = compute_metrics(shapes, noise, weights_path=weights)
    assert abs(same["frechet_inception_distance"]) < 0.5
    assert different["frechet_inception_distance"] > 50
