"""FID / IS (and optional KID, precision/recall) between two image folders with torch-fidelity's Python API.

The real metric uses torch-fidelity's `inception-v3-compat` extractor, whose weights torch-fidelity downloads
on first use; `resolve_inception_weights` finds a local copy (given path or torch hub cache) or downloads it,
builds the extractor from it, and fails with one line of instructions when the file is missing or not
torch-fidelity's InceptionV3 state dict, so that scripts can call it before generating anything. `PixelStatsFeatureExtractor` is a tiny fixed extractor
registered through torch-fidelity's own registry, for offline smoke tests of the pipeline (not a real FID).
"""
import os

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from util.checkpoint import load_checkpoint
from util.errors import CheckpointError, TrainingError

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
    before torch-fidelity loads it, then torch-fidelity's extractor is built from it (a few seconds on a CPU),
    so wrong weights are found here and not after generation. Raises FidWeightsError saying what is wrong
    and how to get the weights.
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
        state_dict = load_checkpoint(path)
    except CheckpointError as err:
        raise FidWeightsError(f"unusable Inception weights: {err}. " + _how_to_get_weights(url)) from None
    problem = _not_a_state_dict(state_dict)
    if problem is None:
        try:
            _CheckedInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=path)
        except _WrongInceptionKeys as err:
            problem = str(err)
    if problem is not None:
        raise FidWeightsError(f"unusable Inception weights '{path}': {problem}. " + _how_to_get_weights(url))
    return path


def _not_a_state_dict(state_dict):
    """Why `state_dict` is not a {parameter name: tensor} dict, or None when it is one."""
    if not isinstance(state_dict, dict):
        return f"not a state dict but a {type(state_dict).__name__}"
    others = sorted(str(k) for k, v in state_dict.items() if not torch.is_tensor(v))
    if others or not state_dict:
        return (f"not a state dict (parameter name -> tensor): entries {others[:5]} are not tensors"
                if others else "an empty dict, not a state dict")
    return None


def _first(names):
    return f" (first: {sorted(names)[0]})" if names else ""


def describe_state_dict_mismatch(expected, found):
    """One line: how many keys of `expected` are missing from `found`, unexpected, or of another shape;
    None when names and shapes all match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    shape_example = ""
    if reshaped:
        name = sorted(reshaped)[0]
        shape_example = (f" (first: {name} is {tuple(found[name].shape)}, "
                         f"expected {tuple(expected[name].shape)})")
    return (f"not torch-fidelity's InceptionV3 state dict: {len(missing)} of {len(expected)} keys missing"
            f"{_first(missing)}, {len(unexpected)} unexpected{_first(unexpected)}, {len(reshaped)} with "
            f"another shape{shape_example}")


class _WrongInceptionKeys(Exception):
    pass


class _CheckedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception extractor whose (strict) weight loading first compares names and shapes and
    says in one line what does not fit, instead of torch's list of every key."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        problem = describe_state_dict_mismatch(self.state_dict(), state_dict)
        if problem is not None:
            raise _WrongInceptionKeys(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


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
