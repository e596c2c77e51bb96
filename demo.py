"""The built-in end-to-end run: from no data to a tokenizer, a pre-trained MAGE, generated images and a linear
probe, on a CPU in minutes, with nothing downloaded.

    python demo.py --output_dir demo_out            # the default run (<= 15 minutes on 2 CPU cores)
    python demo.py --output_dir demo_out --quick    # every stage on a tiny schedule (the test suite)

Stages (each prints its progress; OUTPUT_DIR/<stage>/ holds its files):
  data       the procedural labelled ImageFolder of util/synthetic_data.py
  tokenizer  VQGAN tokenizer training (main_tokenizer.py)
  pretrain   tokens of the training images, cached once, + MAGE pre-training (main_pretrain.py --cached_tokens)
  generate   unconditional samples (gen_img_uncond.py) and an inpainting example (edit_img.py)
  probe      linear probe of the encoder (main_linprobe.py) and the same logistic regression on MAGE
             features and on raw pixels (util/synthetic_data.fit_linear_probe), on the same split
  classes    a small CNN trained on the real train split labels the samples: class histogram
  fid        FID/IS of the samples against the val split when Inception weights are on disk, else skipped

A stage whose OUTPUT_DIR/<stage>/stage.json records the same settings is skipped; a stage that was
interrupted continues where it stopped (the scripts' --auto_resume, written images are kept). Ends with a
summary table, OUTPUT_DIR/summary.json and pictures in OUTPUT_DIR/pictures/.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import copy
import glob
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import edit_img
import gen_img_uncond
import main_linprobe
import main_pretrain
import main_tokenizer
import models_vit
from engine_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from taming.models.vqgan import build_vqgan, load_vqgan_config, token_grid_size
from util import synthetic_data
from util.checkpoint import CHECKPOINT_LAST, save_json_atomic
from util.errors import CheckpointError, TrainingError, UsageError
from util.fid import INCEPTION, compute_metrics, inception_cache_path
from util.precision import autocast, default_amp
from util.token_cache import META_FILE, write_meta, write_shard

STAGES = ("data", "tokenizer", "pretrain", "generate", "probe", "classes", "fid")
TITLES = {"data": "make the dataset", "tokenizer": "train the VQGAN tokenizer",
          "pretrain": "pre-train MAGE on the tokens", "generate": "generate images and inpaint",
          "probe": "linear-probe the encoder vs raw pixels", "classes": "label the samples with a classifier",
          "fid": "FID / IS"}
DEPENDS = {"data": (), "tokenizer": ("data",), "pretrain": ("data", "tokenizer"), "generate": ("pretrain",),
           "probe": ("data", "pretrain"), "classes": ("data", "generate"), "fid": ("data", "generate")}

# Settings of each stage. The tokenizer gets main_tokenizer.py's recipe for config/vqgan_demo.yaml plus
# these flags (its --quick schedule for the quick run). Pre-training uses the explicit attention: over 64 tokens
# on a CPU under bf16 it ran a step 1.4x faster than scaled_dot_product_attention (whose backward dominated).
PRESETS = {
    "default": {
        "data": {"num_train": 500, "num_val": 60},
        "tokenizer": {"flags": ["--epochs", 5, "--channels_last"]},
        "pretrain": {"model": "mage_vit_demo", "num_views": 2, "epochs": 70, "batch_size": 64, "lr": 2e-3,
                     "warmup_epochs": 2, "weight_decay": 0.05, "dropout": 0.0, "fused_attn": False},
        "generate": {"num_images": 768, "num_iter": 24, "temp": 6.0, "batch_size": 64, "num_inpaint": 8},
        "probe": {"epochs": 90, "batch_size": 256, "blr": 1.0, "warmup_epochs": 10},
        "classes": {"epochs": 6, "batch_size": 64},
    },
    "quick": {
        "data": {"num_train": 16, "num_val": 4},
        "tokenizer": {"flags": ["--quick"]},
        "pretrain": {"model": "mage_vit_demo", "num_views": 1, "epochs": 3, "batch_size": 16, "lr": 1.5e-3,
                     "warmup_epochs": 1, "weight_decay": 0.05, "dropout": 0.0, "fused_attn": False},
        "generate": {"num_images": 16, "num_iter": 4, "temp": 4.5, "batch_size": 16, "num_inpaint": 4},
        "probe": {"epochs": 3, "batch_size": 64, "blr": 1.0, "warmup_epochs": 1},
        "classes": {"epochs": 2, "batch_size": 64},
    },
}
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
    parser.add_argument("--stop_after", default="", choices=("",) + STAGES,
                        help="stop after this stage (a later run continues from there)")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_script(module, argv):
    """module.main(parsed argv) in this process; the scripts' usage and training errors stop the demo."""
    args = module.get_args_parser().parse_args([str(a) for a in argv])
    try:
        return module.main(args)
    except (UsageError, TrainingError, CheckpointError) as err:
        raise SystemExit(f"demo: {module.__name__} failed: {err}") from None


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        self.preset = copy.deepcopy(PRESETS["quick" if args.quick else "default"])
        if args.pretrain_epochs < 0:
            raise SystemExit(f"demo: --pretrain_epochs must be >= 0, got {args.pretrain_epochs}")
        if args.pretrain_epochs:
            self.preset["pretrain"]["epochs"] = args.pretrain_epochs
        if args.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = args.device
        self.vqgan_settings = load_vqgan_config(args.vqgan_config)
        self.resolution = self.vqgan_settings["ddconfig"]["resolution"]
        self.settings = {}
        self.results = {}
        self.times = {}
        self.skipped = []
        os.makedirs(self.path("pictures"), exist_ok=True)

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def stage_settings(self, name):
        own = {"data": {**self.preset["data"], "size": self.resolution, "seed": self.args.seed},
               "tokenizer": {**self.preset["tokenizer"], "vqgan": self.vqgan_settings},
               "fid": {"weights": self.fid_weights() or None}}.get(name, self.preset.get(name, {}))
        return {"own": own, "seed": self.args.seed, "inputs": {dep: self.settings[dep] for dep in DEPENDS[name]}}

    def run_stage(self, index, name, work):
        """Run `work(folder) -> result dict` unless stage.json holds a result for the same settings."""
        settings = self.settings[name] = self.stage_settings(name)
        folder = self.path(name)
        done_path = os.path.join(folder, "stage.json")
        header = f"[{index}/{len(STAGES)}] {name}: {TITLES[name]}"
        if os.path.isfile(done_path) and read_json(done_path)["settings"] == settings:
            record = read_json(done_path)
            print(f"== {header}: done earlier, skipped ({record['time_s']:.0f} s when it ran)", flush=True)
            self.skipped.append(name)
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
            result = work(folder)
            record = {"settings": settings, "result": result, "time_s": round(time.time() - start, 1)}
            save_json_atomic(done_path, record, indent=1)
            print(f"== {name} finished in {record['time_s']:.0f} s: {describe(name, result)}", flush=True)
        self.results[name], self.times[name] = record["result"], record["time_s"]

    # ------------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------------

    def data_root(self):
        return self.path("data")

    def stage_data(self, folder):
        preset = self.preset["data"]
        info = synthetic_data.generate(folder, preset["num_train"], preset["num_val"], self.resolution,
                                       seed=self.args.seed)
        return {"classes": info["classes"], "size": self.resolution, "per_class": info["per_class"]}

    def tokenizer_files(self):
        return self.path("tokenizer", TOKENIZER_FILE), self.path("tokenizer", TOKENIZER_CONFIG_FILE)

    def stage_tokenizer(self, folder):
        argv = ["--data_path", self.data_root(), "--output_dir", folder, "--vqgan_config", self.args.vqgan_config,
                "--device", self.device, "--seed", self.args.seed, "--num_workers", 0, "--print_freq", 10,
                "--auto_resume"]
        metrics = run_script(main_tokenizer, argv + self.preset["tokenizer"]["flags"])
        self.reconstruction_picture()
        return {"psnr_db": metrics["psnr"], "codebook_usage_pct": metrics["codebook_usage"],
                "perplexity": metrics["perplexity"], "codes": self.vqgan_settings["n_embed"],
                "token_grid": token_grid_size(self.vqgan_settings), "steps": metrics["steps"]}

    def stage_pretrain(self, folder):
        preset = self.preset["pretrain"]
        ckpt, config = self.tokenizer_files()
        cache = os.path.join(folder, "token_cache")
        if not os.path.isfile(os.path.join(cache, META_FILE)):
            self.write_token_cache(cache, preset["num_views"])
        run_script(main_pretrain, [
            "--model", preset["model"], "--vqgan_config", config, "--vqgan_ckpt", ckpt,
            "--input_size", self.resolution, "--data_path", self.data_root(), "--cached_tokens", cache,
            "--batch_size", preset["batch_size"], "--epochs", preset["epochs"], "--lr", preset["lr"],
            "--warmup_epochs", preset["warmup_epochs"], "--weight_decay", preset["weight_decay"],
            "--dropout", preset["dropout"], "--fused_attn" if preset["fused_attn"] else "--no-fused_attn",
            "--output_dir", folder, "--log_dir", os.path.join(folder, "tb"),
            "--save_every", 0, "--vis_every", 0, "--auto_resume", "--device", self.device,
            "--seed", self.args.seed, "--num_workers", 0])
        log = [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]
        self.loss_picture()
        return {"final_loss": log[-1]["train_loss"], "first_epoch_loss": log[0]["train_loss"],
                "epochs": len(log), "steps": len(log) * (self.data_count("train") // preset["batch_size"])}

    @torch.no_grad()
    def write_token_cache(self, cache, num_views):
        """A --cached_tokens folder (util/token_cache.py layout) holding the tokens of every whole training image
        and its flips. main_cache_tokens.py stores random crops (scale 0.2-1) instead: right for long
        schedules, but in the demo's few epochs the model would then learn zoomed-in parts more than shapes."""
        vqgan, settings = build_vqgan(*reversed(self.tokenizer_files()))
        # the tokenizer precision of the scripts' default fast path (codes are chosen by float32 distances)
        vqgan.to(self.device).set_inference_mode(AMP_TOKENIZER_DTYPES[default_amp()], channels_last=True)
        images, labels = self.split_images("train")
        views = [images, images.flip(3), images.flip(2), images.flip(2).flip(3)][:num_views]
        tokens = np.stack([torch.cat([vqgan.encode(batch.to(self.device))[2][2].view(len(batch), -1).cpu()
                                      for batch in view.split(256)]).numpy() for view in views], axis=1)
        os.makedirs(cache, exist_ok=True)
        write_shard(cache, 0, tokens, np.arange(len(images)), labels.numpy())
        write_meta(cache, {"num_views": num_views, "views": "whole image and its flips", "seed": self.args.seed,
                           "grid_size": token_grid_size(settings), "codebook_size": settings["n_embed"],
                           "input_size": self.resolution, "num_images": len(images), "world_size": 1})
        print(f"cached the tokens of {len(images)} training images x {num_views} views in {cache}")

    def mage_checkpoint(self):
        return self.path("pretrain", CHECKPOINT_LAST)

    def generator_args(self, preset):
        return ["--model", self.preset["pretrain"]["model"], "--ckpt", self.mage_checkpoint(),
                "--vqgan_config", self.tokenizer_files()[1], "--num_iter", preset["num_iter"],
                "--temp", preset["temp"], "--batch_size", preset["batch_size"], "--device", self.device,
                "--seed", self.args.seed]

    def sample_dir(self):
        return self.results["generate"]["image_dir"]

    def stage_generate(self, folder):
        preset = self.preset["generate"]
        argv = self.generator_args(preset) + ["--num_images", preset["num_images"], "--output_dir", folder]
        run_script(gen_img_uncond, argv)
        run = gen_img_uncond.run_folder(gen_img_uncond.get_args_parser().parse_args([str(a) for a in argv]))
        enlarge(os.path.join(run, "grid.png"), self.path("pictures", "samples.png"), self.scale())
        self.inpaint(folder, preset)
        return {"image_dir": os.path.join(run, "images"), "num_images": preset["num_images"],
                "num_iter": preset["num_iter"], "temp": preset["temp"]}

    def inpaint(self, folder, preset):
        """edit_img.py --mode inpaint on val images (one per class, in turn): a central box is regenerated."""
        inputs = os.path.join(folder, "inpaint_inputs")
        os.makedirs(inputs, exist_ok=True)
        classes = sorted(os.listdir(os.path.join(self.data_root(), "val")))
        for k in range(preset["num_inpaint"]):
            name = classes[k % len(classes)]
            source = sorted(glob.glob(os.path.join(self.data_root(), "val", name, "*.png")))[k // len(classes)]
            shutil.copyfile(source, os.path.join(inputs, f"{k:02d}_{name}.png"))
        low, high = round(self.resolution * 5 / 16), round(self.resolution * 11 / 16)
        run_script(edit_img, self.generator_args(preset) + [
            "--mode", "inpaint", "--input", inputs, "--box", low, low, high, high,
            "--output_dir", os.path.join(folder, "inpaint")])
        self.inpainting_picture(os.path.join(folder, "inpaint", "grid_inpaint.png"), preset["num_inpaint"])

    def stage_probe(self, folder):
        preset = self.preset["probe"]
        num_classes = len(self.results["data"]["classes"])
        stats = run_script(main_linprobe, [
            "--model", "vit_demo", "--vqgan_config", self.tokenizer_files()[1], "--input_size", self.resolution,
            "--finetune", self.mage_checkpoint(), "--global_pool", "--nb_classes", num_classes,
            "--data_path", self.data_root(), "--cache_features", "--no-train_aug",
            "--batch_size", preset["batch_size"], "--epochs", preset["epochs"], "--blr", preset["blr"],
            "--warmup_epochs", preset["warmup_epochs"], "--output_dir", os.path.join(folder, "linprobe"),
            "--log_dir", "", "--save_every", 0, "--auto_resume", "--device", self.device,
            "--seed", self.args.seed, "--num_workers", 0])
        if not stats:  # resumed after its last epoch: its log has the final accuracy
            stats = {"acc1": json.loads(open(os.path.join(folder, "linprobe", "log.txt")).readlines()[-1])["test_acc1"]}
        print("logistic regression (util.synthetic_data.fit_linear_probe) on MAGE features and on raw pixels ...")
        mage_acc, mage_wd = synthetic_data.fit_linear_probe(*self.mage_features())
        pixel_acc, pixel_wd = synthetic_data.raw_pixel_baseline(self.data_root())
        return {"mage_logreg_acc": 100 * mage_acc, "raw_pixel_logreg_acc": 100 * pixel_acc,
                "weight_decay": {"mage": mage_wd, "raw_pixels": pixel_wd}, "linprobe_lars_acc": stats["acc1"],
                "chance_acc": 100 / num_classes}

    @torch.no_grad()
    def mage_features(self):
        """(train features, labels, val features, labels): the pre-trained encoder's mean-pooled features of the
        whole images (what pre-training saw; main_linprobe.py resizes and center-crops)."""
        model = models_vit.vit_demo(num_classes=len(self.results["data"]["classes"]), global_pool=True,
                                    vqgan_config=self.tokenizer_files()[1])
        models_vit.load_mage_checkpoint_into_classifier(model, self.mage_checkpoint())
        amp = default_amp()
        model.to(self.device).eval().vqgan.set_inference_mode(AMP_TOKENIZER_DTYPES[amp], channels_last=True)
        arrays = []
        for split in ("train", "val"):
            images, labels = self.split_images(split)
            with autocast(self.device, amp):
                features = [model.forward_features(batch.to(self.device)).float().cpu() for batch in images.split(256)]
            arrays += [torch.cat(features), labels]
        return arrays

    def split_images(self, split):
        """(N, 3, R, R) float images in [0, 1] and labels of a split, ImageFolder order."""
        flat, labels = synthetic_data.load_split_arrays(self.data_root(), split)
        return flat.view(-1, self.resolution, self.resolution, 3).permute(0, 3, 1, 2).contiguous(), labels

    def stage_classes(self, folder):
        preset = self.preset["classes"]
        classes = self.results["data"]["classes"]
        torch.manual_seed(self.args.seed)
        judge = train_judge(*self.split_images("train"), len(classes), preset, self.device)
        val_images, val_labels = self.split_images("val")
        val_acc = (predict(judge, val_images, self.device) == val_labels).float().mean().item()
        paths = sorted(glob.glob(os.path.join(self.sample_dir(), "*.png")))
        samples = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])
        samples = samples.permute(0, 3, 1, 2).float().div(255)
        predicted = predict(judge, samples, self.device)
        counts = torch.bincount(predicted, minlength=len(classes))
        fractions = (counts.float() / len(predicted)).tolist()
        self.samples_by_class_picture(samples, predicted, classes)
        return {"classifier_val_acc": 100 * val_acc, "num_samples": len(paths),
                "histogram": dict(zip(classes, fractions)), "min_class_fraction": min(fractions),
                "collapsed": min(fractions) < MIN_CLASS_FRACTION}

    def fid_weights(self):
        """The Inception weights file to use, or '' when there is none on disk (nothing is downloaded)."""
        if self.args.fid_weights:
            return self.args.fid_weights
        return inception_cache_path() if os.path.isfile(inception_cache_path()) else ""

    def stage_fid(self, folder):
        weights = self.fid_weights()
        if not weights:
            reason = (f"no Inception weights at {inception_cache_path()} and no --fid_weights (nothing is "
                      f"downloaded; put pt_inception-2015-12-05-6726825d.pth there to get FID/IS)")
            print(f"FID/IS skipped: {reason}")
            return {"skipped": reason}
        reference = os.path.join(folder, "val_images")
        os.makedirs(reference, exist_ok=True)
        for path in glob.glob(os.path.join(self.data_root(), "val", "*", "*.png")):
            name = f"{os.path.basename(os.path.dirname(path))}_{os.path.basename(path)}"
            shutil.copyfile(path, os.path.join(reference, name))
        metrics = compute_metrics(self.sample_dir(), reference, device=self.device, weights_path=weights,
                                  feature_extractor=INCEPTION)
        return {"fid": metrics["frechet_inception_distance"], "is_mean": metrics["inception_score_mean"],
                "is_std": metrics["inception_score_std"], "num_samples": self.results["generate"]["num_images"],
                "num_reference": len(os.listdir(reference))}

    # ------------------------------------------------------------------------------------------------------
    # Pictures
    # ------------------------------------------------------------------------------------------------------

    def scale(self):
        return max(1, PICTURE_SIDE // self.resolution)

    def data_count(self, split):
        return len(self.results["data"]["classes"]) * self.results["data"]["per_class"][split]

    @torch.no_grad()
    def reconstruction_picture(self):
        """Rows: val images (two per class) over their reconstructions through the trained tokenizer."""
        vqgan, _ = build_vqgan(self.tokenizer_files()[1], self.tokenizer_files()[0])
        images, labels = self.split_images("val")
        per_class = self.results["data"]["per_class"]["val"]
        chosen = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in labels.unique()]) \
            if per_class >= 2 else torch.arange(len(labels))
        originals = images[chosen]
        reconstructions = vqgan(originals)[0].float().clamp(0, 1)
        half = math.ceil(len(chosen) / 2)
        rows = [originals[:half], reconstructions[:half], originals[half:], reconstructions[half:]]
        save_rows([r for r in rows if len(r)], self.path("pictures", "reconstructions.png"), self.scale())

    def inpainting_picture(self, grid_path, count, pad=2):
        """edit_img's grid (one row per image: input | kept tokens | result) turned into three rows."""
        with Image.open(grid_path) as grid:
            grid = torch.from_numpy(np.array(grid.convert("RGB"))).permute(2, 0, 1).float().div(255)
        side = self.resolution

        def cell(row, column):
            top, left = pad + row * (side + pad), pad + column * (side + pad)
            return grid[:, top:top + side, left:left + side]

        rows = [torch.stack([cell(k, column) for k in range(count)]) for column in range(3)]
        save_rows(rows, self.path("pictures", "inpainting.png"), self.scale(),
                  labels=["input", "kept tokens", "inpainted"])

    def samples_by_class_picture(self, samples, predicted, classes, per_row=10):
        rows = [samples[predicted == c][:per_row] for c in range(len(classes))]
        save_rows(rows, self.path("pictures", "samples_by_class.png"), self.scale(),
                  labels=[f"{name} ({int((predicted == c).sum())})" for c, name in enumerate(classes)])

    def loss_picture(self):
        tokenizer = read_scalars(self.path("tokenizer"), "train/rec_loss")
        pretrain = read_scalars(self.path("pretrain", "tb"), "train_loss")
        panels = [("tokenizer: L1 reconstruction loss", "step", *tokenizer),
                  ("MAGE pre-training: masked-token loss", "epoch", [x / 1000 for x in pretrain[0]], pretrain[1])]
        draw_curves(panels, self.path("pictures", "loss_curves.png"))

    # ------------------------------------------------------------------------------------------------------
    # Summary
    # ------------------------------------------------------------------------------------------------------

    def summary(self, total_time, load_start):
        tokenizer, probe, classes = self.results["tokenizer"], self.results["probe"], self.results["classes"]
        return {
            "preset": "quick" if self.args.quick else "default", "device": self.device,
            "tokenizer_psnr_db": tokenizer["psnr_db"], "tokenizer_codebook_usage_pct": tokenizer["codebook_usage_pct"],
            "pretrain_final_loss": self.results["pretrain"]["final_loss"],
            "linprobe_acc": probe["mage_logreg_acc"], "raw_pixel_acc": probe["raw_pixel_logreg_acc"],
            "linprobe_lars_acc": probe["linprobe_lars_acc"],
            "sample_class_histogram": classes["histogram"], "samples_collapsed": classes["collapsed"],
            "classifier_val_acc": classes["classifier_val_acc"], "fid": self.results["fid"],
            "stages": {name: {"result": self.results[name], "time_s": self.times[name],
                              "skipped": name in self.skipped} for name in STAGES},
            "total_time_s": round(total_time, 1),
            "load_average": {"start": load_start, "end": list(os.getloadavg())}, "cpu_count": os.cpu_count(),
            "pictures": sorted(os.path.relpath(p, self.out) for p in glob.glob(self.path("pictures", "*.png"))),
        }

    def run(self):
        load_start = list(os.getloadavg())
        start = time.time()
        for index, name in enumerate(STAGES, 1):
            self.run_stage(index, name, getattr(self, f"stage_{name}"))
            if name == self.args.stop_after:
                print(f"stopped after stage '{name}' (--stop_after); run the same command again to continue")
                return None
        summary = self.summary(time.time() - start, load_start)
        save_json_atomic(self.path("summary.json"), summary, indent=1)
        print_table(summary)
        print(f"wrote {self.path('summary.json')} and pictures in {self.path('pictures')}")
        return summary


def describe(name, result):
    """One line of a stage's result for the progress log and the summary table."""
    if name == "data":
        counts = result["per_class"]
        return (f"{len(result['classes'])} classes x ({counts['train']} train + {counts['val']} val) images of "
                f"{result['size']}x{result['size']} px")
    if name == "tokenizer":
        grid = result["token_grid"]
        return (f"val PSNR {result['psnr_db']:.2f} dB, codebook usage {result['codebook_usage_pct']:.1f}% of "
                f"{result['codes']} codes, {grid}x{grid} tokens, {result['steps']} steps")
    if name == "pretrain":
        return (f"loss {result['first_epoch_loss']:.3f} (epoch 1) -> {result['final_loss']:.3f} (epoch "
                f"{result['epochs']}), {result['steps']} steps")
    if name == "generate":
        return f"{result['num_images']} samples, {result['num_iter']} steps, temperature {result['temp']:g}"
    if name == "probe":
        return (f"MAGE features {result['mage_logreg_acc']:.1f}% vs raw pixels {result['raw_pixel_logreg_acc']:.1f}% "
                f"(logistic regression); main_linprobe {result['linprobe_lars_acc']:.1f}%; chance "
                f"{result['chance_acc']:.1f}%")
    if name == "classes":
        verdict = "collapsed" if result["collapsed"] else "not collapsed"
        return (f"rarest sample class {100 * result['min_class_fraction']:.1f}% ({verdict}); classifier val "
                f"accuracy {result['classifier_val_acc']:.1f}%")
    if name == "fid":
        if "skipped" in result:
            return "skipped: no Inception weights on disk"
        return f"FID {result['fid']:.2f}, IS {result['is_mean']:.2f} +- {result['is_std']:.2f}"
    raise ValueError(name)


def print_table(summary):
    rows = [(name, describe(name, stage["result"]),
             f"{stage['time_s']:.0f} s" + (" (earlier)" if stage["skipped"] else ""))
            for name, stage in summary["stages"].items()]
    histogram = "  ".join(f"{name.split('_', 1)[-1]} {100 * v:.0f}%"
                          for name, v in summary["sample_class_histogram"].items())
    width = max(len(r[1]) for r in rows)
    rule = "-" * (width + 26)
    lines = [f"{'stage':<10} {'result':<{width}} {'time':>14}", rule]
    lines += [f"{name:<10} {result:<{width}} {elapsed:>14}" for name, result, elapsed in rows]
    lines += [rule, f"{'samples':<10} {histogram}",
              f"{'total':<10} {'':<{width}} {summary['total_time_s']:>12.0f} s",
              f"load average {summary['load_average']['start'][0]:.2f} at start, "
              f"{summary['load_average']['end'][0]:.2f} at end ({summary['cpu_count']} CPUs, device "
              f"{summary['device']})"]
    if summary["samples_collapsed"]:
        lines.append("the samples are collapsed (a class under 5 %): try more MAGE pre-training with "
                     "--pretrain_epochs N (the README's demo section has measured runs)")
    print("\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# The sample classifier
# ----------------------------------------------------------------------------------------------------------

def small_cnn(num_classes):
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, num_classes))


def train_judge(images, labels, num_classes, preset, device):
    """A small CNN trained on the real train split (random flips), Adam with a cosine schedule."""
    model = small_cnn(num_classes).to(device)
    steps = preset["epochs"] * math.ceil(len(images) / preset["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(preset["epochs"]):
        order = torch.randperm(len(images))
        total = 0.0
        for batch in order.split(preset["batch_size"]):
            x, y = images[batch].to(device), labels[batch].to(device)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(2), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"sample classifier: epoch {epoch + 1}/{preset['epochs']}, train loss {total / len(images):.3f}")
    return model.eval()


@torch.no_grad()
def predict(model, images, device):
    return torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in images.split(256)])


# ----------------------------------------------------------------------------------------------------------
# Pictures (PIL only)
# ----------------------------------------------------------------------------------------------------------

def font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def to_pil(image, scale):
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_rows(rows, path, scale, labels=None, pad=2):
    """Rows of (N, 3, H, W) images as one picture, images enlarged by `scale`, optional label per row."""
    side = max(r.shape[-1] for r in rows if len(r)) * scale if any(len(r) for r in rows) else 8
    columns = max(max(len(r) for r in rows), 1)
    label_width = 150 if labels else 0
    canvas = Image.new("RGB", (label_width + columns * (side + pad) + pad, len(rows) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        top = pad + i * (side + pad)
        if labels:
            draw.text((4, top + side // 2 - 8), labels[i], fill="black", font=font())
        for j, image in enumerate(row):
            canvas.paste(to_pil(image, scale), (label_width + pad + j * (side + pad), top))
    canvas.save(path)


def enlarge(source, target, scale):
    """Copy a picture enlarged by `scale` (nearest neighbour)."""
    with Image.open(source) as picture:
        picture = picture.convert("RGB")
        picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(target)


def read_scalars(log_dir, tag):
    """(steps, values) of a tensorboard scalar, from every event file in log_dir."""
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


def draw_curves(panels, path, width=460, height=320):
    """Line plots side by side: panels of (title, x label, xs, ys), each value light and its running mean over
    2 % of the points dark. The y axis spans the running mean: MAGE's per-step loss jumps whenever a batch
    draws a mask ratio near 1, and those steps would otherwise flatten the curve."""
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(canvas)
    small, left, right, top, bottom = font(12), 58, 16, 30, 42
    for k, (title, xlabel, xs, ys) in enumerate(panels):
        x0, x1, y0, y1 = k * width + left, (k + 1) * width - right, top, height - bottom
        draw.text((x0, 8), title, fill="black", font=font(14))
        draw.rectangle((x0, y0, x1, y1), outline="black")
        if not ys:
            draw.text((x0 + 10, y0 + 10), "no data", fill="gray", font=small)
            continue
        smooth = running_mean(ys, max(1, len(ys) // 50))
        low, high = min(ys), max(smooth)
        high = high if high > low else low + 1
        span_x = (max(xs) - min(xs)) or 1

        def point(x, y):
            return (x0 + (x - min(xs)) / span_x * (x1 - x0), y1 - (y - low) / (high - low) * (y1 - y0))

        for t in range(5):
            value = low + (high - low) * t / 4
            _, y = point(min(xs), value)
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((x0 - 54, y - 7), f"{value:.3g}", fill="black", font=small)
        for value in (min(xs), max(xs)):
            x, _ = point(value, low)
            draw.text((x - 10, y1 + 4), f"{value:.3g}", fill="black", font=small)
        draw.text(((x0 + x1) // 2 - 15, y1 + 22), xlabel, fill="black", font=small)
        draw.line([point(x, min(y, high)) for x, y in zip(xs, ys)], fill=(195, 210, 240), width=1)
        draw.line([point(x, y) for x, y in zip(xs, smooth)], fill=(40, 80, 180), width=2)
    canvas.save(path)


def main(args):
    demo = Demo(args)
    print(f"MAGE demo: {'quick' if args.quick else 'default'} run on {demo.device}, {demo.resolution}x"
          f"{demo.resolution} images, output in {demo.out}")
    return demo.run()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
