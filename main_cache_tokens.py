"""Tokenize K augmented views of every training image once, for pre-training with --cached_tokens.

    torchrun --nproc_per_node=8 main_cache_tokens.py --data_path ${IMAGENET_DIR} --output_dir token_cache \
        --num_views 10 --vqgan_ckpt vqgan_jax_strongaug.ckpt

Each view is the pre-training augmentation (RandomResizedCrop(scale 0.2-1) + horizontal flip), seeded by
(seed, view, image index), so the cache does not depend on the number of processes. Shards are uint16.
With --views flips the views are the whole image (Resize + CenterCrop) and its flips instead (demo.py); with
--views contrastive (alias --aug contrastive) they are SimCLR's views, MAGE-C's augmentation
(main_pretrain.py --contrastive_aug simclr).
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import os

import numpy as np
import torch
from torchvision import transforms
from tqdm import tqdm

from taming.models.vqgan import build_vqgan, token_grid_size
from util.cli import add_random_tokenizer_arg, add_runtime_args, check_tokenizer_source, run_script
from util.datasets import SeededImageFolder, check_split, pretrain_transform, simclr_transform
from util.distributed import barrier, is_main_process
from util.errors import UsageError
from util.output_dir import open_output_dir
from util.perf import TOKENIZER_FLAGS, add_perf_args, configure_tokenizer
from util.precision import autocast
from util.run import releases_output_dir, setup_run
from util.seeding import seed_everything
from util.token_cache import META_FILE, read_meta, write_meta, write_shard


VIEWS = ("random_crops", "flips", "contrastive")
FLIPS = ((), (3,), (2,), (2, 3))  # the dims a view flips: none, horizontal, vertical, both


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE token cache", add_help=True)
    group = parser.add_argument_group("cache")
    group.add_argument("--data_path", default="./data", help="ImageFolder root with a train/ folder")
    group.add_argument("--output_dir", default="./token_cache", help="cache folder")
    group.add_argument("--num_views", default=10, type=int, help="augmented views stored per image (K)")
    group.add_argument("--views", "--aug", dest="views", default="random_crops", choices=VIEWS,
                       help="random_crops: the pre-training augmentation; flips: the whole image and its "
                            "horizontal, vertical and double flips (K <= 4), for short schedules in which "
                            "random crops would teach parts of objects more than their shapes; contrastive: "
                            "SimCLR's views (crop 0.08-1, colour jitter, grayscale, blur, flip) for MAGE-C "
                            "(main_pretrain.py --contrastive_weight, which uses two different views per epoch)")
    group.add_argument("--input_size", default=256, type=int, help="crop size (the tokenizer's resolution)")
    group.add_argument("--batch_size", default=64, type=int, help="images tokenized at once per process")
    group.add_argument("--vqgan_config", default="config/vqgan.yaml")
    group.add_argument("--vqgan_ckpt", default=None, help="tokenizer weights, e.g. vqgan_jax_strongaug.ckpt")
    add_random_tokenizer_arg(group)
    group.add_argument("--skip_bad_images", action="store_true")
    add_runtime_args(parser)
    add_perf_args(parser, TOKENIZER_FLAGS)
    return parser


def check_args(args):
    if args.num_views < 1:
        raise UsageError("--num_views must be at least 1")
    if args.views == "flips" and args.num_views > len(FLIPS):
        raise UsageError(f"--views flips has {len(FLIPS)} views (the image and its flips); got --num_views "
                         f"{args.num_views}")
    check_split(args.data_path, "train")
    check_tokenizer_source(args)


def view_transform(args):
    if args.views == "flips":
        return transforms.Compose([transforms.Resize(args.input_size), transforms.CenterCrop(args.input_size),
                                   transforms.ToTensor()])
    if args.views == "contrastive":
        return simclr_transform(args.input_size)
    return pretrain_transform(args.input_size)


def cache_settings(args, vqgan_settings, num_images):
    return {"num_views": args.num_views, "views": args.views, "input_size": args.input_size, "seed": args.seed,
            "grid_size": token_grid_size(vqgan_settings), "codebook_size": vqgan_settings["n_embed"],
            "vqgan_config": vqgan_settings, "vqgan_ckpt": args.vqgan_ckpt, "num_images": num_images,
            "data_path": os.path.abspath(args.data_path), "world_size": args.world_size}


def tokenize_views(args, vqgan, dataset, rows, seq_len):
    """uint16 (len(rows), K, L) token ids of this rank's images."""
    subset = torch.utils.data.Subset(dataset, rows)
    tokens = np.zeros((len(subset), args.num_views, seq_len), dtype=np.uint16)
    progress = tqdm(total=args.num_views * len(subset), desc="tokenizing", unit="img",
                    disable=not is_main_process())
    for view in range(args.num_views):
        dataset.set_epoch(view)  # the seeded augmentation of view `view`
        loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, num_workers=args.num_workers,
                                             shuffle=False, pin_memory=args.pin_mem and args.device.type == "cuda")
        start = 0
        for images, _ in loader:
            images = images.to(args.device, non_blocking=True)
            if args.views == "flips" and FLIPS[view]:
                images = images.flip(FLIPS[view])
            with torch.no_grad(), autocast(args.device, args.amp):  # used by --tokenizer_dtype autocast
                _, _, (_, _, indices) = vqgan.encode(images)
            indices = indices.reshape(images.shape[0], -1).cpu().numpy().astype(np.uint16)
            tokens[start:start + len(indices), view] = indices
            start += len(indices)
            progress.update(len(indices))
    progress.close()
    return tokens


@releases_output_dir
def main(args):
    """Write the cache (or find it complete); returns, on every rank:
        output_dir, num_images, num_views, views, grid_size, codebook_size   what the cache holds
        written   False when --output_dir already held this cache and nothing was tokenized
    """
    # the cache folder is checked against the tokenizer's settings before it is created
    setup_run(args, check_args, create_output_dir=False)
    seed_everything(args.seed)  # the same tokenizer on every rank with --random_tokenizer
    vqgan, vqgan_settings = build_vqgan(args.vqgan_config, args.vqgan_ckpt)
    if vqgan_settings["n_embed"] > 2 ** 16:
        raise UsageError(f"codebook of {vqgan_settings['n_embed']} entries does not fit uint16 token ids")
    configure_tokenizer(vqgan.to(args.device), args)
    dataset = SeededImageFolder(check_split(args.data_path, "train"), view_transform(args), seed=args.seed,
                                skip_bad_images=args.skip_bad_images)
    settings = cache_settings(args, vqgan_settings, len(dataset))
    result = {"output_dir": args.output_dir, **{key: settings[key] for key in (
        "num_images", "num_views", "views", "grid_size", "codebook_size")}}
    if os.path.isfile(os.path.join(args.output_dir, META_FILE)):
        existing = {"views": "random_crops", **read_meta(args.output_dir)}  # caches written before --views
        if {k: v for k, v in existing.items() if k != "world_size"} == \
                {k: v for k, v in settings.items() if k != "world_size"}:
            print(f"token cache in {args.output_dir} is complete; nothing to do")
            return {**result, "written": False}
        raise UsageError(f"--output_dir '{args.output_dir}' holds a token cache with other settings; "
                         "choose another folder")
    open_output_dir(args)  # create and lock (another run writing this cache is refused)
    rows = list(range(args.rank, len(dataset), args.world_size))
    tokens = tokenize_views(args, vqgan, dataset, rows, settings["grid_size"] ** 2)
    labels = [dataset.targets[i] for i in rows]
    write_shard(args.output_dir, args.rank, tokens, rows, labels)
    barrier()
    if is_main_process():
        write_meta(args.output_dir, settings)
        print(f"cached {args.num_views} views of {len(dataset)} images ({settings['grid_size']}x"
              f"{settings['grid_size']} tokens) in {args.output_dir}")
    return {**result, "written": True}


if __name__ == "__main__":
    run_script(get_args_parser(), main)
