"""Image editing with MAGE: reconstruction, inpainting and outpainting of your own images.

    python edit_img.py --ckpt mage-vitb-1600.pth --mode inpaint --input photo.jpg --box 64 64 192 192
    python edit_img.py --ckpt mage-vitb-1600.pth --mode inpaint --input photos/ --mask_image masks/
    python edit_img.py --ckpt mage-vitb-1600.pth --mode outpaint --input photo.jpg --outpaint_pixels 48
    python edit_img.py --ckpt mage-vitb-1600.pth --mode reconstruct --input photos/

Every image is resized (shorter side) and center-cropped to the tokenizer resolution R = grid_size x
downsample factor (256 for the release). Boxes and mask images are given in the pixels of the input image
(white = edit) and follow the same resize and crop. Outpainting keeps the R x R canvas and fits the image
into its inner part, leaving the requested margins (in canvas pixels) to be generated.
Masking follows the SPEC: masked pixels are set to 0, the image is tokenized, every token whose cell overlaps
a masked pixel is masked plus one ring of neighbours, and iterative decoding fills only those tokens; the
other tokens are kept, so the rest of the image comes back through the tokenizer.
Writes OUTPUT_DIR/<name>_<mode>.png per image and OUTPUT_DIR/grid_<mode>.png (input | masked | result rows,
for the first 16 images).
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import os

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.utils import make_grid

from gen_img_uncond import add_model_args, build_model, check_model_args
from util.cli import add_runtime_args, run_script
from util.distributed import cleanup_distributed
from util.errors import UsageError
from util import generation
from util.images import image_size, open_grey, open_rgb
from util.output_dir import open_output_dir
from util.precision import autocast
from util.run import releases_output_dir, setup_run
from util.sampling import decode_tokens, image_generators, iterative_decode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MODES = ("reconstruct", "inpaint", "outpaint")
GRID_ROWS = 16


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE image editing", add_help=True)
    add_model_args(parser)
    edit = parser.add_argument_group("editing")
    edit.add_argument("--input", required=True, help="an image file or a folder of images")
    edit.add_argument("--mode", default="inpaint", choices=MODES)
    edit.add_argument("--box", nargs=4, type=int, metavar=("X0", "Y0", "X1", "Y1"),
                      help="inpaint: region to regenerate, in pixels of the input image (x1, y1 exclusive)")
    edit.add_argument("--mask_image", default="",
                      help="inpaint: mask file for all inputs, or a folder with a mask per input (same name); "
                           "white = regenerate")
    margins = edit.add_mutually_exclusive_group()  # both at once would contradict each other
    margins.add_argument("--outpaint_pixels", type=int, default=None, help="outpaint: margin on every side")
    margins.add_argument("--outpaint", nargs=4, type=int, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                         help="outpaint: margin per side, in pixels of the output canvas")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temp", default=4.5, type=float)
    sampling.add_argument("--num_iter", default=12, type=int)
    sampling.add_argument("--batch_size", default=8, type=int)
    sampling.add_argument("--output_dir", default="output_dir/edit")
    add_runtime_args(parser, data_loader=False)
    return parser


def list_images(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{path}'")
        return files
    if not os.path.isfile(path):
        raise UsageError(f"--input '{path}' is neither an image file nor a folder")
    return [path]


def outpaint_margins(args, resolution):
    """(left, top, right, bottom) margins in canvas pixels."""
    if args.outpaint is not None:
        margins = tuple(args.outpaint)
    elif args.outpaint_pixels is not None:
        margins = (args.outpaint_pixels,) * 4
    else:
        raise UsageError("--mode outpaint needs --outpaint_pixels N or --outpaint LEFT TOP RIGHT BOTTOM")
    left, top, right, bottom = margins
    if min(margins) < 0 or left + right >= resolution or top + bottom >= resolution or not any(margins):
        raise UsageError(f"outpaint margins {margins} must be >= 0, not all 0, and leave part of the "
                         f"{resolution}x{resolution} canvas for the image")
    return margins


def check_edit_args(args):
    check_model_args(args)
    generation.check_sampling_args(args)
    has_region = args.box is not None or bool(args.mask_image)
    if args.mode == "inpaint" and args.box is not None and args.mask_image:
        raise UsageError("give either --box or --mask_image, not both")
    if args.mode == "inpaint" and not has_region:
        raise UsageError("--mode inpaint needs --box X0 Y0 X1 Y1 or --mask_image")
    if args.mode != "inpaint" and has_region:
        raise UsageError(f"--box / --mask_image only apply to --mode inpaint, not {args.mode}")
    if args.mode != "outpaint" and (args.outpaint is not None or args.outpaint_pixels is not None):
        raise UsageError("--outpaint / --outpaint_pixels only apply to --mode outpaint")
    if args.box is not None and not (args.box[0] < args.box[2] and args.box[1] < args.box[3]):
        raise UsageError(f"--box {args.box}: need x0 < x1 and y0 < y1")
    if args.mask_image and not os.path.exists(args.mask_image):
        raise UsageError(f"--mask_image '{args.mask_image}' does not exist")
    for path in list_images(args.input):
        size = checked_size(path)
        if args.mask_image:
            read_mask(mask_file(args, path), size, path)


def checked_size(path):
    """(width, height) of an image file from its header; UsageError when it is not a readable image."""
    try:
        return image_size(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image '{path}': {err}") from None


def fit(img, height, width, interpolation=InterpolationMode.BILINEAR):
    """Resize so the image covers height x width (shorter side first, like Resize), then center crop."""
    if height == width:
        img = TF.resize(img, height, interpolation=interpolation)
    else:
        scale = max(height / img.height, width / img.width)
        img = TF.resize(img, [max(height, round(img.height * scale)), max(width, round(img.width * scale))],
                        interpolation=interpolation)
    return TF.center_crop(img, [height, width])


def mask_file(args, path):
    """The --mask_image file for input `path`: the file itself, or the file of the same name in the folder."""
    if not os.path.isdir(args.mask_image):
        return args.mask_image
    stem = os.path.splitext(os.path.basename(path))[0]
    candidates = [n for n in sorted(os.listdir(args.mask_image)) if os.path.splitext(n)[0] == stem]
    if not candidates:
        raise UsageError(f"no mask named '{stem}.*' in '{args.mask_image}' for input '{path}'")
    return os.path.join(args.mask_image, candidates[0])


def read_mask(mask_path, size, path):
    """The mask as an 'L' image of the input's size `size` (255 = regenerate: grey levels above 127).

    UsageError for a file that is not an image, a mask without any white pixel, and a mask whose aspect ratio
    differs from the input's (it cannot be meant for that image); a mask of the same aspect ratio but another
    size is resized to the input's size (nearest neighbour)."""
    try:
        mask = open_grey(mask_path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"mask '{mask_path}' is not a readable image: {err}") from None
    mask = mask.point(lambda v: 255 if v > 127 else 0)
    if mask.getextrema()[1] == 0:
        raise UsageError(f"mask '{mask_path}' is all black: nothing to regenerate (white = regenerate)")
    if mask.size != size:
        if abs(mask.width * size[1] - mask.height * size[0]) > 0.01 * mask.height * size[1]:
            raise UsageError(f"mask '{mask_path}' is {mask.width}x{mask.height} but image '{path}' is "
                             f"{size[0]}x{size[1]}: give a mask of the image's size (white = regenerate)")
        mask = mask.resize(size, Image.NEAREST)
    return mask


def region_image(args, size, path):
    """The inpainting region as an 'L' image of the input's size (255 = regenerate)."""
    if args.box is not None:
        region = Image.new("L", size, 0)
        x0, y0, x1, y1 = args.box
        ImageDraw.Draw(region).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        return region
    return read_mask(mask_file(args, path), size, path)


def pixel_region(args, size, path, resolution):
    """(R, R) bool: the inpainting region after the input's resize and center crop (True = regenerate)."""
    # Box resampling: a canvas pixel is masked iff its footprint in the input overlaps a masked input pixel.
    region = fit(region_image(args, size, path), resolution, resolution, interpolation=InterpolationMode.BOX)
    pixel_mask = TF.to_tensor(region)[0] > 0
    if not pixel_mask.any():
        raise UsageError(f"the edit region of '{path}' lies outside the center crop that the model sees")
    return pixel_mask


def check_regions(args, paths, resolution):
    """The checks that need the model's resolution, for every input before anything is written."""
    if args.mode == "outpaint":
        outpaint_margins(args, resolution)
    elif args.mode == "inpaint":
        for path in paths:
            pixel_region(args, checked_size(path), path, resolution)


def prepare_canvas(args, path, resolution):
    """(canvas (3, R, R) in [0, 1], pixel mask (R, R) bool: True = regenerate) for one input image."""
    img = open_rgb(path)  # 16-bit images scaled to 8 bits
    if args.mode == "outpaint":
        left, top, right, bottom = outpaint_margins(args, resolution)
        height, width = resolution - top - bottom, resolution - left - right
        canvas = torch.zeros(3, resolution, resolution)
        canvas[:, top:top + height, left:left + width] = TF.to_tensor(fit(img, height, width))
        pixel_mask = torch.ones(resolution, resolution, dtype=torch.bool)
        pixel_mask[top:top + height, left:left + width] = False
        return canvas, pixel_mask
    canvas = TF.to_tensor(fit(img, resolution, resolution))
    if args.mode == "reconstruct":
        return canvas, torch.zeros(resolution, resolution, dtype=torch.bool)
    return canvas, pixel_region(args, img.size, path, resolution)


def token_mask_from_pixels(pixel_mask, cell):
    """(B, H, W) bool pixel mask -> (B, (H/cell)*(W/cell)) bool token mask: every token whose cell overlaps a
    masked pixel, plus one ring of neighbouring tokens (8-neighbourhood)."""
    cells = F.max_pool2d(pixel_mask[:, None].float(), kernel_size=cell, stride=cell)
    ring = F.max_pool2d(cells, kernel_size=3, stride=1, padding=1)
    return ring.flatten(1) > 0


def edit_tokens(model, canvases, pixel_masks, num_iter, temperature, generator, amp="none"):
    """Tokenize the masked canvases and regenerate the masked tokens.

    canvases (B, 3, R, R) in [0, 1], pixel_masks (B, R, R) bool. Returns (input ids, token mask, output ids),
    each (B, L); output ids equal input ids wherever the token mask is False.
    """
    masked = canvases * (~pixel_masks)[:, None].to(canvases.dtype)
    ids_in = model.tokenize(masked)
    token_mask = token_mask_from_pixels(pixel_masks, model.vqgan.downsample_factor)
    if not token_mask.any():  # reconstruction: nothing to regenerate
        return ids_in, token_mask, ids_in
    start = ids_in.masked_fill(token_mask, model.mask_token_label)
    with autocast(canvases.device, amp):
        ids_out = iterative_decode(model, start, num_iter=num_iter, temperature=temperature, generator=generator)
    return ids_in, token_mask, ids_out


def masked_view(canvases, token_mask, grid_size, cell):
    """The canvases with the regenerated tokens' cells greyed out (what the model keeps)."""
    cells = token_mask.view(-1, 1, grid_size, grid_size).float()
    pixels = cells.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)
    return canvases * (1 - pixels) + 0.5 * pixels


def edit_batch(model, args, paths, indices, resolution):
    """Edited images (B, 3, R, R), plus the canvases and their masked views, all in [0, 1] on the CPU."""
    prepared = [prepare_canvas(args, path, resolution) for path in paths]
    canvases = torch.stack([c for c, _ in prepared]).to(args.device)
    pixel_masks = torch.stack([m for _, m in prepared]).to(args.device)
    generators = image_generators(args.seed, indices, args.device)
    _, token_mask, ids = edit_tokens(model, canvases, pixel_masks, args.num_iter, args.temp, generators, args.amp)
    results = decode_tokens(model, ids)
    views = masked_view(canvases, token_mask, model.grid_size, model.vqgan.downsample_factor)
    return canvases.cpu(), views.cpu(), results.cpu()


def save_png(image, path):
    """(3, H, W) in [0, 1] -> PNG, truncated to 8 bits as the generation scripts save (util.generation.to_uint8)."""
    generation.save_png(generation.to_uint8(image[None])[0], path)


@releases_output_dir
def main(args):
    """Edit every input; returns:
        images      the written OUTPUT_DIR/<name>_<mode>.png, in input order
        grid        OUTPUT_DIR/grid_<mode>.png (input | kept tokens | result rows, the first 16 images)
        mode, output_dir   --mode and --output_dir
    """
    setup_run(args, check_edit_args, create_output_dir=False)
    paths = list_images(args.input)
    model = build_model(args)
    resolution = model.grid_size * model.vqgan.downsample_factor
    check_regions(args, paths, resolution)
    open_output_dir(args)  # every usage check is done
    rows, written = [], []
    for start in range(0, len(paths), args.batch_size):
        batch_paths = paths[start:start + args.batch_size]
        indices = list(range(start, start + len(batch_paths)))
        canvases, views, results = edit_batch(model, args, batch_paths, indices, resolution)
        for path, canvas, view, result in zip(batch_paths, canvases, views, results):
            stem = os.path.splitext(os.path.basename(path))[0]
            written.append(os.path.join(args.output_dir, f"{stem}_{args.mode}.png"))
            save_png(result, written[-1])
            if len(rows) < 3 * GRID_ROWS:
                rows.extend([canvas, view, result])
        print(f"edited {start + len(batch_paths)}/{len(paths)}")
    grid_path = os.path.join(args.output_dir, f"grid_{args.mode}.png")
    save_png(make_grid(torch.stack(rows), nrow=3, padding=2), grid_path)
    print(f"wrote {len(paths)} images and {grid_path}")
    cleanup_distributed()
    return {"images": written, "grid": grid_path, "mode": args.mode, "output_dir": args.output_dir}


if __name__ == "__main__":
    run_script(get_args_parser(), main)
