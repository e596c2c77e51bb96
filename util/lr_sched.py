"""The lr of a run (--lr, or --blr scaled by the effective batch) and its per-iteration schedule: linear
warm-up, then half-cycle cosine down to min_lr."""
import math

from util.distributed import get_world_size


def lr_at(epoch, args):
    """The lr at a fractional epoch (epoch + step / steps_per_epoch)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch, args):
    """Set every param group's lr (times its 'lr_scale', e.g. from layer-wise decay). Returns the base lr."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def effective_lr(args):
    """args.lr, or blr * effective batch / 256 when only --blr is given. Prints both."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}  actual lr: {args.lr:.2e}  "
          f"accumulate grad iterations: {args.accum_iter}  effective batch size: {eff_batch_size}")
    return args.lr
