"""The built-in dataset: procedural shapes and textures written as a labelled ImageFolder (train/ and val/).

Each class differs in what a tokenizer can see (shape, count, texture or layout); position, scale, rotation
(in steps of 45 degrees), the object colour (8 colours) and the flat background colour (6 colours) vary at
random, so a linear classifier on raw pixels does clearly worse than one on features that know about shapes.
Every image is a pure function of (seed, split, class, index): rerunning writes the same files, and any subset
can be regenerated alone.

    python -m util.synthetic_data --output_dir data/shapes            # 8 classes, 32x32, 500/60 per class
    python -m util.synthetic_data --output_dir data/shapes --baseline # also fit the raw-pixel linear probe
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from util.images import open_rgb

CLASSES = ("disc", "square", "triangle", "ring", "cross", "pair", "stripes", "half")
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges instead of jagged ones
INFO_FILE = "dataset.json"
ANGLES = 8  # rotations in steps of 45 degrees: edges a 4x4-pixel token grid can continue in a straight line


LUMA = np.array([0.299, 0.587, 0.114])
# Flat colours from small palettes: with continuous colours and gradients the tokenizer spends its codes on
# shades, and MAGE its training on learning them (measured in the README's demo section).
OBJECT_COLOURS = np.array([[230, 60, 50], [250, 200, 40], [60, 190, 80], [70, 130, 240], [240, 240, 240],
                           [200, 90, 220], [250, 140, 30], [90, 220, 220]], dtype=float)
BACKGROUND_COLOURS = np.array([[20, 20, 30], [40, 60, 110], [90, 30, 40], [30, 80, 50], [100, 100, 100],
                               [70, 40, 100]], dtype=float)
MIN_CONTRAST = 60.0  # luma: objects are always lighter than their background


def _colours(rng):
    """(background, object) colours: a random pair from the palettes with the object at least MIN_CONTRAST
    brighter. With random polarity too, a raw-pixel linear probe would fall to near chance."""
    background = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
    lighter = OBJECT_COLOURS[(OBJECT_COLOURS - background) @ LUMA >= MIN_CONTRAST]
    return background, lighter[rng.integers(len(lighter))]


def _rotated(points, center, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(center[0] + c * x - s * y, center[1] + s * x + c * y) for x, y in points]


def _regular_polygon(center, radius, sides, angle):
    return [(center[0] + radius * math.cos(angle + 2 * math.pi * k / sides),
             center[1] + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def _disc(draw, center, radius, fill):
    x, y = center
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)


def _draw_shape(name, draw, size, rng):
    """Draw the class's content as white (255) on a black (size x size) mask, `size` already supersampled."""
    fill, hole = 255, 0
    radius = rng.uniform(0.2, 0.36) * size
    jitter = min(size / 2 - radius * 1.05, 0.2 * size)
    center = (size / 2 + rng.uniform(-jitter, jitter), size / 2 + rng.uniform(-jitter, jitter))
    angle = rng.integers(ANGLES) * 2 * math.pi / ANGLES
    if name == "disc":
        _disc(draw, center, radius * 0.85, fill)
    elif name == "square":
        draw.polygon(_regular_polygon(center, radius, 4, angle), fill=fill)
    elif name == "triangle":
        draw.polygon(_regular_polygon(center, radius, 3, angle), fill=fill)
    elif name == "ring":
        _disc(draw, center, radius, fill)
        _disc(draw, center, radius * rng.uniform(0.45, 0.6), hole)
    elif name == "cross":
        arm = radius * rng.uniform(0.5, 0.65)
        bar = [(-radius, -arm / 2), (radius, -arm / 2), (radius, arm / 2), (-radius, arm / 2)]
        draw.polygon(_rotated(bar, center, angle), fill=fill)
        draw.polygon(_rotated(bar, center, angle + math.pi / 2), fill=fill)
    elif name == "pair":
        small = rng.uniform(0.1, 0.15) * size
        first = (rng.uniform(small, size - small), rng.uniform(small, size - small))
        for _ in range(100):
            second = (rng.uniform(small, size - small), rng.uniform(small, size - small))
            if math.dist(first, second) > 2.6 * small:
                break
        _disc(draw, first, small, fill)
        _disc(draw, second, small, fill)
    elif name == "stripes":
        period = rng.uniform(0.45, 0.6) * size
        x = rng.uniform(0, period) - size  # coordinates relative to the image centre, before rotation
        while x < size:
            band = [(x, -size), (x + period / 2, -size), (x + period / 2, size), (x, size)]
            draw.polygon(_rotated(band, (size / 2, size / 2), angle), fill=fill)
            x += period
    elif name == "half":  # layout: the object colour fills one side of a line near the centre
        offset = rng.uniform(-0.15, 0.15) * size
        side = [(offset, -size), (size, -size), (size, size), (offset, size)]
        draw.polygon(_rotated(side, (size / 2, size / 2), angle), fill=fill)
    else:
        raise ValueError(f"unknown class '{name}'")


def render_image(label, size, rng):
    """One image of class CLASSES[label] as an RGB PIL image of (size x size)."""
    big = size * SUPERSAMPLE
    background, fill = _colours(rng)
    # The class content is drawn as a mask so that the ring's hole shows the background.
    mask = Image.new("L", (big, big), 0)
    _draw_shape(CLASSES[label], ImageDraw.Draw(mask), big, rng)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    image = background * (1 - alpha) + fill * alpha
    image = Image.fromarray(image.round().clip(0, 255).astype(np.uint8))
    return image.resize((size, size), Image.BOX)


def image_rng(seed, split, label, index):
    return np.random.default_rng([seed, SPLIT_IDS[split], label, index])


def generate(output_dir, num_train=500, num_val=60, size=32, num_classes=len(CLASSES), seed=0):
    """Write output_dir/{train,val}/{kk_name}/{index}.png and output_dir/dataset.json. Returns the info dict.

    Skips the work when dataset.json already records the same settings (so a rerun resumes instantly).
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
    info = {"classes": [f"{k}_{name}" for k, name in enumerate(CLASSES[:num_classes])], "size": size,
            "seed": seed, "per_class": {"train": num_train, "val": num_val}}
    info_path = os.path.join(output_dir, INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            if json.load(f) == info:
                return info
        os.remove(info_path)
    for split, per_class in info["per_class"].items():
        for label, folder_name in enumerate(info["classes"]):
            folder = os.path.join(output_dir, split, folder_name)
            os.makedirs(folder, exist_ok=True)
            for stale in glob.glob(os.path.join(folder, "*.png")):  # images of an earlier, different run
                os.remove(stale)
            for index in range(per_class):
                image = render_image(label, size, image_rng(seed, split, label, index))
                image.save(os.path.join(folder, f"{index:05d}.png"))
    with open(info_path, "w") as f:  # written last: its presence means the folder is complete
        json.dump(info, f, indent=1)
    return info


def _read_split(root, split):
    """uint8 (N, H, W, 3) images and long labels (N,) of root/split, ImageFolder order."""
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(os.path.join(root, split), loader=open_rgb)
    images = np.stack([np.asarray(dataset.loader(path), dtype=np.uint8) for path, _ in dataset.samples])
    return torch.from_numpy(images), torch.tensor(dataset.targets)


def load_split_arrays(root, split):
    """All images of root/split as (float tensor (N, H*W*3) in [0, 1], long labels (N,)), ImageFolder order."""
    images, labels = _read_split(root, split)
    return images.float().div_(255).flatten(1), labels


def load_split_images(root, split):
    """All images of root/split as (float tensor (N, 3, H, W) in [0, 1], long labels (N,)), ImageFolder order."""
    images, labels = _read_split(root, split)
    return images.permute(0, 3, 1, 2).float().div_(255).contiguous(), labels


def fit_linear_probe(train_x, train_y, val_x, val_y, weight_decays=(1e-4, 1e-3, 1e-2), steps=100):
    """Multinomial logistic regression (standardised features, L-BFGS, L2 penalty). Returns the best val
    accuracy over `weight_decays` and that weight decay. The same protocol serves any feature matrix."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    num_classes = int(train_y.max()) + 1
    best = (0.0, None)
    for weight_decay in weight_decays:
        linear = torch.nn.Linear(train_x.shape[1], num_classes)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(train_x), train_y)
            loss = loss + weight_decay * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            accuracy = (linear(val_x).argmax(1) == val_y).float().mean().item()
        best = max(best, (accuracy, weight_decay), key=lambda item: item[0])
    return best


def raw_pixel_baseline(root):
    """Val accuracy of a linear probe on raw pixels of root/train -> root/val: (accuracy, weight decay)."""
    return fit_linear_probe(*load_split_arrays(root, "train"), *load_split_arrays(root, "val"))


def get_args_parser():
    parser = argparse.ArgumentParser("Built-in procedural ImageFolder dataset", add_help=True)
    parser.add_argument("--output_dir", required=True, help="folder that receives train/ and val/")
    parser.add_argument("--num_train", default=500, type=int, help="train images per class")
    parser.add_argument("--num_val", default=60, type=int, help="val images per class")
    parser.add_argument("--size", default=32, type=int, help="image side in pixels")
    parser.add_argument("--num_classes", default=len(CLASSES), type=int, help=f"first N of {CLASSES}")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--baseline", action="store_true", help="fit and print the raw-pixel linear probe")
    return parser


def main(args):
    start = time.time()
    info = generate(args.output_dir, args.num_train, args.num_val, args.size, args.num_classes, args.seed)
    total = len(info["classes"]) * (args.num_train + args.num_val)
    print(f"{total} images of {len(info['classes'])} classes ({args.size}x{args.size}) in {args.output_dir} "
          f"[{time.time() - start:.1f} s]")
    if args.baseline:
        accuracy, weight_decay = raw_pixel_baseline(args.output_dir)
        print(f"raw-pixel linear probe: val accuracy {100 * accuracy:.1f}% (weight decay {weight_decay})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
