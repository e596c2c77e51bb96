"""FID / IS (and optional KID, precision/recall) between two image folders with torch-fidelity's Python API.

The real metric uses torch-fidelity's `inception-v3-compat` extractor, whose weights torch-fidelity downloads
on first use; `resolve_inception_weights` finds a local copy (given path or torch hub cache) or downloads it,
and fails with instructions when neither works. `PixelStatsFeatureExtractor` is a tiny fixed extractor
registered through torch-fidelity's own registry, for offline smoke tests of the pipeline (not a real FID).
"""
import os

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from util.checkpoint import CheckpointError, load_checkpoint
from util.misc import TrainingError

INCEPTION = "inception-v3-compat"
PIXEL_STATS = "mage-pixel-stats"


class FidWeightsError(TrainingError):
    """The Inception weights are neither on disk nor downloadable."""


def inception_cache_path():
    """Where torch-fidelity (torch hub) keeps the downloaded Inception weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def _how_to_get_weights(url):
    return (f"On a machine with network access download {url} (e.g. `wget {url}`), copy it here and pass "
            f"--fid_weights /path/to/{os.path.basename(url)}, or put it at {inception_cache_path()} "
            f"(the torch hub cache; set TORCH_HOME to move it).")


def resolve_inception_weights(weights_path=None, url=URL_INCEPTION_V3):
    """Path of a usable Inception weights file: `weights_path`, else the hub cache, else a fresh download.

    The file is read once with weights_only=True (util.checkpoint) so an unsafe or corrupt file is refused
    before torch-fidelity loads it. Raises FidWeightsError saying how to get the weights.
    """
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FidWeightsError(f"--fid_weights '{weights_path}' does not exist. " + _how_to_get_weights(url))
        path = weights_path
    else:
        path = inception_cache_path()
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(url, path, progress=True)
            except Exception as err:  # any network or filesystem failure means the same thing to the user
                raise FidWeightsError(f"cannot download the Inception weights for FID/IS ({type(err).__name__}: "
                                      f"{err}). " + _how_to_get_weights(url)) from None
    try:
        load_checkpoint(path)
    except CheckpointError as err:
        raise FidWeightsError(f"unusable Inception weights: {err}. " + _how_to_get_weights(url)) from None
    return path


class PixelStatsFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """Offline stand-in for Inception: 8 pixel statistics per image (RGB mean, RGB std, mean |dx|, mean |dy|)
    as 'stats', and a fixed linear map of them to 10 'logits' for IS. Only for tests and smoke runs."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        projection = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)) * 4.0
        self.register_buffer("projection", projection)

    @staticmethod
    def get_provided_features_list():
        return "stats", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "stats", "kid": "stats", "prc": "stats"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x):
        # x: (B, 3, H, W) uint8
        x = F.interpolate(x.float() / 255.0, size=(64, 64), mode="area")
        grad_x = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        grad_y = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        stats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), grad_x[:, None], grad_y[:, None]], dim=1)
        features = {"stats": stats, "logits": stats @ self.projection}
        return tuple(features[name] for name in self.features_list)


def register_pixel_stats_extractor():
    """Register PixelStatsFeatureExtractor with torch-fidelity (idempotent). Returns its name."""
    if PIXEL_STATS not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(PIXEL_STATS, PixelStatsFeatureExtractor)
    return PIXEL_STATS


def count_images(folder, recursive=False):
    names = [n for _, _, files in os.walk(folder) for n in files] if recursive else os.listdir(folder)
    return sum(1 for name in names if name.lower().endswith((".png", ".jpg", ".jpeg")))


def compute_metrics(generated_dir, reference_dir, device="cpu", isc=True, fid=True, kid=False, prc=False,
                    weights_path=None, feature_extractor=INCEPTION, batch_size=64, verbose=False, recursive=False):
    """torch_fidelity.calculate_metrics on two image folders -> {metric name: float}; flat folders, or with
    recursive=True the images of their subfolders too (e.g. one folder per class).

    With the Inception extractor the weights come from `resolve_inception_weights(weights_path)`; precision /
    recall then use the same Inception pool features (torch-fidelity's default for them would be VGG-16).
    """
    for folder in (generated_dir, reference_dir):
        if not os.path.isdir(folder) or count_images(folder, recursive) == 0:
            raise FileNotFoundError(f"'{folder}' is not a folder of PNG/JPEG images")
    kwargs = dict(input1=generated_dir, input2=reference_dir, cuda=torch.device(device).type == "cuda",
                  isc=isc, fid=fid, kid=kid, prc=prc, batch_size=batch_size, verbose=verbose, cache=False,
                  samples_find_deep=recursive, feature_extractor=feature_extractor)
    if feature_extractor == INCEPTION:
        kwargs["feature_extractor_weights_path"] = resolve_inception_weights(weights_path)
        kwargs["feature_layer_prc"] = "2048"
    elif feature_extractor == PIXEL_STATS:
        register_pixel_stats_extractor()
    kwargs["isc_splits"] = min(10, count_images(generated_dir, recursive))
    if kid:
        smallest = min(count_images(generated_dir, recursive), count_images(reference_dir, recursive))
        kwargs["kid_subset_size"] = min(1000, smallest)
    metrics = torch_fidelity.calculate_metrics(**kwargs)
    return {name: float(value) for name, value in metrics.items()}
