"""Class-conditional image generation with classifier-free guidance, sharded over ranks, resumable, with FID/IS
and the classification accuracy of the samples.

    python gen_img_cond.py --model mage_vit_base_patch16 --ckpt mage-vitb-cond.pth --cfg 3 --cfg_schedule linear \
        --temp 6.0 --num_iter 20 --num_images_per_class 50 --output_dir output_dir
    torchrun --nproc_per_node=8 gen_img_cond.py --ckpt mage-vitb-cond.pth --cfg 3 --cfg_schedule linear \
        --eval_fid --fid_ref data/imagenet-val-256 --eval_classifier finetuned-vitb.pth

The checkpoint is a class-conditional MAGE (main_pretrain.py --class_cond). Layout:
OUTPUT_DIR/<settings>/images/<class id, 4 digits>/<k, 5 digits>.png, grid.png (one row per class, the first
GRID_CLASSES classes), settings.json and metrics.json. Image k of class c depends only on (seed, c, k, settings):
it has its own random generator, and batches are fixed chunks of the (class, k) list dealt out to the ranks, so
any number of processes writes the same files for the same per-process batch size, thread count and device kind.
A rerun skips written images.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import os

import torch
from PIL import Image

import models_vit
import util.datasets as data
from gen_img_uncond import add_model_args, build_model, check_model_args
from util import generation
from util.cli import add_runtime_args, run_script
from util.distributed import barrier, cleanup_distributed, is_main_process
from util.checkpoint import save_json_atomic
from util.errors import UsageError
from util.precision import autocast
from util.run import setup_run
from util.sampling import CFG_SCHEDULES, class_image_generators, decode_tokens, iterative_decode

GRID_CLASSES = 16
GRID_PER_CLASS = 8


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE class-conditional generation", add_help=True)
    model = add_model_args(parser)
    model.add_argument("--num_classes", default=1000, type=int, help="classes of the model with --random_init")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--class_ids", default=None, type=int, nargs="+",
                          help="classes to generate (default: all classes of the model)")
    sampling.add_argument("--num_images_per_class", default=50, type=int)
    sampling.add_argument("--cfg", default=0.0, type=float,
                          help="classifier-free guidance scale w: logits = cond + w * (cond - uncond); 0 is the "
                               "plain conditional sampler (MaskGIT's), which needs half the compute")
    sampling.add_argument("--cfg_schedule", default="constant", choices=CFG_SCHEDULES,
                          help="constant w, or w * (t + 1) / num_iter at step t (MUSE, MAR, RCG)")
    sampling.add_argument("--temp", default=4.5, type=float, help="choice temperature")
    sampling.add_argument("--num_iter", default=12, type=int, help="decoding steps")
    sampling.add_argument("--batch_size", default=32, type=int,
                          help="images per forward pass per process (guidance doubles the rows of a pass); the files "
                               "are the same for the same batch size, thread count and device kind (another "
                               "batch size may change some images)")
    sampling.add_argument("--output_dir", default="output_dir")
    evaluation = generation.add_fid_args(parser)
    evaluation.add_argument("--eval_classifier", default="",
                            help="a fine-tuned classifier (main_finetune.py checkpoint) labels the samples: overall "
                                 "and per-class accuracy go to metrics.json")
    evaluation.add_argument("--classifier_model", default=None, choices=sorted(models_vit.MODELS),
                            help="the preset of an --eval_classifier checkpoint without training args (the "
                                 "released fine-tuned ViTs: vit_base_patch16 / vit_large_patch16)")
    evaluation.add_argument("--classifier_batch_size", default=64, type=int)
    add_runtime_args(parser, data_loader=False)
    return parser


def check_args(args):
    check_model_args(args)
    for name in ("num_images_per_class", "batch_size", "num_iter", "num_classes", "classifier_batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.class_ids is not None and len(set(args.class_ids)) != len(args.class_ids):
        raise UsageError(f"--class_ids lists a class twice: {args.class_ids}")
    if args.eval_classifier and not os.path.isfile(args.eval_classifier):
        raise UsageError(f"--eval_classifier '{args.eval_classifier}' is not a file")
    generation.check_fid_args(args)


def resolve_class_ids(args, model):
    """--class_ids checked against the model's classes (all of them by default)."""
    if args.class_ids is None:
        return list(range(model.num_classes))
    outside = [c for c in args.class_ids if not 0 <= c < model.num_classes]
    if outside:
        raise UsageError(f"--class_ids {outside} outside the model's {model.num_classes} classes")
    return list(args.class_ids)


def settings_of(args, model, class_ids):
    """Everything that changes the images; stored in settings.json and checked on every rerun."""
    return {"model": args.model, "ckpt": os.path.basename(args.ckpt) if args.ckpt else "random_init",
            "weights_sha256": generation.weights_fingerprint(model), "class_ids": class_ids,
            "num_images_per_class": args.num_images_per_class, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
            "temp": args.temp, "num_iter": args.num_iter, "seed": args.seed, "amp": args.amp,
            "device_type": args.device.type, "fused_attn": args.fused_attn,
            "tokenizer_dtype": args.tokenizer_dtype, "channels_last": args.channels_last}


def run_folder(args):
    source = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else f"{args.model}-random_init"
    schedule = "" if args.cfg_schedule == "constant" else f"-{args.cfg_schedule}"
    name = f"{source}_cfg{args.cfg:g}{schedule}_temp{args.temp:g}_iter{args.num_iter}_seed{args.seed}_{args.amp}"
    return os.path.join(args.output_dir, name)


def image_path(image_dir, class_id, index):
    return os.path.join(image_dir, f"{class_id:04d}", f"{index:05d}.png")


def item_of(class_ids, per_class, item):
    """(class id, image index k) of item number `item` (class-major order)."""
    return class_ids[item // per_class], item % per_class


def generate_batch(model, pairs, args):
    """Images of the given (class id, k) pairs as uint8 (B, H, W, 3) on the CPU."""
    classes, indices = zip(*pairs)
    ids = torch.full((len(pairs), model.seq_len), model.mask_token_label, dtype=torch.long, device=args.device)
    labels = torch.tensor(classes, dtype=torch.long, device=args.device)
    generators = class_image_generators(args.seed, classes, indices, args.device)
    with autocast(args.device, args.amp):
        ids = iterative_decode(model, ids, num_iter=args.num_iter, temperature=args.temp, generator=generators,
                               labels=labels, cfg=args.cfg, cfg_schedule=args.cfg_schedule)
    return generation.to_uint8(decode_tokens(model, ids))


@torch.no_grad()
def classify(args, paths):
    """Predicted classes (N,) of the PNGs by the --eval_classifier checkpoint, evaluated as main_finetune.py
    --eval does: its eval transform (resize, center crop, normalisation), back to pixels, autocast --amp.
    Runs on rank 0 alone."""
    model, train_args = models_vit.load_finetuned_classifier(args.eval_classifier, args.classifier_model)
    model.to(args.device).eval()
    mean, std = data.finetune_mean_std(train_args)
    transform = data.eval_transform(train_args.input_size, train_args.interpolation, mean, std)
    predictions = []
    for start in range(0, len(paths), args.classifier_batch_size):
        batch = [transform(Image.open(p).convert("RGB")) for p in paths[start:start + args.classifier_batch_size]]
        images = data.denormalize(torch.stack(batch).to(args.device), mean, std)
        with autocast(args.device, args.amp):
            predictions.append(model(images).float().argmax(dim=1).cpu())
    return torch.cat(predictions)


def classifier_report(args, image_dir, class_ids):
    """Accuracy of the samples (the fraction labelled with the class they were generated for), overall and per
    class, in percent."""
    pairs = [(c, k) for c in class_ids for k in range(args.num_images_per_class)]
    predicted = classify(args, [image_path(image_dir, c, k) for c, k in pairs])
    wanted = torch.tensor([c for c, _ in pairs])
    correct = (predicted == wanted).float()
    per_class = {str(c): 100 * correct[wanted == c].mean().item() for c in class_ids}
    report = {"checkpoint": os.path.abspath(args.eval_classifier), "accuracy_pct": 100 * correct.mean().item(),
              "per_class_pct": per_class, "min_class_accuracy_pct": min(per_class.values()),
              "num_images": len(pairs)}
    print(f"classification accuracy of the samples: {report['accuracy_pct']:.2f}% (lowest class "
          f"{report['min_class_accuracy_pct']:.2f}%)")
    return report


def evaluate(args, folder, image_dir, class_ids, settings):
    report = {"num_images": len(class_ids) * args.num_images_per_class, "settings": settings}
    if args.eval_classifier:
        report["classifier"] = classifier_report(args, image_dir, class_ids)
    if args.eval_fid:
        return generation.evaluate_fid(args, image_dir, folder, report)
    save_json_atomic(os.path.join(folder, "metrics.json"), report)
    return report


def main(args):
    setup_run(args, check_args, create_output_dir=False)  # generation.prepare_folder lays out the run folder
    generation.check_fid_weights(args)
    model = build_model(args, class_cond=True)
    class_ids = resolve_class_ids(args, model)
    folder = run_folder(args)
    image_dir = os.path.join(folder, "images")
    per_class = args.num_images_per_class

    def path_of(item):
        return image_path(image_dir, *item_of(class_ids, per_class, item))

    def generate(items):
        return generate_batch(model, [item_of(class_ids, per_class, i) for i in items], args)

    settings = settings_of(args, model, class_ids) if is_main_process() else None
    generation.generate_missing(folder, settings, len(class_ids) * per_class, args.batch_size, path_of, generate)
    result = {"folder": folder, "image_dir": image_dir, "class_ids": class_ids}
    if is_main_process():
        shown = class_ids[:GRID_CLASSES]
        columns = min(GRID_PER_CLASS, per_class)
        generation.save_grid([image_path(image_dir, c, k) for c in shown for k in range(columns)],
                             os.path.join(folder, "grid.png"), nrow=columns)
        print(f"wrote {image_dir} and {os.path.join(folder, 'grid.png')}")
        if args.eval_classifier or args.eval_fid:
            result["metrics"] = evaluate(args, folder, image_dir, class_ids, settings)
    barrier()
    cleanup_distributed()
    return result


if __name__ == "__main__":
    run_script(get_args_parser(), main)
