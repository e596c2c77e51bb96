"""Command-line pieces shared by the scripts: the runtime and checkpoint flag groups, the rule that the tokenizer
has weights (`check_tokenizer_source`), and `run_script`, which turns the scripts' errors into one-line
messages. The speed flags are in util/perf.py."""
import argparse
import builtins
import sys

import torch

from util.checkpoint import holds_tokenizer
from util.errors import CheckpointError, TrainingError, UsageError

RELEASED_TOKENIZER = "vqgan_jax_strongaug.ckpt"


def add_runtime_args(parser, data_loader=True):
    """Device, seed, data loading (scripts with a DataLoader) and distributed flags (reference names)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="'cuda' or 'cpu'; each process uses cuda:LOCAL_RANK under a launcher")
    group.add_argument("--seed", default=0, type=int)
    if data_loader:
        group.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes")
        group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                           help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                       help="set by torch.distributed.launch; torchrun passes LOCAL_RANK instead")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    group.add_argument("--dist_on_itp", action="store_true",
                       help="take rank, world size and local rank from OpenMPI (OMPI_COMM_WORLD_RANK, _SIZE, "
                            "_LOCAL_RANK; start with mpirun and set MASTER_ADDR / MASTER_PORT)")
    return group


def add_checkpoint_args(parser, save_every):
    """Output, tensorboard and resume flags."""
    group = parser.add_argument_group("checkpoints and logs")
    group.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go ('' for none)")
    group.add_argument("--log_dir", default=None,
                       help="tensorboard folder (default: --output_dir; '' for no tensorboard events)")
    group.add_argument("--save_every", default=save_every, type=int,
                       help="also keep checkpoint-N.pth every this many epochs (checkpoint-last.pth is every epoch)")
    group.add_argument("--resume", default="", help="checkpoint file, or an output folder (its checkpoint-last.pth)")
    group.add_argument("--auto_resume", action="store_true",
                       help="resume from output_dir/checkpoint-last.pth when it exists")
    group.add_argument("--overwrite", action="store_true",
                       help="start over in an --output_dir that holds checkpoints of an earlier run, deleting its "
                            "checkpoint-*.pth and log.txt (without it, or --resume/--auto_resume, such a folder is "
                            "refused)")
    group.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (set by --resume)")
    return group


def add_random_tokenizer_arg(group):
    """--random_tokenizer, the explicit opt-out of check_tokenizer_source."""
    group.add_argument("--random_tokenizer", action=argparse.BooleanOptionalAction, default=False,
                       help="allow a randomly initialised tokenizer when neither --vqgan_ckpt nor a checkpoint "
                            "the run loads gives its weights (experiments and tests; without it that is an error)")


def check_tokenizer_source(args, checkpoints=(), opt_out="--random_tokenizer"):
    """UsageError unless the tokenizer gets trained weights, from --vqgan_ckpt or from one of `checkpoints` (the
    MAGE or classifier checkpoints the run loads; '' entries are skipped) that holds vqgan.* weights, or
    args.random_tokenizer allows a random one. For the scripts' usage checks: it reads only the checkpoints' keys
    (util.checkpoint.holds_tokenizer)."""
    if args.vqgan_ckpt or getattr(args, "random_tokenizer", False):
        return
    checkpoints = [str(path) for path in checkpoints if path]
    if any(holds_tokenizer(path) for path in checkpoints):
        return
    lacking = f" ({', '.join(checkpoints)} holds no vqgan.* weights)" if checkpoints else ""
    raise UsageError(f"no tokenizer weights{lacking}: pass --vqgan_ckpt with the released {RELEASED_TOKENIZER} "
                     f"(or a main_tokenizer.py tokenizer)"
                     + (f"; {opt_out} runs with a random tokenizer, for tests and experiments" if opt_out else ""))


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
