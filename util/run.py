"""`setup_run`: the one prologue of every script's main()."""
import os

from util.distributed import get_rank, init_distributed_mode, is_main_process
from util.perf import resolve_perf_args
from util.seeding import seed_everything

CODE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def setup_run(args, check_args=None, create_output_dir=True):
    """Prepare a run, in this order:

    1. apply --reference_numerics (scripts with the speed flags);
    2. check_args(args): the script's usage checks, which raise UsageError before anything is written;
    3. join the process group when launched (sets args.rank, world_size, distributed, device; only rank 0
       prints from here on);
    4. print the code folder and the arguments;
    5. seed python, numpy and torch with args.seed + rank;
    6. create args.output_dir on rank 0 (create_output_dir=False: the script checks or lays out its output
       folder itself, after building the model).

    The tensorboard writer is made where scalars are written (util.metrics.make_log_writer), after model and
    data are built, so that a run stopped by bad data or a bad checkpoint leaves no event file behind.
    """
    resolve_perf_args(args)
    if check_args is not None:
        check_args(args)
    init_distributed_mode(args)
    print(f"job dir: {CODE_DIR}")
    print(str(args).replace(", ", ",\n"))
    seed_everything(args.seed + get_rank())
    if create_output_dir and getattr(args, "output_dir", "") and is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    return args
