"""The built-in end-to-end run: from no data to a tokenizer, a pre-trained MAGE, generated images and a linear
probe, on a CPU in minutes, with nothing downloaded.

    python demo.py --output_dir demo_out            # the default run (<= 15 minutes on 2 CPU cores)
    python demo.py --output_dir demo_out --quick    # every stage on a tiny schedule (the test suite)

Stages (each prints its progress; OUTPUT_DIR/<stage>/ holds its files):
  data       the procedural labelled ImageFolder of util/synthetic_data.py
  tokenizer  VQGAN tokenizer training (main_tokenizer.py)
  pretrain   the tokens of the training images and their flips, cached once (main_cache_tokens.py --views
             flips), + class-conditional MAGE pre-training on them with label dropout (main_pretrain.py
             --cached_tokens --class_cond): one model for conditional and unconditional sampling
  probe      linear probe of the encoder (main_linprobe.py) and the same logistic regression on MAGE
             features and on raw pixels (util/synthetic_data.fit_linear_probe), on the same split
  generate   unconditional samples through the "no class" token (gen_img_uncond.py), class-conditional samples
             at a few guidance scales (gen_img_cond.py --cfg) and an inpainting example (edit_img.py)
  classes    a small CNN trained on the real train split (util/judge.py) labels the samples: the class
             histogram of the unconditional ones, the accuracy (overall, per class) of the conditional ones
  fid        FID/IS of the samples against the val split when Inception weights are on disk, else skipped

Each stage is a function that runs the scripts' main() (printing the equivalent command) and returns a small
result dict built from theirs. A stage whose OUTPUT_DIR/<stage>/stage.json records the same settings is
skipped; a stage that was interrupted continues where it stopped (the scripts' --auto_resume, written images
are kept). Ends with a summary table, OUTPUT_DIR/summary.json and pictures in OUTPUT_DIR/pictures/.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import os
import copy
import glob
import json
import math
import shlex
import shutil
import time
from typing import Callable, NamedTuple

import torch

import edit_img
import gen_img_cond
import gen_img_uncond
import main_cache_tokens
import main_linprobe
import main_pretrain
import main_tokenizer
import models_vit
from taming.models.vqgan import build_vqgan, load_vqgan_config, token_grid_size
from util import judge, plots, synthetic_data
from util.checkpoint import save_json_atomic
from util.errors import CheckpointError, TrainingError, UsageError
from util.fid import INCEPTION, FidWeightsError, compute_metrics, inception_cache_path, resolve_inception_weights
from util.output_dir import DirectoryLock, OutputDirError, check_writable_folder
from util.precision import autocast, default_amp

# Settings of each stage. The tokenizer gets main_tokenizer.py's recipe for config/vqgan_demo.yaml plus
# these flags (its --quick schedule for the quick run). Pre-training uses the explicit attention: over 64 tokens
# on a CPU under bf16 it ran a step 1.4x faster than scaled_dot_product_attention (whose backward dominated).
PRESETS = {
    "default": {
        "data": {"num_train": 500, "num_val": 60},
        "tokenizer": {"flags": ["--epochs", 3, "--channels_last"]},
        "pretrain": {"model": "mage_vit_demo", "num_views": 2, "epochs": 30, "batch_size": 64, "lr": 2e-3,
                     "warmup_epochs": 2, "weight_decay": 0.05, "dropout": 0.0, "fused_attn": False,
                     "label_drop_prob": 0.1, "code_emb_init": "codebook"},
        "generate": {"num_images": 512, "num_iter": 24, "temp": 6.0, "batch_size": 64, "num_inpaint": 8,
                     "num_per_class": 24, "cond_temp": 2.0, "cfg": 3.0, "cfg_sweep": [0.0, 1.0, 3.0],
                     "cfg_schedule": "constant"},
        "probe": {"epochs": 90, "batch_size": 256, "blr": 1.0, "warmup_epochs": 10},
        "classes": {"epochs": 6, "batch_size": 64},
    },
    "quick": {
        "data": {"num_train": 16, "num_val": 4},
        "tokenizer": {"flags": ["--quick", "--print_freq", 2]},  # a loss point every 2 of its 8 steps
        "pretrain": {"model": "mage_vit_demo", "num_views": 1, "epochs": 3, "batch_size": 16, "lr": 1.5e-3,
                     "warmup_epochs": 1, "weight_decay": 0.05, "dropout": 0.0, "fused_attn": False,
                     "label_drop_prob": 0.1, "code_emb_init": "codebook"},
        "generate": {"num_images": 16, "num_iter": 4, "temp": 4.5, "batch_size": 16, "num_inpaint": 4,
                     "num_per_class": 2, "cond_temp": 2.0, "cfg": 1.0, "cfg_sweep": [0.0], "cfg_schedule": "constant"},
        "probe": {"epochs": 3, "batch_size": 64, "blr": 1.0, "warmup_epochs": 1},
        "classes": {"epochs": 2, "batch_size": 64},
    },
}
# demo.py --contrastive: MAGE-C pre-training in place of MAGE's (docs/mage_c_recipe.md). Each step carries two
# views of every image, so half the epochs keep the wall-clock budget; the views are SimCLR's augmentation,
# cached like MAGE's flips; the projector is narrower than CAN's 4096 (the encoder is 128 wide).
CONTRASTIVE = {"contrastive_weight": 0.045, "views": "contrastive", "num_views": 4, "epochs_factor": 0.5,
               "projector_hidden_dim": 512}
AMP_TOKENIZER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_CLASS_FRACTION = 0.05  # a sample histogram with every class at least this often is "not collapsed"
PICTURE_SIDE = 96  # small images are enlarged (nearest neighbour) to about this many pixels in the pictures


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE built-in demo: dataset -> tokenizer -> MAGE -> samples -> probe",
                                     add_help=True)
    parser.add_argument("--output_dir", default="demo_out", help="all stages' files, summary.json, pictures/")
    parser.add_argument("--quick", action="store_true", help="tiny data and schedules (minutes; the test suite)")
    parser.add_argument("--device", default="auto", help="'auto' (a GPU when there is one), 'cuda' or 'cpu'")
    parser.add_argument("--vqgan_config", default="config/vqgan_demo.yaml",
                        help="tokenizer architecture; its resolution sets the image size of the dataset")
    parser.add_argument("--seed", default=0, type=int, help="dataset and training seed")
    parser.add_argument("--fid_weights", default="",
                        help="torch-fidelity Inception weights file (default: the torch hub cache); without "
                             "them the FID/IS stage is skipped")
    parser.add_argument("--pretrain_epochs", default=0, type=int,
                        help="MAGE pre-training epochs instead of the preset's (more compute, better samples)")
    parser.add_argument("--contrastive", action="store_true",
                        help="MAGE-C: pre-train with the contrastive loss (main_pretrain.py --contrastive_weight) "
                             "on SimCLR views, in the same wall-clock budget")
    parser.add_argument("--contrastive_weight", default=CONTRASTIVE["contrastive_weight"], type=float,
                        help="lambda of --contrastive")
    parser.add_argument("--stop_after", default="", choices=[""] + [stage.name for stage in STAGES],
                        help="stop after this stage (a later run continues from there)")
    return parser


class Context:
    """What the stages share: the flags, the preset, the device, the output folder, and the results and times
    of the stages so far (a result names its files relative to the output folder: see file())."""

    def __init__(self, args):
        if args.pretrain_epochs < 0:
            raise SystemExit(f"demo: --pretrain_epochs must be >= 0, got {args.pretrain_epochs}")
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        self.preset = copy.deepcopy(PRESETS["quick" if args.quick else "default"])
        pretrain = self.preset["pretrain"]
        if args.contrastive_weight != CONTRASTIVE["contrastive_weight"] and not args.contrastive:
            raise SystemExit("demo: --contrastive_weight needs --contrastive")
        if args.contrastive:
            pretrain.update(contrastive_weight=args.contrastive_weight, views=CONTRASTIVE["views"],
                            num_views=max(pretrain["num_views"], CONTRASTIVE["num_views"]),
                            projector_hidden_dim=CONTRASTIVE["projector_hidden_dim"],
                            epochs=max(1, round(pretrain["epochs"] * CONTRASTIVE["epochs_factor"])))
        if args.pretrain_epochs:
            pretrain["epochs"] = args.pretrain_epochs
        self.device = args.device
        if args.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vqgan_settings = load_vqgan_config(args.vqgan_config)
        self.resolution = self.vqgan_settings["ddconfig"]["resolution"]
        self.scale = max(1, PICTURE_SIDE // self.resolution)  # of the images in the pictures
        self.settings, self.results, self.times, self.skipped = {}, {}, {}, []

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def relative(self, path):
        """How a stage's result names a file: relative to the output folder, which may move."""
        return os.path.relpath(path, self.out)

    def file(self, stage, key):
        """The file that the result of `stage` names under `key`."""
        return self.path(self.results[stage][key])

    def split_images(self, split):
        """(N, 3, R, R) float images in [0, 1] and labels of a split of the dataset, ImageFolder order."""
        return synthetic_data.load_split_images(self.path("data"), split)


def run_main(module, argv):
    """module.main() on these command-line flags, in this process, returning its result dict. Prints the
    equivalent command; the scripts' usage and training errors stop the demo with a one-line message."""
    argv = [str(a) for a in argv]
    print(f"$ python {module.__name__}.py {shlex.join(argv)}", flush=True)
    args = module.get_args_parser().parse_args(argv)
    try:
        return module.main(args)
    except (UsageError, TrainingError, CheckpointError) as err:
        raise SystemExit(f"demo: {module.__name__} failed: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Stages: run(ctx, folder) -> result dict (JSON, kept in folder/stage.json) and describe(result) -> one line
# ----------------------------------------------------------------------------------------------------------

def data_settings(ctx):
    return {**ctx.preset["data"], "size": ctx.resolution, "seed": ctx.args.seed}


def stage_data(ctx, folder):
    preset = ctx.preset["data"]
    info = synthetic_data.generate(folder, preset["num_train"], preset["num_val"], ctx.resolution,
                                   seed=ctx.args.seed)
    return {"classes": info["classes"], "size": ctx.resolution, "per_class": info["per_class"]}


def describe_data(result):
    counts = result["per_class"]
    return (f"{len(result['classes'])} classes x ({counts['train']} train + {counts['val']} val) images of "
            f"{result['size']}x{result['size']} px")


def tokenizer_settings(ctx):
    return {**ctx.preset["tokenizer"], "vqgan": ctx.vqgan_settings}


def stage_tokenizer(ctx, folder):
    result = run_main(main_tokenizer, [
        "--data_path", ctx.path("data"), "--output_dir", folder, "--vqgan_config", ctx.args.vqgan_config,
        "--device", ctx.device, "--seed", ctx.args.seed, "--num_workers", 0, "--print_freq", 10, "--auto_resume",
        *ctx.preset["tokenizer"]["flags"]])
    reconstruction_picture(ctx, result["tokenizer_config"], result["tokenizer"])
    return {"psnr_db": result["psnr"], "codebook_usage_pct": result["codebook_usage"],
            "perplexity": result["perplexity"], "codes": ctx.vqgan_settings["n_embed"],
            "token_grid": token_grid_size(ctx.vqgan_settings), "steps": result["steps"],
            "tokenizer": ctx.relative(result["tokenizer"]),
            "tokenizer_config": ctx.relative(result["tokenizer_config"])}


def describe_tokenizer(result):
    grid = result["token_grid"]
    return (f"val PSNR {result['psnr_db']:.2f} dB, codebook usage {result['codebook_usage_pct']:.1f}% of "
            f"{result['codes']} codes, {grid}x{grid} tokens, {result['steps']} steps")


@torch.no_grad()
def reconstruct(config, checkpoint, images, batch_size=256):
    """(N, 3, R, R) images in [0, 1] through the tokenizer (encode, quantise, decode), on the CPU."""
    vqgan, _ = build_vqgan(config, checkpoint)
    return torch.cat([vqgan(batch)[0].float().clamp(0, 1) for batch in images.split(batch_size)])


def reconstruction_picture(ctx, config, checkpoint):
    """Rows: val images (two per class) over their reconstructions through the trained tokenizer."""
    images, labels = ctx.split_images("val")
    chosen = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in labels.unique()])
    originals = images[chosen]
    reconstructions = reconstruct(config, checkpoint, originals)
    half = math.ceil(len(chosen) / 2)
    rows = [originals[:half], reconstructions[:half], originals[half:], reconstructions[half:]]
    plots.save_rows([r for r in rows if len(r)], ctx.path("pictures", "reconstructions.png"), ctx.scale)


def stage_pretrain(ctx, folder):
    preset = ctx.preset["pretrain"]
    tokenizer, config = ctx.file("tokenizer", "tokenizer"), ctx.file("tokenizer", "tokenizer_config")
    # The tokens of the whole training images and their flips, once. main_cache_tokens.py's default random
    # crops (scale 0.2-1) suit long schedules; in the demo's few epochs the model would then learn zoomed-in
    # parts more than shapes.
    cache = run_main(main_cache_tokens, [
        "--data_path", ctx.path("data"), "--output_dir", os.path.join(folder, "token_cache"),
        "--views", preset.get("views", "flips"),
        "--num_views", preset["num_views"], "--input_size", ctx.resolution, "--batch_size", 256,
        "--vqgan_config", config, "--vqgan_ckpt", tokenizer, "--device", ctx.device, "--seed", ctx.args.seed,
        "--num_workers", 0])
    result = run_main(main_pretrain, [
        "--model", preset["model"], "--vqgan_config", config, "--vqgan_ckpt", tokenizer,
        "--input_size", ctx.resolution, "--data_path", ctx.path("data"), "--cached_tokens", cache["output_dir"],
        "--batch_size", preset["batch_size"], "--epochs", preset["epochs"], "--lr", preset["lr"],
        "--warmup_epochs", preset["warmup_epochs"], "--weight_decay", preset["weight_decay"],
        "--dropout", preset["dropout"], "--class_cond", "--label_drop_prob", preset["label_drop_prob"],
        "--code_emb_init", preset["code_emb_init"], "--fused_attn" if preset["fused_attn"] else "--no-fused_attn",
        "--output_dir", folder, "--log_dir", os.path.join(folder, "tb"),
        "--save_every", 0, "--vis_every", 0, "--auto_resume", "--device", ctx.device,
        "--seed", ctx.args.seed, "--num_workers", 0, *contrastive_args(preset)])
    loss_picture(ctx)
    history = result["history"]
    return {"final_loss": result["final_loss"], "first_epoch_loss": history[0]["train_loss"],
            "epochs": result["epochs"], "steps": result["epochs"] * result["steps_per_epoch"],
            "checkpoint": ctx.relative(result["checkpoint"]),
            "contrastive_weight": preset.get("contrastive_weight", 0.0),
            "final_contrastive_loss": result["final_contrastive_loss"],
            "final_contrastive_acc": result["final_contrastive_acc"]}


def contrastive_args(preset):
    """main_pretrain.py's MAGE-C flags of a --contrastive run (none for MAGE)."""
    if not preset.get("contrastive_weight"):
        return []
    return ["--contrastive_weight", preset["contrastive_weight"], "--projector_hidden_dim",
            preset["projector_hidden_dim"]]


def describe_pretrain(result):
    line = (f"loss {result['first_epoch_loss']:.3f} (epoch 1) -> {result['final_loss']:.3f} (epoch "
            f"{result['epochs']}), {result['steps']} steps")
    if result.get("contrastive_weight"):
        line += (f"; MAGE-C (lambda {result['contrastive_weight']:g}): InfoNCE {result['final_contrastive_loss']:.3f}, "
                 f"positive first {100 * result['final_contrastive_acc']:.1f}%")
    return line


def loss_picture(ctx):
    tokenizer = plots.read_scalars(ctx.path("tokenizer"), "train/rec_loss")
    steps, losses = plots.read_scalars(ctx.path("pretrain", "tb"), "train_loss")
    panels = [("tokenizer: L1 reconstruction loss", "step", *tokenizer),
              ("MAGE pre-training: masked-token loss", "epoch", [step / 1000 for step in steps], losses)]
    plots.loss_curves(panels, ctx.path("pictures", "loss_curves.png"))


def generator_args(ctx, preset):
    return ["--model", ctx.preset["pretrain"]["model"], "--ckpt", ctx.file("pretrain", "checkpoint"),
            "--vqgan_config", ctx.file("tokenizer", "tokenizer_config"), "--num_iter", preset["num_iter"],
            "--temp", preset["temp"], "--batch_size", preset["batch_size"], "--device", ctx.device,
            "--seed", ctx.args.seed]


def guidance_scales(preset):
    """The guidance scales w of the sweep, the chosen one included, in increasing order."""
    return sorted(set(preset["cfg_sweep"]) | {preset["cfg"]})


def stage_generate(ctx, folder):
    """Unconditional samples (the class-conditional model's "no class" token), class-conditional samples at
    every guidance scale of the sweep, and inpainting."""
    preset = ctx.preset["generate"]
    result = run_main(gen_img_uncond, generator_args(ctx, preset) + [
        "--num_images", preset["num_images"], "--output_dir", folder])
    plots.enlarge(result["grid"], ctx.path("pictures", "samples.png"), ctx.scale)
    conditional = {}
    for cfg in guidance_scales(preset):
        run = run_main(gen_img_cond, generator_args(ctx, preset) + [
            "--num_images_per_class", preset["num_per_class"], "--temp", preset["cond_temp"], "--cfg", cfg,
            "--cfg_schedule", preset["cfg_schedule"], "--output_dir", os.path.join(folder, "conditional")])
        conditional[f"{cfg:g}"] = ctx.relative(run["image_dir"])
    inpaint(ctx, folder, preset)
    return {"image_dir": ctx.relative(result["image_dir"]), "num_images": result["num_images"],
            "num_iter": preset["num_iter"], "temp": preset["temp"], "cond_temp": preset["cond_temp"],
            "conditional_dirs": conditional,
            "num_per_class": preset["num_per_class"], "cfg": preset["cfg"], "cfg_schedule": preset["cfg_schedule"]}


def describe_generate(result):
    scales = ", ".join(result["conditional_dirs"])
    return (f"{result['num_images']} unconditional (temperature {result['temp']:g}) + {result['num_per_class']} per "
            f"class at w = {scales} (temperature {result['cond_temp']:g}), {result['num_iter']} steps")


def inpaint(ctx, folder, preset):
    """edit_img.py --mode inpaint on val images (one per class, in turn): a central box is regenerated.
    Pictured as three rows: input | kept tokens | inpainted."""
    inputs = os.path.join(folder, "inpaint_inputs")
    os.makedirs(inputs, exist_ok=True)
    classes = sorted(os.listdir(ctx.path("data", "val")))
    for k in range(preset["num_inpaint"]):
        name = classes[k % len(classes)]
        source = sorted(glob.glob(ctx.path("data", "val", name, "*.png")))[k // len(classes)]
        shutil.copyfile(source, os.path.join(inputs, f"{k:02d}_{name}.png"))
    low, high = round(ctx.resolution * 5 / 16), round(ctx.resolution * 11 / 16)
    result = run_main(edit_img, generator_args(ctx, preset) + [
        "--mode", "inpaint", "--input", inputs, "--box", low, low, high, high,
        "--output_dir", os.path.join(folder, "inpaint")])
    cells = plots.grid_cells(result["grid"], ctx.resolution, rows=preset["num_inpaint"], columns=3)
    plots.save_rows(list(cells.transpose(0, 1)), ctx.path("pictures", "inpainting.png"), ctx.scale,
                    labels=["input", "kept tokens", "inpainted"])


def stage_probe(ctx, folder):
    preset = ctx.preset["probe"]
    num_classes = len(ctx.results["data"]["classes"])
    result = run_main(main_linprobe, [
        "--model", "vit_demo", "--vqgan_config", ctx.file("tokenizer", "tokenizer_config"),
        "--input_size", ctx.resolution, "--finetune", ctx.file("pretrain", "checkpoint"), "--global_pool",
        "--nb_classes", num_classes, "--data_path", ctx.path("data"), "--cache_features", "--no-train_aug",
        "--batch_size", preset["batch_size"], "--epochs", preset["epochs"], "--blr", preset["blr"],
        "--warmup_epochs", preset["warmup_epochs"], "--output_dir", os.path.join(folder, "linprobe"),
        "--log_dir", "", "--save_every", 0, "--auto_resume", "--device", ctx.device,
        "--seed", ctx.args.seed, "--num_workers", 0])
    print("logistic regression (util.synthetic_data.fit_linear_probe) on MAGE features and on raw pixels ...")
    mage_acc, mage_wd = synthetic_data.fit_linear_probe(*mage_features(ctx))
    pixel_acc, pixel_wd = synthetic_data.raw_pixel_baseline(ctx.path("data"))
    return {"mage_logreg_acc": 100 * mage_acc, "raw_pixel_logreg_acc": 100 * pixel_acc,
            "weight_decay": {"mage": mage_wd, "raw_pixels": pixel_wd}, "linprobe_lars_acc": result["acc1"],
            "chance_acc": 100 / num_classes}


def describe_probe(result):
    return (f"MAGE features {result['mage_logreg_acc']:.1f}% vs raw pixels {result['raw_pixel_logreg_acc']:.1f}% "
            f"(logistic regression); main_linprobe {result['linprobe_lars_acc']:.1f}%; chance "
            f"{result['chance_acc']:.1f}%")


@torch.no_grad()
def mage_features(ctx):
    """(train features, labels, val features, labels): the pre-trained encoder's mean-pooled features of the
    whole images (what pre-training saw; main_linprobe.py resizes and center-crops)."""
    model = models_vit.vit_demo(num_classes=len(ctx.results["data"]["classes"]), global_pool=True,
                                vqgan_config=ctx.file("tokenizer", "tokenizer_config"))
    models_vit.load_mage_checkpoint_into_classifier(model, ctx.file("pretrain", "checkpoint"))
    amp = default_amp()
    model.to(ctx.device).eval().vqgan.set_inference_mode(AMP_TOKENIZER_DTYPES[amp], channels_last=True)
    arrays = []
    for split in ("train", "val"):
        images, labels = ctx.split_images(split)
        with autocast(ctx.device, amp):
            features = [model.forward_features(batch.to(ctx.device)).float().cpu() for batch in images.split(256)]
        arrays += [torch.cat(features), labels]
    return arrays


def stage_classes(ctx, folder):
    """util/judge.py's CNN, trained on the real train split, names the class of every sample."""
    preset = ctx.preset["classes"]
    classes = ctx.results["data"]["classes"]
    torch.manual_seed(ctx.args.seed)
    model = judge.train_judge(*ctx.split_images("train"), len(classes), preset["epochs"], preset["batch_size"],
                              ctx.device)
    val_images, val_labels = ctx.split_images("val")
    val_acc = (judge.predict(model, val_images, ctx.device) == val_labels).float().mean().item()
    # Every sample is decoded by the tokenizer, so the judge's accuracy on the tokenizer's reconstructions of
    # real val images is the most that samples of a perfect MAGE could reach.
    reconstructed = reconstruct(ctx.file("tokenizer", "tokenizer_config"), ctx.file("tokenizer", "tokenizer"),
                                val_images)
    reconstruction_predicted = judge.predict(model, reconstructed, ctx.device)
    reconstruction_per_class = judge.per_class_accuracy(reconstruction_predicted, val_labels, len(classes))
    paths = sorted(glob.glob(os.path.join(ctx.file("generate", "image_dir"), "*.png")))
    samples = judge.load_images(paths)
    predicted = judge.predict(model, samples, ctx.device)
    fractions = judge.class_fractions(predicted, len(classes))
    plots.save_rows([samples[predicted == c][:10] for c in range(len(classes))],
                    ctx.path("pictures", "samples_by_class.png"), ctx.scale,
                    labels=[f"{name} ({int((predicted == c).sum())})" for c, name in enumerate(classes)])
    conditional = {cfg: judge_conditional(ctx, model, ctx.path(image_dir))
                   for cfg, image_dir in ctx.results["generate"]["conditional_dirs"].items()}
    chosen = f"{ctx.results['generate']['cfg']:g}"
    conditional_pictures(ctx, conditional, chosen)
    return {"classifier_val_acc": 100 * val_acc, "num_samples": len(paths),
            "reconstruction_acc_pct": 100 * (reconstruction_predicted == val_labels).float().mean().item(),
            "reconstruction_per_class_pct": {name: 100 * acc for name, acc in zip(classes, reconstruction_per_class)},
            "histogram": dict(zip(classes, fractions)), "min_class_fraction": min(fractions),
            "collapsed": min(fractions) < MIN_CLASS_FRACTION, "cfg": float(chosen),
            "conditional_accuracy_pct": conditional[chosen]["accuracy_pct"],
            "conditional_per_class_pct": conditional[chosen]["per_class_pct"],
            "guidance_sweep": {cfg: {k: v for k, v in report.items() if k != "samples"}
                               for cfg, report in conditional.items()}}


def judge_conditional(ctx, model, image_dir):
    """The judge's accuracy on the class-conditional samples of one guidance scale: overall and per class, in
    percent (a sample counts when the judge names the class it was generated for). gen_img_cond.py writes
    image_dir/<class id, 4 digits>/<k>.png."""
    classes = ctx.results["data"]["classes"]
    paths = sorted(glob.glob(os.path.join(image_dir, "*", "*.png")))
    intended = torch.tensor([int(os.path.basename(os.path.dirname(p))) for p in paths])
    samples = judge.load_images(paths)
    predicted = judge.predict(model, samples, ctx.device)
    per_class = judge.per_class_accuracy(predicted, intended, len(classes))
    return {"accuracy_pct": 100 * (predicted == intended).float().mean().item(),
            "per_class_pct": {name: 100 * acc for name, acc in zip(classes, per_class)},
            "samples": [samples[intended == c] for c in range(len(classes))]}


def conditional_pictures(ctx, conditional, chosen):
    """class_conditional.png: a row of samples per class at the chosen guidance scale, labelled with the class
    and the judge's accuracy; guidance_sweep.png: accuracy (overall and of the worst class) against w."""
    report = conditional[chosen]
    labels = [f"{name.split('_', 1)[-1]} ({acc:.0f}%)" for name, acc in report["per_class_pct"].items()]
    plots.save_rows([samples[:10] for samples in report["samples"]], ctx.path("pictures", "class_conditional.png"),
                    ctx.scale, labels=labels)
    scales = sorted(conditional, key=float)
    plots.line_plot([float(w) for w in scales],
                    {"all classes": [conditional[w]["accuracy_pct"] for w in scales],
                     "worst class": [min(conditional[w]["per_class_pct"].values()) for w in scales]},
                    ctx.path("pictures", "guidance_sweep.png"), xlabel="guidance scale w",
                    ylabel="judge accuracy of the samples (%)", title="class-conditional samples",
                    highlight=float(chosen), ylim=(0, 102))


def describe_classes(result):
    verdict = "collapsed" if result["collapsed"] else "not collapsed"
    return (f"conditional {result['conditional_accuracy_pct']:.1f}% right (worst class "
            f"{min(result['conditional_per_class_pct'].values()):.1f}%) at w = {result['cfg']:g}; unconditional "
            f"rarest class {100 * result['min_class_fraction']:.1f}% ({verdict}); judge val "
            f"{result['classifier_val_acc']:.1f}%, on their reconstructions {result['reconstruction_acc_pct']:.1f}%")


def fid_weights(ctx):
    """The Inception weights file to use, or '' when there is none on disk (nothing is downloaded)."""
    if ctx.args.fid_weights:
        return ctx.args.fid_weights
    return inception_cache_path() if os.path.isfile(inception_cache_path()) else ""


def fid_settings(ctx):
    return {"weights": fid_weights(ctx) or None}


def stage_fid(ctx, folder):
    weights = fid_weights(ctx)
    if not weights:
        reason = (f"no Inception weights at {inception_cache_path()} and no --fid_weights (nothing is "
                  f"downloaded; put {os.path.basename(inception_cache_path())} there to get FID/IS)")
        print(f"FID/IS skipped: {reason}")
        return {"skipped": reason}
    reference = os.path.join(folder, "val_images")
    os.makedirs(reference, exist_ok=True)
    for path in glob.glob(ctx.path("data", "val", "*", "*.png")):
        name = f"{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}"
        shutil.copyfile(path, os.path.join(reference, name))
    metrics = compute_metrics(ctx.file("generate", "image_dir"), reference, device=ctx.device,
                              weights_path=weights, feature_extractor=INCEPTION)
    return {"fid": metrics["frechet_inception_distance"], "is_mean": metrics["inception_score_mean"],
            "is_std": metrics["inception_score_std"], "num_samples": ctx.results["generate"]["num_images"],
            "num_reference": len(os.listdir(reference))}


def describe_fid(result):
    if "skipped" in result:
        return "skipped: no Inception weights on disk"
    return f"FID {result['fid']:.2f}, IS {result['is_mean']:.2f} +- {result['is_std']:.2f}"


class Stage(NamedTuple):
    name: str  # also its folder, OUTPUT_DIR/<name>/
    title: str
    run: Callable  # run(ctx, folder) -> result dict
    describe: Callable  # describe(result) -> one line for the progress log and the summary table
    depends: tuple = ()  # the stages whose files it reads: when their settings change it is redone
    settings: Callable = None  # settings(ctx) -> what its result depends on besides `depends` and the seed
    #                            (default: its entry of the preset)


# The demo, in order. A new stage: its run and describe functions, an entry here and (usually) one per preset.
STAGES = [
    Stage("data", "make the dataset", stage_data, describe_data, settings=data_settings),
    Stage("tokenizer", "train the VQGAN tokenizer", stage_tokenizer, describe_tokenizer, ("data",),
          tokenizer_settings),
    Stage("pretrain", "pre-train MAGE on the tokens", stage_pretrain, describe_pretrain, ("data", "tokenizer")),
    Stage("probe", "linear-probe the encoder vs raw pixels", stage_probe, describe_probe, ("data", "pretrain")),
    Stage("generate", "generate images and inpaint", stage_generate, describe_generate, ("pretrain",)),
    Stage("classes", "label the samples with a classifier", stage_classes, describe_classes,
          ("data", "tokenizer", "generate")),
    Stage("fid", "FID / IS", stage_fid, describe_fid, ("data", "generate"), fid_settings),
]
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


# ----------------------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def stage_settings(ctx, stage):
    own = stage.settings(ctx) if stage.settings else ctx.preset.get(stage.name, {})
    return {"own": own, "seed": ctx.args.seed, "inputs": {dep: ctx.settings[dep] for dep in stage.depends}}


def run_stage(ctx, index, stage):
    """Run the stage unless its stage.json holds a result for the same settings; a stage whose settings.json
    differs starts over, one whose settings.json matches continues (the scripts' --auto_resume)."""
    settings = ctx.settings[stage.name] = stage_settings(ctx, stage)
    folder = ctx.path(stage.name)
    done_path = os.path.join(folder, "stage.json")
    header = f"[{index}/{len(STAGES)}] {stage.name}: {stage.title}"
    if os.path.isfile(done_path) and read_json(done_path)["settings"] == settings:
        record = read_json(done_path)
        print(f"== {header}: done earlier, skipped ({record['time_s']:.0f} s when it ran)", flush=True)
        ctx.skipped.append(stage.name)
    else:
        settings_path = os.path.join(folder, "settings.json")
        if os.path.isfile(settings_path) and read_json(settings_path) != settings:
            print(f"== {header}: settings changed, starting the stage over")
            shutil.rmtree(folder)
        resuming = os.path.isfile(settings_path)
        os.makedirs(folder, exist_ok=True)
        save_json_atomic(settings_path, settings, indent=1)
        print(f"\n== {header}{' (continuing an interrupted run)' if resuming else ''}", flush=True)
        start = time.time()
        result = stage.run(ctx, folder)
        record = {"settings": settings, "result": result, "time_s": round(time.time() - start, 1)}
        save_json_atomic(done_path, record, indent=1)
        print(f"== {stage.name} finished in {record['time_s']:.0f} s: {stage.describe(result)}", flush=True)
    ctx.results[stage.name], ctx.times[stage.name] = record["result"], record["time_s"]


def run(ctx):
    """Every stage in order (up to --stop_after); returns the summary, or None when stopped early."""
    load_start = list(os.getloadavg())
    start = time.time()
    os.makedirs(ctx.path("pictures"), exist_ok=True)
    for index, stage in enumerate(STAGES, 1):
        run_stage(ctx, index, stage)
        if stage.name == ctx.args.stop_after:
            print(f"stopped after stage '{stage.name}' (--stop_after); run the same command again to continue")
            return None
    summary = make_summary(ctx, time.time() - start, load_start)
    save_json_atomic(ctx.path("summary.json"), summary, indent=1)
    print_table(summary)
    print(f"wrote {ctx.path('summary.json')} and pictures in {ctx.path('pictures')}")
    return summary


def make_summary(ctx, total_time, load_start):
    tokenizer, probe, classes = ctx.results["tokenizer"], ctx.results["probe"], ctx.results["classes"]
    return {
        "preset": "quick" if ctx.args.quick else "default", "device": ctx.device,
        "tokenizer_psnr_db": tokenizer["psnr_db"], "tokenizer_codebook_usage_pct": tokenizer["codebook_usage_pct"],
        "pretrain_final_loss": ctx.results["pretrain"]["final_loss"],
        "linprobe_acc": probe["mage_logreg_acc"], "raw_pixel_acc": probe["raw_pixel_logreg_acc"],
        "linprobe_lars_acc": probe["linprobe_lars_acc"],
        "sample_class_histogram": classes["histogram"], "samples_collapsed": classes["collapsed"],
        "classifier_val_acc": classes["classifier_val_acc"],
        "classifier_reconstruction_acc": classes["reconstruction_acc_pct"], "cfg": classes["cfg"],
        "class_conditional_accuracy_pct": classes["conditional_accuracy_pct"],
        "class_conditional_per_class_pct": classes["conditional_per_class_pct"], "fid": ctx.results["fid"],
        "stages": {stage.name: {"result": ctx.results[stage.name], "time_s": ctx.times[stage.name],
                                "skipped": stage.name in ctx.skipped} for stage in STAGES},
        "total_time_s": round(total_time, 1),
        "load_average": {"start": load_start, "end": list(os.getloadavg())}, "cpu_count": os.cpu_count(),
        "pictures": sorted(os.path.relpath(p, ctx.out) for p in glob.glob(ctx.path("pictures", "*.png"))),
    }


def print_table(summary):
    rows = [(name, STAGE_BY_NAME[name].describe(stage["result"]),
             f"{stage['time_s']:.0f} s" + (" (earlier)" if stage["skipped"] else ""))
            for name, stage in summary["stages"].items()]
    histogram = "  ".join(f"{name.split('_', 1)[-1]} {100 * v:.0f}%"
                          for name, v in summary["sample_class_histogram"].items())
    width = max(len(r[1]) for r in rows)
    rule = "-" * (width + 26)
    lines = [f"{'stage':<10} {'result':<{width}} {'time':>14}", rule]
    lines += [f"{name:<10} {result:<{width}} {elapsed:>14}" for name, result, elapsed in rows]
    per_class = "  ".join(f"{name.split('_', 1)[-1]} {acc:.0f}%"
                          for name, acc in summary["class_conditional_per_class_pct"].items())
    lines += [rule, f"{'samples':<10} {histogram}",
              f"{'w = ' + format(summary['cfg'], 'g'):<10} {per_class}",
              f"{'total':<10} {'':<{width}} {summary['total_time_s']:>12.0f} s",
              f"load average {summary['load_average']['start'][0]:.2f} at start, "
              f"{summary['load_average']['end'][0]:.2f} at end ({summary['cpu_count']} CPUs, device "
              f"{summary['device']})"]
    if summary["samples_collapsed"]:
        lines.append("the samples are collapsed (a class under 5 %): try more MAGE pre-training with "
                     "--pretrain_epochs N (the README's demo section has measured runs)")
    print("\n" + "\n".join(lines))


def check_fid_weights(args):
    """Inception weights that are there but unusable stop the demo now, not after the other stages."""
    weights = args.fid_weights or (inception_cache_path() if os.path.isfile(inception_cache_path()) else "")
    if weights:
        try:
            resolve_inception_weights(weights)
        except FidWeightsError as err:
            raise SystemExit(f"demo: {err}") from None


def main(args):
    check_fid_weights(args)
    try:
        check_writable_folder(args.output_dir)
        ctx = Context(args)
        os.makedirs(ctx.out, exist_ok=True)
        lock = DirectoryLock(ctx.out).acquire()  # a second demo writing into the same folder is refused
    except OutputDirError as err:
        raise SystemExit(f"demo: {err}") from None
    try:
        print(f"MAGE demo: {'quick' if args.quick else 'default'} run on {ctx.device}, {ctx.resolution}x"
              f"{ctx.resolution} images, output in {ctx.out}")
        return run(ctx)
    finally:
        lock.release()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
