"""Shared fixtures: repository root on sys.path, tiny synthetic ImageFolder data, one torch thread per module."""
import os
import random
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO_ROOT, "tests", "data")
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import util.env_setup  # noqa: E402,F401  (GOMP_SPINCOUNT before torch, inherited by the scripts tests start)
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

SHAPES = ("ellipse", "rectangle", "triangle", "stripes")


def draw_shape_image(shape, size, rng):
    """A random-coloured background with one large shape of a random colour at a random place."""
    background = tuple(rng.randrange(0, 256) for _ in range(3))
    foreground = tuple((c + 128 + rng.randrange(-40, 40)) % 256 for c in background)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.7) * size
    x0, y0 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "ellipse":
        draw.ellipse(box, fill=foreground)
    elif shape == "rectangle":
        draw.rectangle(box, fill=foreground)
    elif shape == "triangle":
        draw.polygon([(x0, y0 + extent), (x0 + extent / 2, y0), (x0 + extent, y0 + extent)], fill=foreground)
    else:
        period = max(2, int(size / 8))
        for x in range(0, size, 2 * period):
            draw.rectangle((x, 0, x + period - 1, size), fill=foreground)
    return image


def write_image_folder(root, splits=(("train", 8), ("val", 4)), num_classes=4, size=64, seed=0):
    """root/{split}/{class}/{k}.png for each split, deterministic from seed. Returns root."""
    rng = random.Random(seed)
    for split, per_class in splits:
        for label in range(num_classes):
            folder = os.path.join(root, split, f"class_{label}_{SHAPES[label % len(SHAPES)]}")
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                draw_shape_image(SHAPES[label % len(SHAPES)], size, rng).save(os.path.join(folder, f"{k:04d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a shared 2-core machine two threads per process collapse under
    load, and in-process runs then do the same float arithmetic as the subprocess runs (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_config(tmp_path_factory):
    """A 32-pixel tokenizer config (train_support.write_tokenizer_config) in a temporary folder."""
    from train_support import write_tokenizer_config
    return write_tokenizer_config(str(tmp_path_factory.mktemp("config")))


@pytest.fixture
def image_folder(tmp_path):
    """A 4-class ImageFolder (train 8/class, val 4/class, 64x64) in a temporary folder."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity InceptionV3 state dict in a file (96 MB): the real extractor's names
    and shapes, so the Inception path of FID runs offline (the numbers mean nothing)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    model = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    path = folder / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)
