"""Pictures of a run: rows of images (PIL), loss curves (matplotlib) and tensorboard scalars to draw them from."""
import glob
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from util.images import open_rgb

LABEL_WIDTH = 150  # pixels left of the images for a row's label


def font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def to_pil(image, scale=1):
    """A (3, H, W) image in [0, 1] as a PIL image enlarged `scale` times (nearest neighbour: pixels stay sharp)."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_rows(rows, path, scale=1, labels=None, pad=2):
    """Rows of (N, 3, H, W) images in [0, 1] as one picture, images enlarged by `scale`, an optional label per
    row. Rows may differ in length (or be empty)."""
    side = max((r.shape[-1] for r in rows if len(r)), default=8) * scale
    columns = max(max(len(r) for r in rows), 1)
    label_width = LABEL_WIDTH if labels else 0
    canvas = Image.new("RGB", (label_width + columns * (side + pad) + pad, len(rows) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        top = pad + i * (side + pad)
        if labels:
            draw.text((4, top + side // 2 - 8), labels[i], fill="black", font=font())
        for j, image in enumerate(row):
            canvas.paste(to_pil(image, scale), (label_width + pad + j * (side + pad), top))
    canvas.save(path)


def grid_cells(path, side, rows, columns, pad=2):
    """The cells of a torchvision make_grid picture of side x side images: (rows, columns, 3, side, side)."""
    grid = torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1).float().div(255)
    cells = [[grid[:, pad + r * (side + pad):pad + r * (side + pad) + side,
                   pad + c * (side + pad):pad + c * (side + pad) + side] for c in range(columns)] for r in range(rows)]
    return torch.stack([torch.stack(row) for row in cells])


def enlarge(source, target, scale):
    """Copy a picture enlarged by `scale` (nearest neighbour)."""
    picture = open_rgb(source)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(target)


def read_scalars(log_dir, tag):
    """(steps, values) of a tensorboard scalar, from every event file in log_dir (a resumed run's too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    points = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def running_mean(values, window):
    """Mean of the last `window` values at each position (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def loss_curves(panels, path, panel_size=(4.6, 3.2), dpi=100):
    """Line plots side by side: panels of (title, x label, xs, ys), each value light and its running mean over
    2 % of the points dark. The y axis spans the running mean: MAGE's per-step loss jumps whenever a batch
    draws a mask ratio near 1, and those steps would otherwise flatten the curve."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    figure = Figure(figsize=(panel_size[0] * len(panels), panel_size[1]), dpi=dpi, layout="constrained")
    for axes, (title, xlabel, xs, ys) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel(xlabel)
        axes.grid(alpha=0.3)
        if not ys:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", color="gray", transform=axes.transAxes)
            continue
        smooth = running_mean(ys, max(1, len(ys) // 50))
        axes.plot(xs, ys, color="#c3d2f0", linewidth=1, label="per step")
        axes.plot(xs, smooth, color="#2850b4", linewidth=2, label="running mean")
        low, high = min(ys), max(smooth)
        margin = 0.05 * (high - low) if high > low else 0.5
        axes.set_ylim(low - margin, high + margin)
        axes.legend(fontsize=8, loc="upper right")
    figure.savefig(path)


def line_plot(xs, series, path, xlabel, ylabel, title="", highlight=None, ylim=None, size=(5.0, 3.4), dpi=100):
    """One axes of lines with markers: series maps a legend label to ys (one per x); `highlight` marks an x
    with a dashed vertical line (the chosen setting)."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = figure.subplots()
    for label, ys in series.items():
        axes.plot(xs, ys, marker="o", linewidth=2, label=label)
    if highlight is not None:
        axes.axvline(highlight, color="gray", linestyle="--", linewidth=1, label="chosen")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path)
