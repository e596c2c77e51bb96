"""Unconditional image generation with MAGE's iterative decoding, sharded over ranks, resumable, with FID/IS.

    python gen_img_uncond.py --ckpt mage-vitb-1600.pth --temp 6.0 --num_iter 20 --output_dir output_dir
    torchrun --nproc_per_node=8 gen_img_uncond.py --ckpt mage-vitb-1600.pth --temp 6.0 --num_iter 20 \
        --eval_fid --fid_ref data/imagenet-val-256

Layout: OUTPUT_DIR/<settings>/images/00000.png ... (only samples, so the folder can be given to torch-fidelity
as is), OUTPUT_DIR/<settings>/grid.png, settings.json and metrics.json. Image k depends only on
(seed, k, settings): it has its own random generator, and batches are fixed chunks of the image indices that
are dealt out to the ranks, so any number of processes writes the same files for the same per-process batch
size, thread count and device kind. Another batch size or thread count may change some images (matmul kernels
block the work differently, low bits move and near-tied tokens flip). A rerun skips written images.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import math
import os

import torch

import models_mage
from models_mage import tokenizer_kwargs
from util import generation
from util.checkpoint import extract_model_state, load_checkpoint, load_mage_weights
from util.cli import add_runtime_args, check_tokenizer_source, run_script
from util.distributed import barrier, cleanup_distributed, is_main_process
from util.errors import CheckpointError, UsageError
from util.perf import INFERENCE_FLAGS, add_perf_args, apply_perf_settings
from util.precision import autocast
from util.run import releases_output_dir, setup_run
from util.sampling import decode_tokens, image_generators, iterative_decode

GRID_IMAGES = 64


def add_model_args(parser):
    """Generator checkpoint flags shared with edit_img.py."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mage_vit_base_patch16", choices=sorted(models_mage.MODELS))
    model.add_argument("--ckpt", default="", help="MAGE checkpoint ({'model': state dict incl. vqgan.*})")
    model.add_argument("--random_init", action="store_true",
                       help="run without a checkpoint on random weights, the tokenizer's too unless --vqgan_ckpt "
                            "(seeded by --seed; tests and benchmarks)")
    model.add_argument("--vqgan_config", default=None, help="tokenizer config (default: the model preset's)")
    model.add_argument("--vqgan_ckpt", default=None,
                       help="tokenizer weights; when given they replace any vqgan.* weights in --ckpt (needed when "
                            "--ckpt has none)")
    add_perf_args(parser, INFERENCE_FLAGS)
    return model


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE unconditional generation", add_help=True)
    add_model_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temp", default=4.5, type=float, help="choice temperature (paper's numbers: 6.0)")
    sampling.add_argument("--num_iter", default=12, type=int, help="decoding steps (paper's numbers: 20)")
    sampling.add_argument("--batch_size", default=32, type=int, help="images per forward pass per process; the files are the same for the same batch size, "
                               "thread count and device kind (another batch size may change some images)")
    sampling.add_argument("--num_images", default=50000, type=int)
    sampling.add_argument("--output_dir", default="output_dir")
    generation.add_fid_args(parser)
    add_runtime_args(parser, data_loader=False)
    return parser


def check_model_args(args):
    if args.random_init == bool(args.ckpt):
        raise UsageError("pass --ckpt PATH (a MAGE checkpoint), or --random_init to run on random weights")
    if args.ckpt:  # --random_init: random weights by request, the tokenizer's too unless --vqgan_ckpt
        check_tokenizer_source(args, [args.ckpt], opt_out=None)


def check_args(args):
    check_model_args(args)
    generation.check_sampling_args(args)
    if args.num_images < 1:
        raise UsageError("--num_images must be >= 1")
    generation.check_fid_args(args)


def settings_of(args, model):
    """Everything that changes the images; stored in settings.json and checked on every rerun."""
    return {"model": args.model, "ckpt": os.path.basename(args.ckpt) if args.ckpt else "random_init",
            "weights_sha256": generation.weights_fingerprint(model), "temp": args.temp, "num_iter": args.num_iter,
            "seed": args.seed, "amp": args.amp, "device_type": args.device.type,
            "fused_attn": args.fused_attn, "tokenizer_dtype": args.tokenizer_dtype,
            "channels_last": args.channels_last}


def run_folder(args):
    source = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else f"{args.model}-random_init"
    name = f"{source}_temp{args.temp:g}_iter{args.num_iter}_seed{args.seed}_{args.amp}"
    return os.path.join(args.output_dir, name)


def build_model(args, class_cond=None):
    """The generator with its weights; every checkpoint problem raises CheckpointError here, before any work.

    class_cond None: class-conditional exactly when the checkpoint has a class embedding (an unconditional run
    of such a model uses its "no class" token); True: the checkpoint must have one (or --num_classes with
    --random_init)."""
    state_dict = None
    if args.ckpt:
        state_dict = extract_model_state(load_checkpoint(args.ckpt), source=args.ckpt)
        class_weights = state_dict.get("class_emb.weight")
        if class_cond and class_weights is None:
            raise CheckpointError(f"{args.ckpt} is an unconditional MAGE (no class_emb.weight): fine-tune it with "
                                  f"main_pretrain.py --class_cond --finetune {args.ckpt}, or use gen_img_uncond.py")
        num_classes = 0 if class_weights is None else class_weights.shape[0]
    else:
        torch.manual_seed(args.seed)  # identical random weights on every rank
        num_classes = getattr(args, "num_classes", 0) if class_cond else 0
    kwargs = tokenizer_kwargs(args)
    if num_classes:
        kwargs.update(class_cond=True, num_classes=num_classes)
    model = models_mage.MODELS[args.model](**kwargs)
    if state_dict is not None:
        load_mage_weights(model, state_dict, source=args.ckpt, tokenizer_given=bool(args.vqgan_ckpt))
    return apply_perf_settings(model.to(args.device), args, args.device).eval()


def image_path(image_dir, index):
    return os.path.join(image_dir, f"{index:05d}.png")


def generate_batch(model, indices, args):
    """Images for the given indices as uint8 (B, H, W, 3) on the CPU."""
    ids = torch.full((len(indices), model.seq_len), model.mask_token_label, dtype=torch.long, device=args.device)
    generators = image_generators(args.seed, indices, args.device)
    with autocast(args.device, args.amp):
        ids = iterative_decode(model, ids, num_iter=args.num_iter, temperature=args.temp, generator=generators)
    return generation.to_uint8(decode_tokens(model, ids))


@releases_output_dir
def main(args):
    """Generate (and evaluate); returns the run's result (rank 0; other ranks: grid, settings, metrics None):
        folder      OUTPUT_DIR/<settings>/, the run folder (settings.json, grid.png, metrics.json)
        image_dir   folder/images/, the samples 00000.png ... only
        grid        folder/grid.png, the first 64 samples
        num_images  --num_images
        settings    what the images depend on (settings.json)
        metrics     torch-fidelity's metrics with --eval_fid (frechet_inception_distance,
                    inception_score_mean, ...), else None
    """
    setup_run(args, check_args, create_output_dir=False)  # generation.prepare_folder lays out the run folder
    generation.check_fid_weights(args)  # fail now rather than after generating
    model = build_model(args)
    folder = run_folder(args)
    image_dir = os.path.join(folder, "images")
    settings = settings_of(args, model) if is_main_process() else None
    generation.generate_missing(folder, settings, args.num_images, args.batch_size,
                                lambda k: image_path(image_dir, k), lambda ks: generate_batch(model, ks, args),
                                side=model.grid_size * model.vqgan.downsample_factor)
    result = {"folder": folder, "image_dir": image_dir, "grid": None, "num_images": args.num_images,
              "settings": settings, "metrics": None}
    if is_main_process():
        count = min(GRID_IMAGES, args.num_images)
        result["grid"] = os.path.join(folder, "grid.png")
        generation.save_grid([image_path(image_dir, k) for k in range(count)], result["grid"],
                             nrow=math.ceil(math.sqrt(count)))
        print(f"wrote {image_dir} and {result['grid']}")
        if args.eval_fid:
            report = generation.evaluate_fid(args, image_dir, folder,
                                             {"num_images": args.num_images, "settings": settings})
            result["metrics"] = report["metrics"]
    barrier()
    cleanup_distributed()
    return result


if __name__ == "__main__":
    run_script(get_args_parser(), main)
