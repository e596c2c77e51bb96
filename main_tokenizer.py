"""Train the VQGAN tokenizer (taming's VQModel, any ddconfig) on an ImageFolder.

    python main_tokenizer.py --data_path data/shapes --output_dir output/tokenizer
    torchrun --nproc_per_node 2 main_tokenizer.py --data_path data/shapes --output_dir output/tokenizer

Writes output_dir/tokenizer.ckpt ({'state_dict': ...}, the key format of vqgan_jax_strongaug.ckpt) and
output_dir/tokenizer.yaml; pass them to any MAGE script as --vqgan_ckpt / --vqgan_config.
"""
import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

import argparse
import datetime
import os
import time

import torch
from torchvision import transforms

from engine_tokenizer import (TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, CodebookMonitor, TokenizerForward, evaluate,
                              export_tokenizer, reconstruction_grid, train_one_epoch)
from taming.models.vqgan import VQModel, load_vqgan_config
from taming.modules.losses import VQGANLoss
from util.checkpoint import (args_for_checkpoint, expected_checkpoint_size, load_checkpoint, load_state_dict_checked,
                             resolve_resume_path, save_epoch)
from util.cli import add_checkpoint_args, add_runtime_args, run_script
from util.datasets import build_image_folder, build_loader, check_split, set_epoch
from util.distributed import barrier, cleanup_distributed, get_world_size, is_main_process, wrap_ddp
from util.errors import CheckpointError, UsageError
from util.metrics import epoch_history, make_log_writer
from util.output_dir import open_output_dir
from util.perf import add_perf_args
from util.precision import NativeScalerWithGradNormCount
from util.run import releases_output_dir, setup_run

# --quick: the same recipe on a shorter schedule (the test suite and `demo.py --quick`).
QUICK_OVERRIDES = {"epochs": 1}
GRID_IMAGES = 8


def get_args_parser():
    parser = argparse.ArgumentParser("VQGAN tokenizer training", add_help=True)
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--vqgan_config", default="config/vqgan_demo.yaml",
                       help="YAML shaped like config/vqgan.yaml: ddconfig (resolution, ch, ch_mult, ...), n_embed, "
                            "embed_dim")
    group.add_argument("--init_ckpt", default="", help="start from this tokenizer file (e.g. to fine-tune the release)")

    group = parser.add_argument_group("losses")
    group.add_argument("--codebook_weight", default=1.0, type=float, help="weight of codebook + 0.25 * commitment")
    group.add_argument("--disc_start", default=-1, type=int,
                       help="step at which the PatchGAN discriminator (hinge loss) switches on; -1: never")
    group.add_argument("--disc_weight", default=0.8, type=float, help="times the adaptive weight of the GAN loss")
    group.add_argument("--disc_ndf", default=64, type=int, help="discriminator width")
    group.add_argument("--disc_layers", default=3, type=int, help="discriminator depth (stride-2 layers)")
    group.add_argument("--perceptual_weights", default="",
                       help="torchvision vgg16 state dict (optionally with LPIPS lin{k} layers merged in) for a "
                            "perceptual loss; none without it (nothing is downloaded)")
    group.add_argument("--perceptual_weight", default=1.0, type=float)

    group = parser.add_argument_group("codebook")
    group.add_argument("--restart_dead_codes", action=argparse.BooleanOptionalAction, default=True,
                       help="re-initialise unused codes from recent encoder outputs")
    group.add_argument("--dead_code_steps", default=100, type=int, help="a code unused this many steps is dead")
    group.add_argument("--restart_every", default=25, type=int,
                       help="check for dead codes (and log usage/perplexity) every this many steps")
    group.add_argument("--code_buffer", default=8192, type=int, help="recent encoder outputs kept for restarts")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch_size", default=16, type=int, help="per process")
    group.add_argument("--epochs", default=4, type=int)
    group.add_argument("--lr", default=2e-3, type=float, help="peak learning rate (absolute)")
    group.add_argument("--min_lr", default=1e-4, type=float, help="end of the cosine decay")
    group.add_argument("--warmup_epochs", default=0.2, type=float)
    group.add_argument("--beta1", default=0.9, type=float)
    group.add_argument("--beta2", default=0.99, type=float)
    group.add_argument("--clip_grad", default=None, type=float)
    group.add_argument("--quick", action="store_true", help=f"short schedule: {QUICK_OVERRIDES}")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", required=True, help="ImageFolder root with train/ and val/")
    group.add_argument("--skip_bad_images", action="store_true", help="log and skip unreadable images")
    group.add_argument("--eval_every", default=1, type=int, help="validate every this many epochs (and at the end)")
    group.add_argument("--print_freq", default=25, type=int)

    add_runtime_args(parser)
    add_checkpoint_args(parser, save_every=0)
    add_perf_args(parser, ("amp", "channels_last"))
    # float32 by default: bf16 autocast cost ~2 dB of val PSNR at equal steps in the demo (code assignment
    # is sensitive to the precision of z) and was only ~1.3x faster on a CPU without AMX.
    parser.set_defaults(num_workers=2, amp="none")
    return parser


def check_args(args):
    """Reject flags that cannot work before any work starts (an untrained tokenizer.ckpt is never written)."""
    for name in ("batch_size", "epochs", "eval_every", "print_freq", "restart_every", "dead_code_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for split in ("train", "val"):
        check_split(args.data_path, split)


def build_transforms(resolution):
    train = transforms.Compose([transforms.Resize(resolution), transforms.RandomCrop(resolution),
                                transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    val = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution), transforms.ToTensor()])
    return train, val


def save_training_state(args, state, epoch, step, elapsed, log_stats):
    """checkpoint-{epoch}.pth when due, the log line, then checkpoint-last.pth (util.checkpoint.save_epoch)."""
    if not args.output_dir or not is_main_process():
        return
    vqmodel, loss_fn, optimizer, optimizer_d, scaler, scaler_d, monitor = state
    checkpoint = {"model": vqmodel.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                  "codebook_monitor": monitor.state_dict(), "epoch": epoch, "step": step, "elapsed": elapsed,
                  "args": args_for_checkpoint(args), "log_stats": log_stats}
    if loss_fn.discriminator is not None:
        checkpoint.update(discriminator=loss_fn.discriminator.state_dict(), optimizer_disc=optimizer_d.state_dict(),
                          scaler_disc=scaler_d.state_dict())
    save_epoch(args, epoch, checkpoint, log_stats)


def resume_training_state(args, state):
    """Load --resume / --auto_resume into the training state. Returns (start_epoch, elapsed seconds)."""
    path = resolve_resume_path(args)
    if not path:
        return 0, 0.0
    vqmodel, loss_fn, optimizer, optimizer_d, scaler, scaler_d, monitor = state
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a tokenizer training checkpoint (needs 'model' and 'epoch')")
    load_state_dict_checked(vqmodel, checkpoint["model"], source=path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    monitor.load_state_dict(checkpoint["codebook_monitor"])
    if loss_fn.discriminator is not None and "discriminator" in checkpoint:
        load_state_dict_checked(loss_fn.discriminator, checkpoint["discriminator"], source=path)
        optimizer_d.load_state_dict(checkpoint["optimizer_disc"])
        scaler_d.load_state_dict(checkpoint["scaler_disc"])
    print(f"Resumed from {path}: epoch {checkpoint['epoch']} done (step {checkpoint['step']})")
    return checkpoint["epoch"] + 1, checkpoint.get("elapsed", 0.0)


@releases_output_dir
def main(args):
    """Train the tokenizer; returns (every rank; only rank 0 writes the files and reads earlier epochs back):
        psnr, l1, codebook_usage, perplexity   val metrics of the final weights (dB, -, % of codes, -)
        epochs, steps, train_time_s            the schedule trained to and its training time (all processes)
        history                                per-epoch stats (log.txt's lines), including the epochs of an
                                               earlier process of a resumed run
        tokenizer, tokenizer_config            output_dir/tokenizer.ckpt and tokenizer.yaml ('' without
                                               --output_dir): the --vqgan_ckpt / --vqgan_config of MAGE runs
        output_dir                             --output_dir
    """
    if args.quick:
        vars(args).update(QUICK_OVERRIDES)
    setup_run(args, check_args, create_output_dir=False)

    settings = load_vqgan_config(args.vqgan_config)
    resolution = settings["ddconfig"]["resolution"]
    train_transform, val_transform = build_transforms(resolution)
    dataset_train = build_image_folder(args, "train", train_transform)
    dataset_val = build_image_folder(args, "val", val_transform)
    loader_train = build_loader(dataset_train, args, train=True)
    loader_val = build_loader(dataset_val, args, train=False)
    if len(loader_train) == 0:
        raise UsageError(f"--batch_size {args.batch_size} x {get_world_size()} processes is larger than "
                         f"the {len(dataset_train)} training images")

    vqmodel = VQModel(settings["ddconfig"], settings["n_embed"], settings["embed_dim"],
                      ckpt_path=args.init_ckpt or None).to(args.device)
    loss_fn = VQGANLoss(disc_start=args.disc_start, disc_weight=args.disc_weight,
                        codebook_weight=args.codebook_weight, perceptual_weights=args.perceptual_weights or None,
                        perceptual_weight=args.perceptual_weight, disc_ndf=args.disc_ndf,
                        disc_layers=args.disc_layers).to(args.device)
    if args.channels_last:
        vqmodel.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    model = wrap_ddp(TokenizerForward(vqmodel), args)
    disc_model = wrap_ddp(loss_fn.discriminator, args) if loss_fn.discriminator is not None else None
    betas = (args.beta1, args.beta2)
    optimizer = torch.optim.Adam(vqmodel.parameters(), lr=args.lr, betas=betas)
    optimizer_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=args.lr, betas=betas) \
        if disc_model is not None else None
    scaler = NativeScalerWithGradNormCount(args.amp, args.device)
    scaler_d = NativeScalerWithGradNormCount(args.amp, args.device)
    monitor = CodebookMonitor(vqmodel.quantize.embedding, dead_after=args.dead_code_steps,
                              buffer_size=args.code_buffer, seed=args.seed)
    state = (vqmodel, loss_fn, optimizer, optimizer_d, scaler, scaler_d, monitor)
    trained = [vqmodel] + ([loss_fn.discriminator] if loss_fn.discriminator is not None else [])
    open_output_dir(args, expected_bytes=sum(expected_checkpoint_size(m) for m in trained))  # usage checks done
    start_epoch, elapsed = resume_training_state(args, state)
    print(f"tokenizer: {sum(p.numel() for p in vqmodel.parameters()) / 1e6:.2f}M parameters, "
          f"{settings['n_embed']} codes; {len(loader_train)} steps/epoch x {args.epochs} epochs")

    log_writer = make_log_writer(args)
    spread = range(0, len(dataset_val), max(1, len(dataset_val) // GRID_IMAGES))  # across classes
    grid_images = torch.stack([dataset_val[i][0] for i in list(spread)[:GRID_IMAGES]]).to(args.device)
    metrics, new_epochs = {}, []
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        set_epoch(loader_train, epoch)
        train_stats = train_one_epoch(model, loss_fn, disc_model, optimizer, optimizer_d, scaler, scaler_d,
                                      monitor, loader_train, epoch, args, log_writer)
        elapsed += time.time() - start
        step = (epoch + 1) * len(loader_train)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch, "step": step,
                 "elapsed_s": round(elapsed, 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            metrics = evaluate(vqmodel, loader_val, args.device)
            print(f"val after epoch {epoch}: PSNR {metrics['psnr']:.2f} dB, codebook usage "
                  f"{metrics['codebook_usage']:.1f}%, perplexity {metrics['perplexity']:.1f}")
            stats.update({f"val_{k}": v for k, v in metrics.items()})
            if log_writer is not None:
                for name, value in metrics.items():
                    log_writer.add_scalar(f"val/{name}", value, step)
                log_writer.add_image("val/reconstructions", reconstruction_grid(vqmodel, grid_images), step)
                log_writer.flush()
        save_training_state(args, state, epoch, step, elapsed, stats)
        new_epochs.append(stats)

    if not metrics:  # resumed after the last epoch: evaluate the final weights again
        metrics = evaluate(vqmodel, loader_val, args.device)
    metrics = {**metrics, "epochs": args.epochs, "steps": args.epochs * len(loader_train),
               "train_time_s": round(elapsed, 1)}
    if args.output_dir and is_main_process():
        path = export_tokenizer(vqmodel, settings, args.output_dir, metrics, reconstruction_grid(vqmodel, grid_images))
        print(f"tokenizer written to {path} (+ tokenizer.yaml): PSNR {metrics['psnr']:.2f} dB, codebook usage "
              f"{metrics['codebook_usage']:.1f}%")
    barrier()
    print(f"Training time {datetime.timedelta(seconds=int(elapsed))}")
    if log_writer is not None:
        log_writer.close()
    cleanup_distributed()
    files = {name: os.path.join(args.output_dir, file) if args.output_dir else ""
             for name, file in (("tokenizer", TOKENIZER_FILE), ("tokenizer_config", TOKENIZER_CONFIG_FILE))}
    return {**metrics, "history": epoch_history(args, start_epoch, new_epochs), **files,
            "output_dir": args.output_dir}


if __name__ == "__main__":
    run_script(get_args_parser(), main)
