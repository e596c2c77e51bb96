"""Distributed set-up (torchrun, SLURM, OpenMPI or a single process), rank queries, collectives and DDP wrapping."""
import builtins
import contextlib
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

from util.errors import UsageError


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


OPENMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


def _read_openmpi_env(args):
    """(rank, world_size, local_rank) from OpenMPI's environment (--dist_on_itp, as in the reference)."""
    missing = [name for name in OPENMPI_VARS if name not in os.environ]
    if missing:
        raise UsageError(f"--dist_on_itp reads the process layout from OpenMPI, but {', '.join(missing)} "
                         "is not set: start the script with mpirun, or drop --dist_on_itp (torchrun and SLURM "
                         "are detected without a flag)")
    if args.dist_url == "env://" and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise UsageError("--dist_on_itp with --dist_url env:// needs MASTER_ADDR and MASTER_PORT (the address "
                         "and a free port of the rank-0 host), or pass --dist_url tcp://HOST:PORT")
    return tuple(int(os.environ[name]) for name in OPENMPI_VARS)


def _read_launcher_env(args):
    """(rank, world_size, local_rank) from OpenMPI (--dist_on_itp), torchrun / torch.distributed.launch,
    SLURM, or a lone process."""
    if getattr(args, "dist_on_itp", False):
        return _read_openmpi_env(args)
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


def collective_device():
    """Where tensors for collectives must live: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value):
    """Mean of a Python number over all processes (the number itself without a process group)."""
    if not is_dist_avail_and_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return (tensor / get_world_size()).item()


def all_gather_rows(local, total, chunk_rows=16384):
    """Full (total, ...) CPU tensor from per-process rows of a round-robin split (process r holds rows
    r, r + world, ...; a DistributedSampler with shuffle=False and its padding). Gathers in chunks so large
    feature sets do not need to fit on one GPU."""
    world = get_world_size()
    if world == 1:
        return local[:total].cpu()
    device = collective_device()
    pieces = []
    for start in range(0, local.shape[0], chunk_rows):
        part = local[start:start + chunk_rows].to(device).contiguous()
        gathered = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(gathered, part)
        pieces.append(torch.stack([g.cpu() for g in gathered], dim=1).reshape(-1, *local.shape[1:]))
    return torch.cat(pieces)[:total]


def wrap_ddp(module, args, find_unused_parameters=False):
    """`module` in DistributedDataParallel on args.device when args.distributed, else `module` itself."""
    if not args.distributed:
        return module
    device_ids = [args.device.index] if args.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (the model itself when not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync_if(model, condition):
    """DDP's no_sync() while accumulating gradients, a no-op otherwise."""
    if condition and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
