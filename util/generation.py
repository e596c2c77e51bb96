"""What the generation scripts (gen_img_uncond.py, gen_img_cond.py) share: the run folder and its settings check,
sharding of fixed batches over the ranks, resume by skipping written PNGs, atomic PNG writing, the grid and the
FID/IS evaluation.

Items are numbered 0..N-1 and each script maps an item to its PNG path. Batches are fixed chunks of those
numbers, dealt out round-robin to the ranks, and every image has its own random generator, so any number of
processes writes the same files for the same per-process batch size, thread count and device kind (another
batch size or thread count may change some images: matmul kernels block the work differently and near-tied
tokens flip), and a rerun only generates what is missing.
"""
import hashlib
import json
import os
import struct

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, read_image
from torchvision.utils import make_grid
from tqdm import tqdm

from util.checkpoint import TMP_SUFFIX, save_json_atomic, write_atomic
from util.distributed import barrier, get_rank, get_world_size, is_main_process
from util.errors import UsageError
from util.fid import INCEPTION, PIXEL_STATS, compute_metrics, resolve_inception_weights
from util.output_dir import open_folder


def add_fid_args(parser):
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_fid", action="store_true", help="compute FID and IS after generating")
    evaluation.add_argument("--fid_ref", default="", help="folder of reference PNGs (prepare_imgnet_val.py)")
    evaluation.add_argument("--fid_weights", default="", help="local torch-fidelity Inception weights file")
    evaluation.add_argument("--fid_kid", action="store_true", help="also kernel inception distance")
    evaluation.add_argument("--fid_prc", action="store_true", help="also precision / recall")
    evaluation.add_argument("--fid_batch_size", default=64, type=int)
    evaluation.add_argument("--fid_feature_extractor", default=INCEPTION, choices=(INCEPTION, PIXEL_STATS),
                            help=f"{PIXEL_STATS} is a tiny offline stand-in for smoke tests, not a real FID")
    return evaluation


def check_sampling_args(args):
    """--temp, --num_iter and --batch_size (generation and editing)."""
    for name in ("batch_size", "num_iter"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.temp >= 0:  # also catches nan
        raise UsageError(f"--temp must be >= 0 (0 picks the most likely tokens), got {args.temp}")


def check_fid_args(args):
    if args.eval_fid and not os.path.isdir(args.fid_ref):
        raise UsageError(f"--eval_fid needs --fid_ref DIR, a folder of reference images (got '{args.fid_ref}')")


def check_fid_weights(args):
    """Fail now, not after generating, when FID needs Inception weights that are not on disk (rank 0)."""
    if args.eval_fid and args.fid_feature_extractor == INCEPTION and is_main_process():
        resolve_inception_weights(args.fid_weights or None)


def weights_fingerprint(model):
    """sha256 of every tensor of the model's state dict: tells checkpoints with the same file name apart."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_folder(folder, settings):
    """Create and lock the run folder (a second run with the same settings is refused: util.output_dir), or check
    that an existing one was written with the same settings (rank 0). Removes the partial files of a killed run."""
    open_folder(folder)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    settings_path = os.path.join(folder, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise UsageError(f"'{folder}' holds images made with other settings ({', '.join(changed)} "
                                  f"differ); choose another --output_dir")
    else:
        save_json_atomic(settings_path, settings)
    for root, _, names in os.walk(image_dir):
        for name in names:
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(root, name))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, the last 12 bytes of every complete PNG


def is_done(path, side=None):
    """Whether `path` is a complete 8-bit RGB PNG (side x side when given), judged from its header and its last
    12 bytes, without decoding: a file cut short or replaced by something else is generated again."""
    try:
        with open(path, "rb") as f:
            header = f.read(26)
            if os.fstat(f.fileno()).st_size < len(header) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            end = f.read()
    except OSError:
        return False
    if header[:8] != PNG_SIGNATURE or header[12:16] != b"IHDR" or end != PNG_END:
        return False
    width, height = struct.unpack(">II", header[16:24])
    return (header[24], header[25]) == (8, 2) and (side is None or (width, height) == (side, side))


def batches_to_do(num_items, batch_size, path_of, side=None):
    """Fixed chunks of batch_size item numbers that still miss a complete file, dealt out round-robin to the
    ranks, and the damaged files among the missing ones (present but not a complete PNG)."""
    todo, damaged = [], []
    for start in range(0, num_items, batch_size):
        items = list(range(start, min(start + batch_size, num_items)))
        missing = [i for i in items if not is_done(path_of(i), side)]
        damaged += [os.path.basename(path_of(i)) for i in missing if os.path.exists(path_of(i))]
        if missing:
            todo.append(items)
    return todo[get_rank()::get_world_size()], damaged


def save_png(array, path):
    """uint8 (H, W, 3) CPU tensor (to_uint8) -> PNG, written atomically (its folder is created when missing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # no fsync per image: a rerun after a crash checks every file (is_done) and rewrites what is missing
    write_atomic(path, lambda f: Image.fromarray(array.numpy()).save(f, format="PNG"), sync=False)


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) on the CPU, as the reference saves its samples: the float32
    values truncated, np.clip(x * 255, 0, 255).astype(np.uint8), not rounded (FID is compared against numbers
    of images saved so)."""
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(np.clip(pixels * 255, 0, 255).astype(np.uint8))


def generate_missing(folder, settings, num_items, batch_size, path_of, generate_batch, side=None):
    """Write the PNG of every item whose file is missing or damaged: generate_batch(item numbers) -> uint8
    (B, H, W, 3) of side x side images (side: checked in existing files when given).

    `settings` (rank 0; None elsewhere) are stored in, or checked against, folder/settings.json first."""
    if is_main_process():
        prepare_folder(folder, settings)
    barrier()
    batches, damaged = batches_to_do(num_items, batch_size, path_of, side)
    barrier()  # every rank has listed the missing images before any rank writes
    if damaged:
        print(f"{len(damaged)} damaged images will be generated again: {', '.join(damaged[:5])}"
              + (" ..." if len(damaged) > 5 else ""))
    total = sum(len(b) for b in batches)
    print(f"{folder}: {num_items} images, {total} to generate on rank 0 of {get_world_size()}")
    with tqdm(total=total, unit="img", disable=not is_main_process()) as progress:
        for items in batches:
            for item, array in zip(items, generate_batch(items)):
                path = path_of(item)
                if not is_done(path, side):
                    save_png(array, path)
            progress.update(len(items))
    barrier()


def save_grid(paths, path, nrow):
    """The PNGs at `paths` as one grid of `nrow` images a row."""
    images = [read_image(p, mode=ImageReadMode.RGB) for p in paths]
    grid = make_grid(torch.stack(images), nrow=nrow, padding=2)
    save_png(grid.permute(1, 2, 0).contiguous(), path)


def evaluate_fid(args, image_dir, folder, report):
    """FID/IS (and KID/PRC when asked) of the images under image_dir (subfolders included) against --fid_ref,
    added to `report` and written to folder/metrics.json."""
    metrics = compute_metrics(image_dir, args.fid_ref, device=args.device, isc=True, fid=True, kid=args.fid_kid,
                              prc=args.fid_prc, weights_path=args.fid_weights or None,
                              feature_extractor=args.fid_feature_extractor, batch_size=args.fid_batch_size,
                              recursive=True)
    report.update({"metrics": metrics, "fid_ref": os.path.abspath(args.fid_ref),
                   "feature_extractor": args.fid_feature_extractor})
    save_json_atomic(os.path.join(folder, "metrics.json"), report)
    print(json.dumps(metrics, indent=2))
    return report
