"""Throughput and memory of MAGE's workloads, with the speed flags as given and in reference numerics.

    python benchmark.py --model mage_vit_base_patch16 --batch_size 2 --compare --tokenizer_dtype bf16
    python benchmark.py --model mage_vit_large_patch16 --batch_size 256 --device cuda --compile

Measures images/s of a pre-training step (forward + backward + AdamW) on images and on cached token ids
(main_cache_tokens.py: no tokenizer in the step), tokenizer encode and decode,
generation at T=12 and T=20, linear-probe feature extraction; peak memory (GPU: max allocated, CPU: peak
RSS of this process during the task); model FLOPs per image and, with --peak_tflops, model FLOPs
utilisation. The speed flags are the scripts' (util/perf.py), with the same defaults; the "fast" mode is
what they select. --compare runs the same work in reference numerics (--reference_numerics: float32,
explicit softmax attention, contiguous NCHW, no compile, AdamW without fusion) and in the fast mode, in one
process, alternating the two call by call, and prints the ratios. All weights are random, the tokenizer's
included: the speed does not depend on them.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import contextlib
import json
import os
import time
from types import SimpleNamespace

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.flop_counter import FlopCounterMode

import models_mage
import models_vit
from models_vit import load_mage_checkpoint_into_classifier
from util.perf import PERF_FLAGS, REFERENCE_NUMERICS, adamw_kwargs, add_perf_args, apply_perf_settings
from util.precision import autocast
from util.sampling import decode_tokens, iterative_decode

RANDOM_WEIGHTS = ("Every model runs on random weights seeded by --seed, the tokenizer's included (no checkpoint or "
                  "--vqgan_ckpt): speed does not depend on the weights.")
TASKS = ("pretrain", "pretrain_cached", "encode", "decode", "generate_T12", "generate_T20", "linprobe_features")
H200_BF16_DENSE_TFLOPS = 989.0


def get_args_parser():
    parser = argparse.ArgumentParser("MAGE benchmark", add_help=True, description=RANDOM_WEIGHTS)
    parser.add_argument("--model", default="mage_vit_base_patch16", choices=sorted(models_mage.MODELS))
    parser.add_argument("--vqgan_config", default=None,
                        help="tokenizer YAML (default: the preset's); its weights are random, as all weights here")
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--steps", default=3, type=int, help="timed repetitions per task")
    parser.add_argument("--warmup", default=1, type=int, help="untimed repetitions per task")
    parser.add_argument("--threads", default=0, type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--compare", action="store_true",
                        help="run the speed flags as given and reference numerics, and print the ratios")
    add_perf_args(parser)  # the mode measured; --reference_numerics: reference numerics only
    parser.add_argument("--peak_tflops", default=None, type=float,
                        help=f"device peak for MFU (default on CUDA: H200 bf16 dense, {H200_BF16_DENSE_TFLOPS})")
    parser.add_argument("--json", default="benchmark.json", help="where to write the results")
    return parser


def mode_settings(args, reference):
    """The speed settings of one mode: the flags as given ("fast"), or reference numerics."""
    settings = {name: getattr(args, name) for name in PERF_FLAGS}
    if reference:
        settings.update(REFERENCE_NUMERICS)
    return SimpleNamespace(name="reference" if reference else "fast", **settings)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) of this process


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_calls(step, device, repeats):
    """Seconds of each of `repeats` calls of step() and the peak memory over them."""
    seconds, peak = [], 0.0
    for _ in range(repeats):
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        peak = max(peak, peak_memory_mb(device))
    return seconds, peak


def count_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def build_models(args, settings, device):
    torch.manual_seed(args.seed)
    kwargs = {"vqgan_config": args.vqgan_config} if args.vqgan_config else {}
    mage = models_mage.MODELS[args.model](**kwargs).to(device)
    apply_perf_settings(mage, settings, device)
    classifier = models_vit.MODELS[args.model.removeprefix("mage_")](global_pool=True, num_classes=1000, **kwargs)
    load_mage_checkpoint_into_classifier(classifier, mage.state_dict(), source="benchmark MAGE weights")
    classifier = classifier.to(device).eval()
    apply_perf_settings(classifier, settings, device)
    return mage, classifier


def task_steps(args, settings, mage, classifier, device):
    """name -> (callable running one batch, images per call)."""
    bsz = args.batch_size
    images = torch.rand(bsz, 3, mage.grid_size * mage.vqgan.downsample_factor,
                        mage.grid_size * mage.vqgan.downsample_factor, device=device)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(mage, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                  **adamw_kwargs(settings, device))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    with torch.no_grad():
        token_ids = mage.tokenize(images)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def pretrain_step(cached):
        def run():
            mage.train()
            with autocast(device, settings.amp):
                if cached:
                    loss, _, _ = mage(None, gt_indices=token_ids, generator=generator)
                else:
                    loss, _, _ = mage(images, generator=generator)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(mage.parameters(), 3.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return run

    @torch.no_grad()
    def encode():
        with autocast(device, settings.amp):
            mage.tokenize(images)

    @torch.no_grad()
    def decode():
        with autocast(device, settings.amp):
            decode_tokens(mage, token_ids)

    def generate(num_iter):
        @torch.no_grad()
        def run():
            start = torch.full((bsz, mage.seq_len), mage.mask_token_label, dtype=torch.long, device=device)
            with autocast(device, settings.amp):
                decode_tokens(mage, iterative_decode(mage, start, num_iter=num_iter, temperature=4.5,
                                                     generator=generator))
        return run

    @torch.no_grad()
    def linprobe_features():
        with autocast(device, settings.amp):
            classifier.forward_features(images)

    return {"pretrain": pretrain_step(cached=False), "pretrain_cached": pretrain_step(cached=True),
            "encode": encode, "decode": decode, "generate_T12": generate(12), "generate_T20": generate(20),
            "linprobe_features": linprobe_features}


def run_modes(args, modes, device, tasks):
    """Time every task in every mode. The modes alternate call by call, so that a change of machine load
    during the run affects them alike and their ratio stays meaningful."""
    steps = {}
    for settings in modes:
        mage, classifier = build_models(args, settings, device)
        steps[settings.name] = task_steps(args, settings, mage, classifier, device)
    peak_tflops = args.peak_tflops or (H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    results = {settings.name: {} for settings in modes}
    for name in tasks:
        timings = {settings.name: ([], 0.0) for settings in modes}
        for settings in modes:
            time_calls(steps[settings.name][name], device, args.warmup)
        for _ in range(args.steps):
            for settings in modes:
                seconds, peak = time_calls(steps[settings.name][name], device, 1)
                previous_seconds, previous_peak = timings[settings.name]
                timings[settings.name] = (previous_seconds + seconds, max(previous_peak, peak))
        for settings in modes:
            seconds, memory = timings[settings.name]
            mean_seconds = sum(seconds) / len(seconds)
            row = {"images_per_s": args.batch_size / mean_seconds, "seconds_per_batch": mean_seconds,
                   "peak_memory_mb": memory}
            if name in ("pretrain", "pretrain_cached", "linprobe_features"):
                flops = count_flops(steps[settings.name][name])
                row["gflops_per_image"] = flops / args.batch_size / 1e9
                if peak_tflops:
                    row["mfu"] = flops / mean_seconds / (peak_tflops * 1e12)
            results[settings.name][name] = row
            print(f"  [{settings.name}] {name:18s} {row['images_per_s']:9.3f} img/s  {memory:9.0f} MB", flush=True)
    return results


def print_table(results, compare):
    modes = list(results)
    header = f"{'task':20s}" + "".join(f"{m + ' img/s':>18s}{m + ' MB':>14s}" for m in modes)
    if compare:
        header += f"{'speed-up':>10s}"
    print("\n" + header)
    for task in next(iter(results.values())):
        line = f"{task:20s}" + "".join(
            f"{results[m][task]['images_per_s']:18.3f}{results[m][task]['peak_memory_mb']:14.0f}" for m in modes)
        if compare:
            line += f"{results['fast'][task]['images_per_s'] / results['reference'][task]['images_per_s']:9.2f}x"
        mfu = results[modes[-1]][task].get("mfu")
        print(line + (f"   MFU {100 * mfu:.1f}%" if mfu else ""))


def main(args):
    """Time the tasks; returns the record that --json writes: config (the flags), device_name, torch, threads,
    and results[mode][task] = {images_per_s, seconds_per_batch, peak_memory_mb, gflops_per_image, mfu}
    (the last two for the training and feature tasks; mfu with a known peak)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    references = [True] if args.reference_numerics else ([True, False] if args.compare else [False])
    modes = [mode_settings(args, reference) for reference in references]
    for settings in modes:
        print(f"{settings.name}: {vars(settings)}", flush=True)
    results = run_modes(args, modes, device, tasks)
    print_table(results, compare=len(modes) == 2)
    record = {"config": vars(args), "device_name": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {os.path.abspath(args.json)}")
    return record


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
