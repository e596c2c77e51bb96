"""The built-in dataset: procedural shapes and textures written as a labelled ImageFolder (train/ and val/).

Each class differs in what a tokenizer can see (shape, count or texture); colour, position, scale, rotation
and background vary at random, so a linear classifier on raw pixels does clearly worse than one on features
that know about shapes. Every image is a pure function of (seed, split, class, index): rerunning writes the
same files, and any subset can be regenerated alone.

    python -m util.synthetic_data --output_dir data/shapes            # 8 classes, 32x32, 500/60 per class
    python -m util.synthetic_data --output_dir data/shapes --baseline # also fit the raw-pixel linear probe
"""
import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle", "ring", "cross", "pair", "stripes", "checker")
SPLIT_IDS = {"train": 0, "val": 1}
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges instead of jagged ones
INFO_FILE = "dataset.json"


LUMA = np.array([0.299, 0.587, 0.114])


def _colour(rng, high=256):
    return rng.integers(0, high, size=3).astype(float)


def _foreground_colour(rng, background, min_contrast=60.0):
    """A random colour at least `min_contrast` brighter (luma) than `background`. Objects are always lighter
    than their background: with random polarity too, a raw-pixel linear probe falls to near chance."""
    for _ in range(200):
        colour = _colour(rng)
        if (colour - background) @ LUMA >= min_contrast:
            return colour
    return np.full(3, 255.0)


def _background(rng, size):
    """A dark-to-mid flat colour or linear gradient in a random direction: ((size, size, 3) float, mean colour)."""
    first = _colour(rng, 160)
    if rng.random() < 0.4:
        return np.broadcast_to(first, (size, size, 3)).copy(), first
    second = np.clip(first + rng.normal(0, 40, size=3), 0, 159)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = (np.cos(angle) * xs + np.sin(angle) * ys + 0.5)[..., None].clip(0, 1)
    return first * (1 - t) + second * t, (first + second) / 2


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
    angle = rng.uniform(0, 2 * math.pi)
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
        arm = radius * rng.uniform(0.3, 0.42)
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
        period = rng.uniform(0.22, 0.34) * size
        x = rng.uniform(0, period) - size  # coordinates relative to the image centre, before rotation
        while x < size:
            band = [(x, -size), (x + period / 2, -size), (x + period / 2, size), (x, size)]
            draw.polygon(_rotated(band, (size / 2, size / 2), angle), fill=fill)
            x += period
    elif name == "checker":
        cell = rng.uniform(0.2, 0.3) * size
        offset = rng.uniform(0, 2 * cell, size=2) - size
        tilt = rng.uniform(-0.35, 0.35)
        count = math.ceil(2 * size / cell) + 1
        for i in range(count):
            for j in range(i % 2, count, 2):
                x, y = offset[0] + i * cell, offset[1] + j * cell
                square = [(x, y), (x + cell, y), (x + cell, y + cell), (x, y + cell)]
                draw.polygon(_rotated(square, (size / 2, size / 2), tilt), fill=fill)
    else:
        raise ValueError(f"unknown class '{name}'")


def render_image(label, size, rng):
    """One image of class CLASSES[label] as an RGB PIL image of (size x size)."""
    big = size * SUPERSAMPLE
    background, mean_background = _background(rng, big)
    fill = _foreground_colour(rng, mean_background)
    # The class content is drawn as a mask so that the ring's hole shows the background (gradient included).
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


def load_split_arrays(root, split):
    """All images of root/split as (float tensor (N, 3*H*W) in [0, 1], long labels (N,)), ImageFolder order."""
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(os.path.join(root, split))
    images = np.stack([np.asarray(dataset.loader(path), dtype=np.uint8) for path, _ in dataset.samples])
    features = torch.from_numpy(images).float().div_(255).flatten(1)
    return features, torch.tensor(dataset.targets)


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
