"""Runtime plumbing shared by the training and generation scripts.

Distributed setup (torchrun, SLURM or a single process), seeding, mixed precision, metric logging with
progress/ETA, the loss scaler, tensorboard on rank 0, and checkpoint save/resume.
"""
import argparse
import builtins
import contextlib
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from util.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint_atomic

CHECKPOINT_LAST = "checkpoint-last.pth"


class UsageError(ValueError):
    """Flags that cannot work together; the scripts report it as an argparse error before any work."""


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, unreadable image); the scripts print it and exit with status 1."""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def default_amp():
    """bf16 where the default device supports it (CPU, or CUDA with bf16), else fp16."""
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16"


def add_runtime_args(parser):
    """Device, seed, mixed precision, data loading and distributed flags (reference names)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="'cuda' or 'cpu'; each process uses cuda:LOCAL_RANK under a launcher")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--amp", default=default_amp(), choices=("bf16", "fp16", "none"),
                       help="autocast dtype (fp16 adds a GradScaler; attention softmax stays float32)")
    group.add_argument("--num_workers", default=10, type=int)
    group.add_argument("--pin_mem", action="store_true", default=True,
                       help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                       help="set by torch.distributed.launch; torchrun passes LOCAL_RANK instead")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return group


def add_checkpoint_args(parser, save_every):
    """Output, tensorboard and resume flags."""
    group = parser.add_argument_group("checkpoints and logs")
    group.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go ('' for none)")
    group.add_argument("--log_dir", default="./output_dir", help="tensorboard folder ('' for none)")
    group.add_argument("--save_every", default=save_every, type=int,
                       help="also keep checkpoint-N.pth every this many epochs (checkpoint-last.pth is every epoch)")
    group.add_argument("--resume", default="", help="checkpoint file, or an output folder (its checkpoint-last.pth)")
    group.add_argument("--auto_resume", action="store_true",
                       help="resume from output_dir/checkpoint-last.pth when it exists")
    group.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (set by --resume)")
    return group


def run_script(parser, main):
    """Parse, run `main(args)`; UsageError becomes an argparse error, TrainingError a one-line exit."""
    args = parser.parse_args()
    try:
        main(args)
    except UsageError as err:
        parser.error(str(err))
    except (TrainingError, CheckpointError) as err:
        builtins.print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------

def setup_for_distributed(is_master):
    """Silence print() on all ranks but 0 (print(..., force=True) still prints) and prefix a timestamp."""
    builtin_print = getattr(builtins.print, "_original", builtins.print)

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            stamp = datetime.datetime.now().strftime("[%H:%M:%S.%f]")[:-4] + "]"
            builtin_print(stamp, *args, **kwargs)

    print._original = builtin_print
    builtins.print = print


def _slurm_master_addr():
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def _read_launcher_env(args):
    """(rank, world_size, local_rank) from torchrun / torch.distributed.launch, SLURM, or a lone process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", max(getattr(args, "local_rank", 0), 0)))
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        if args.dist_url == "env://":
            os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
            os.environ.setdefault("MASTER_PORT", "29500")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def init_distributed_mode(args):
    """Set args.rank/world_size/local_rank/distributed/device and join the process group if launched.

    Backend nccl on GPU, gloo on CPU. Only rank 0 prints afterwards.
    """
    args.rank, args.world_size, args.local_rank = _read_launcher_env(args)
    args.distributed = args.world_size > 1
    device = torch.device(args.device)
    if device.type == "cuda":
        index = args.local_rank if args.distributed or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    args.device = device
    if args.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {args.dist_url}", flush=True)
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size,
                                rank=args.rank, device_id=device if device.type == "cuda" else None)
        dist.barrier()
    setup_for_distributed(args.rank == 0)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def _collective_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value):
    """Mean of a Python number over all processes (the number itself without a process group)."""
    if not is_dist_avail_and_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return (tensor / get_world_size()).item()


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    seed = int(seed) % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integers, e.g. (seed, epoch, rank) or (seed, epoch, step)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------------------
# Mixed precision and loss scaling
# ----------------------------------------------------------------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def amp_dtype(amp, device=None):
    """torch dtype for an --amp choice, or None for full precision."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp '{amp}', expected one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def autocast(device, amp):
    """torch.amp.autocast for `device` with the --amp dtype; disabled (explicitly) for 'none'."""
    device_type = torch.device(device).type
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return torch.amp.autocast(device_type=device_type, enabled=False)
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


class NativeScalerWithGradNormCount:
    """backward + optional unscale/clip + step. A GradScaler is active only for fp16.

    Returns the gradient norm (before clipping) on update steps, None on accumulation steps.
    """
    state_dict_key = "amp_scaler"

    def __init__(self, amp="none", device="cpu"):
        self._scaler = torch.amp.GradScaler(device=torch.device(device).type, enabled=amp == "fp16")

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad is not None and clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.tensor(0.0)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        self._scaler.load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------------------
# Metric logging
# ----------------------------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values with windowed median/average and the global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        tensor = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
        dist.barrier()
        dist.all_reduce(tensor)
        self.count, self.total = int(tensor[0].item()), tensor[1].item()

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else float("nan")

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self):
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self):
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self):
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues plus `log_every`, which prints progress, ETA, timing and memory."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, name):
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, printing a progress line every `print_freq` items and at the end."""
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)")


def make_log_writer(args):
    """A tensorboard SummaryWriter on rank 0 when --log_dir is set, else None."""
    if not is_main_process() or not getattr(args, "log_dir", ""):
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: only rank 0 with a log_dir needs it
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir)


def append_log(args, stats):
    """Append one JSON line of epoch stats to output_dir/log.txt (rank 0)."""
    if not is_main_process() or not getattr(args, "output_dir", ""):
        return
    with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")


def epoch_history(args, first_epoch, new_epochs):
    """The per-epoch stats of a whole run: output_dir/log.txt's lines for the epochs before `first_epoch`
    (what the earlier process of a resumed run wrote; the latest line of each epoch), then `new_epochs`.
    Only rank 0 reads log.txt: other ranks get `new_epochs` alone."""
    earlier = {}
    path = os.path.join(getattr(args, "output_dir", "") or "", "log.txt")
    if first_epoch > 0 and is_main_process() and args.output_dir and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                stats = json.loads(line)
                if stats.get("epoch", first_epoch) < first_epoch:
                    earlier[stats["epoch"]] = stats
    return [earlier[epoch] for epoch in sorted(earlier)] + list(new_epochs)


def checkpoint_path(args):
    """output_dir/checkpoint-last.pth when the run writes checkpoints, else ''."""
    return os.path.join(args.output_dir, CHECKPOINT_LAST) if getattr(args, "output_dir", "") else ""


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=None):
    """Write {model, optimizer, scaler, epoch, args} atomically (rank 0).

    Without `name`: checkpoint-last.pth every epoch, plus checkpoint-{epoch}.pth every --save_every epochs and
    after the last epoch. With `name`: checkpoint-{name}.pth only. Returns the paths written.
    """
    if not args.output_dir:
        return []
    paths = []
    if is_main_process():
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                 "epoch": epoch, "args": args_for_checkpoint(args)}
        if name is not None:
            names = [f"checkpoint-{name}.pth"]
        else:
            names = [CHECKPOINT_LAST]
            save_every = getattr(args, "save_every", 0)
            if (save_every > 0 and epoch % save_every == 0) or epoch + 1 == args.epochs:
                names.append(f"checkpoint-{epoch}.pth")
        for file_name in names:
            path = os.path.join(args.output_dir, file_name)
            save_checkpoint_atomic(state, path)
            paths.append(path)
    barrier()
    return paths


def args_for_checkpoint(args):
    """A copy of args whose values are plain types (torch.device -> str) so weights_only loading accepts it."""
    plain = argparse.Namespace(**vars(args))
    for key, value in vars(plain).items():
        if isinstance(value, torch.device):
            setattr(plain, key, str(value))
    return plain


def resolve_resume_path(args):
    """The checkpoint --resume / --auto_resume point at, or '' for a fresh start."""
    resume = getattr(args, "resume", "")
    if resume:
        if os.path.isdir(resume):
            path = os.path.join(resume, CHECKPOINT_LAST)
            if not os.path.isfile(path):
                raise CheckpointError(f"--resume folder '{resume}' has no {CHECKPOINT_LAST}")
            return path
        return resume
    if getattr(args, "auto_resume", False) and args.output_dir:
        path = os.path.join(args.output_dir, CHECKPOINT_LAST)
        if os.path.isfile(path):
            return path
    return ""


def load_model(args, model_without_ddp, optimizer=None, loss_scaler=None):
    """Resume from --resume (file or folder) or --auto_resume: model, optimizer, scaler; start at epoch + 1.

    Returns the checkpoint path used, or '' when there is nothing to resume. Mismatching keys raise
    CheckpointError with the key names.
    """
    path = resolve_resume_path(args)
    if not path:
        return ""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a training checkpoint (no 'model' entry)")
    load_state_dict_checked(model_without_ddp, checkpoint["model"], source=path)
    print(f"Resumed model weights from {path}")
    if optimizer is not None and "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", False):
        optimizer.load_state_dict(checkpoint["optimizer"])
        args.start_epoch = checkpoint["epoch"] + 1
        if loss_scaler is not None and checkpoint.get("scaler") is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        print(f"Resumed optimizer and scaler; continuing at epoch {args.start_epoch}")
    return path


def check_finite(loss_value, epoch, step):
    """Raise TrainingError naming the epoch/step when the (all-reduced) loss is NaN or inf."""
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss is {loss_value} at epoch {epoch}, step {step}; stopping. The last saved "
                            f"checkpoint is untouched (resume from it, e.g. with a lower --blr)")


@contextlib.contextmanager
def no_sync_if(model, condition):
    """DDP's no_sync() while accumulating gradients, a no-op otherwise."""
    if condition and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def check_input_size(model, input_size):
    """UsageError unless --input_size gives the token grid the model (and its tokenizer config) expects."""
    factor = model.vqgan.downsample_factor
    if input_size % factor or input_size // factor != model.grid_size:
        raise UsageError(f"--input_size {input_size} does not fit the tokenizer: it downsamples by {factor} and the "
                         f"model expects a {model.grid_size}x{model.grid_size} token grid, so use --input_size "
                         f"{model.grid_size * factor} (or a --vqgan_config with that resolution)")


def model_builder_kwargs(args):
    """Tokenizer keyword arguments for the model factories; the preset's config unless --vqgan_config."""
    kwargs = {"vqgan_ckpt_path": args.vqgan_ckpt or None}
    if args.vqgan_config:
        kwargs["vqgan_config"] = args.vqgan_config
    return kwargs


def effective_lr(args):
    """args.lr, or blr * effective batch / 256 when only --blr is given. Prints both."""
    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}  actual lr: {args.lr:.2e}  "
          f"accumulate grad iterations: {args.accum_iter}  effective batch size: {eff_batch_size}")
    return args.lr


def all_gather_rows(local, total, chunk_rows=16384):
    """Full (total, ...) CPU tensor from per-process rows of a round-robin split (process r holds rows
    r, r + world, ...; a DistributedSampler with shuffle=False and its padding). Gathers in chunks so large
    feature sets do not need to fit on one GPU."""
    world = get_world_size()
    if world == 1:
        return local[:total].cpu()
    device = _collective_device()
    pieces = []
    for start in range(0, local.shape[0], chunk_rows):
        part = local[start:start + chunk_rows].to(device).contiguous()
        gathered = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(gathered, part)
        pieces.append(torch.stack([g.cpu() for g in gathered], dim=1).reshape(-1, *local.shape[1:]))
    return torch.cat(pieces)[:total]
