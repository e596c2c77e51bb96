"""Unconditional image generation with MAGE's iterative decoding, sharded over ranks, resumable, with FID/IS.

    python gen_img_uncond.py --ckpt mage-vitb-1600.pth --temp 6.0 --num_iter 20 --output_dir output_dir
    torchrun --nproc_per_node=8 gen_img_uncond.py --ckpt mage-vitb-1600.pth --temp 6.0 --num_iter 20 \
        --eval_fid --fid_ref data/imagenet-val-256

Layout: OUTPUT_DIR/<settings>/images/00000.png ... (only samples, so the folder can be given to torch-fidelity
as is), OUTPUT_DIR/<settings>/grid.png, settings.json and metrics.json. Image k depends only on
(seed, k, settings): it has its own random generator, and batches are fixed chunks of the image indices that
are dealt out to the ranks, so any number of processes writes the same files. A rerun skips written images.
"""
import argparse
import hashlib
import json
import math
import os

import torch
from PIL import Image
from torchvision.io import ImageReadMode, read_image
from torchvision.utils import make_grid
from tqdm import tqdm

import models_mage
from util import misc
from util.checkpoint import CheckpointError, extract_model_state, load_checkpoint, load_mage_weights
from util.perf import add_perf_args, apply_perf_settings, resolve_perf_args, tokenizer_dtype
from util.fid import INCEPTION, PIXEL_STATS, compute_metrics, resolve_inception_weights
from util.sampling import decode_tokens, image_generators, iterative_decode

GRID_IMAGES = 64


def add_model_args(parser):
    """Generator checkpoint flags shared with edit_img.py."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mage_vit_base_patch16", choices=sorted(models_mage.MODELS))
    model.add_argument("--ckpt", default="", help="MAGE checkpoint ({'model': state dict incl. vqgan.*})")
    model.add_argument("--random_init", action="store_true",
                       help="run without a checkpoint on random weights (seeded by --seed; tests and benchmarks)")
    model.add_argument("--vqgan_config", default=None, help="tokenizer config (default: the model preset's)")
    model.add_argument("--vqgan_ckpt", default=None,
                       help="tokenizer weights; when given they replace any vqgan.* weights in --ckpt")
    add_perf_args(parser)
    return model


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE unconditional generation", add_help=True)
    add_model_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temp", default=4.5, type=float, help="choice temperature (paper's numbers: 6.0)")
    sampling.add_argument("--num_iter", default=12, type=int, help="decoding steps (paper's numbers: 20)")
    sampling.add_argument("--batch_size", default=32, type=int, help="images per forward pass per process")
    sampling.add_argument("--num_images", default=50000, type=int)
    sampling.add_argument("--output_dir", default="output_dir")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_fid", action="store_true", help="compute FID and IS after generating")
    evaluation.add_argument("--fid_ref", default="", help="folder of reference PNGs (prepare_imgnet_val.py)")
    evaluation.add_argument("--fid_weights", default="", help="local torch-fidelity Inception weights file")
    evaluation.add_argument("--fid_kid", action="store_true", help="also kernel inception distance")
    evaluation.add_argument("--fid_prc", action="store_true", help="also precision / recall")
    evaluation.add_argument("--fid_batch_size", default=64, type=int)
    evaluation.add_argument("--fid_feature_extractor", default=INCEPTION, choices=(INCEPTION, PIXEL_STATS),
                            help=f"{PIXEL_STATS} is a tiny offline stand-in for smoke tests, not a real FID")
    misc.add_runtime_args(parser)
    return parser


def check_model_args(args):
    resolve_perf_args(args)
    if args.random_init == bool(args.ckpt):
        raise misc.UsageError("pass --ckpt PATH (a MAGE checkpoint), or --random_init to run on random weights")


def check_args(args):
    check_model_args(args)
    for name in ("num_images", "batch_size", "num_iter"):
        if getattr(args, name) < 1:
            raise misc.UsageError(f"--{name} must be >= 1")
    if args.eval_fid and not os.path.isdir(args.fid_ref):
        raise misc.UsageError(f"--eval_fid needs --fid_ref DIR, a folder of reference images (got '{args.fid_ref}')")


def weights_fingerprint(model):
    """sha256 of every tensor of the model's state dict: tells checkpoints with the same file name apart."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def settings_of(args, model):
    """Everything that changes the images; stored in settings.json and checked on every rerun."""
    return {"model": args.model, "ckpt": os.path.basename(args.ckpt) if args.ckpt else "random_init",
            "weights_sha256": weights_fingerprint(model), "temp": args.temp, "num_iter": args.num_iter,
            "seed": args.seed, "amp": args.amp, "device_type": args.device.type,
            "fused_attn": args.fused_attn, "tokenizer_dtype": str(tokenizer_dtype(args, args.device)),
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
    kwargs = {"vqgan_ckpt_path": args.vqgan_ckpt}
    if args.vqgan_config:
        kwargs["vqgan_config"] = args.vqgan_config
    if num_classes:
        kwargs.update(class_cond=True, num_classes=num_classes)
    model = models_mage.MODELS[args.model](**kwargs)
    if state_dict is not None:
        load_mage_weights(model, state_dict, source=args.ckpt, tokenizer_given=bool(args.vqgan_ckpt))
    return apply_perf_settings(model.to(args.device), args, args.device).eval()


def prepare_folder(folder, settings):
    """Create the run folder, or check that an existing one was written with the same settings (rank 0)."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    settings_path = os.path.join(folder, "settings.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise misc.UsageError(f"'{folder}' holds images made with other settings ({', '.join(changed)} "
                                  f"differ); choose another --output_dir")
    else:
        write_atomic(settings_path, lambda f: f.write(json.dumps(settings, indent=2).encode()))
    for name in os.listdir(image_dir):  # partial files of a killed run
        if name.endswith(".tmp"):
            os.remove(os.path.join(image_dir, name))


def write_atomic(path, write):
    tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp_path, "wb") as f:
        write(f)
    os.replace(tmp_path, path)


def image_path(image_dir, index):
    return os.path.join(image_dir, f"{index:05d}.png")


def is_done(path):
    return os.path.isfile(path) and os.path.getsize(path) > 0


def batches_to_do(args, image_dir):
    """Fixed chunks of batch_size image indices that still miss a file, dealt out round-robin to the ranks."""
    todo = []
    for start in range(0, args.num_images, args.batch_size):
        indices = list(range(start, min(start + args.batch_size, args.num_images)))
        if not all(is_done(image_path(image_dir, k)) for k in indices):
            todo.append(indices)
    return todo[misc.get_rank()::misc.get_world_size()]


def generate_batch(model, indices, args):
    """Images for the given indices as uint8 (B, H, W, 3) on the CPU."""
    ids = torch.full((len(indices), model.seq_len), model.mask_token_label, dtype=torch.long, device=args.device)
    generators = image_generators(args.seed, indices, args.device)
    with misc.autocast(args.device, args.amp):
        ids = iterative_decode(model, ids, num_iter=args.num_iter, temperature=args.temp, generator=generators)
    images = decode_tokens(model, ids)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(array, path):
    write_atomic(path, lambda f: Image.fromarray(array.numpy()).save(f, format="PNG"))


def save_grid(image_dir, num_images, path):
    count = min(GRID_IMAGES, num_images)
    images = [read_image(image_path(image_dir, k), mode=ImageReadMode.RGB) for k in range(count)]
    grid = make_grid(torch.stack(images), nrow=math.ceil(math.sqrt(count)), padding=2)
    save_png(grid.permute(1, 2, 0).contiguous(), path)


def evaluate(args, image_dir, folder, settings):
    metrics = compute_metrics(image_dir, args.fid_ref, device=args.device, isc=True, fid=True, kid=args.fid_kid,
                              prc=args.fid_prc, weights_path=args.fid_weights or None,
                              feature_extractor=args.fid_feature_extractor, batch_size=args.fid_batch_size)
    report = {"metrics": metrics, "num_images": args.num_images, "fid_ref": os.path.abspath(args.fid_ref),
              "feature_extractor": args.fid_feature_extractor, "settings": settings}
    write_atomic(os.path.join(folder, "metrics.json"), lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(json.dumps(metrics, indent=2))


def main(args):
    check_args(args)
    misc.init_distributed_mode(args)
    if args.eval_fid and args.fid_feature_extractor == INCEPTION and misc.is_main_process():
        resolve_inception_weights(args.fid_weights or None)  # fail now rather than after generating
    model = build_model(args)
    folder = run_folder(args)
    image_dir = os.path.join(folder, "images")
    settings = settings_of(args, model) if misc.is_main_process() else None
    if misc.is_main_process():
        prepare_folder(folder, settings)
    misc.barrier()
    batches = batches_to_do(args, image_dir)
    misc.barrier()  # every rank has listed the missing images before any rank writes
    total = sum(len(b) for b in batches)
    print(f"{folder}: {args.num_images} images, {total} to generate on rank 0 of {misc.get_world_size()}")
    with tqdm(total=total, unit="img", disable=not misc.is_main_process()) as progress:
        for indices in batches:
            images = generate_batch(model, indices, args)
            for index, array in zip(indices, images):
                path = image_path(image_dir, index)
                if not is_done(path):
                    save_png(array, path)
            progress.update(len(indices))
    misc.barrier()
    if misc.is_main_process():
        save_grid(image_dir, args.num_images, os.path.join(folder, "grid.png"))
        print(f"wrote {image_dir} and {os.path.join(folder, 'grid.png')}")
        if args.eval_fid:
            evaluate(args, image_dir, folder, settings)
    misc.barrier()
    misc.cleanup_distributed()


if __name__ == "__main__":
    misc.run_script(get_args_parser(), main)
