"""`setup_run`: the one prologue of every script's main(); `releases_output_dir`: its decorator."""
import functools
import os

from util.distributed import get_rank, init_distributed_mode
from util.output_dir import check_output_dir, open_output_dir, release_output_dirs
from util.perf import resolve_perf_args
from util.seeding import seed_everything

CODE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def setup_run(args, check_args=None, create_output_dir=True):
    """Prepare a run, in this order:

    1. apply --reference_numerics (scripts with the speed flags);
    2. check_args(args): the script's usage checks, which raise UsageError before anything is written;
    3. check --output_dir (util.output_dir.check_output_dir): not a file, writable, not in use by another run,
       and not holding an earlier run's checkpoints unless --resume / --auto_resume / --overwrite;
    4. join the process group when launched (sets args.rank, world_size, distributed, device; only rank 0
       prints from here on);
    5. print the code folder and the arguments;
    6. seed python, numpy and torch with args.seed + rank;
    7. open args.output_dir (util.output_dir.open_output_dir: create, lock for the run, remove stale temporary
       files, repair on resume). create_output_dir=False: the script calls open_output_dir itself once its
       model and data are built, so that usage errors found there leave nothing behind.

    The tensorboard writer is made where scalars are written (util.metrics.make_log_writer), after model and
    data are built, so that a run stopped by bad data or a bad checkpoint leaves no event file behind.
    """
    resolve_perf_args(args)
    if check_args is not None:
        check_args(args)
    check_output_dir(args)
    init_distributed_mode(args)
    print(f"job dir: {CODE_DIR}")
    print(str(args).replace(", ", ",\n"))
    seed_everything(args.seed + get_rank())
    if create_output_dir:
        open_output_dir(args)
    return args


def releases_output_dir(main):
    """Decorator of a script's main(): the output folder locks it took are released when it returns or raises,
    so that in-process callers (the demo, tests, notebooks) can run it again or hand the folder on."""
    @functools.wraps(main)
    def run(args):
        try:
            return main(args)
        finally:
            release_output_dirs()
    return run
