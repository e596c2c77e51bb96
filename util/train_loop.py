"""`fit`: the epoch loop of pre-training, the linear probe and fine-tuning."""
import datetime
import time

from util.checkpoint import save_model
from util.datasets import set_epoch
from util.distributed import cleanup_distributed, get_rank
from util.metrics import epoch_history, make_log_writer
from util.seeding import derive_seed, seed_everything


def fit(args, train_epoch, loader_train, checkpoint_model, optimizer, loss_scaler, evaluate_epoch=None,
        progress=None):
    """Run epochs args.start_epoch .. args.epochs - 1 and return (history, the last epoch's test stats).

    Each epoch: set the sampler's and dataset's epoch and seed the global RNGs from (seed, epoch, rank), so that
    a resumed run continues exactly as an uninterrupted one; `train_epoch(epoch, log_writer)` -> train stats;
    `evaluate_epoch(epoch, log_writer)` -> test stats, when given (it may update `progress`); then the epoch's
    files of `checkpoint_model` with the `progress` dict's entries (e.g. the best accuracy so far, so that a resume
    continues it) (util.checkpoint.save_epoch: checkpoint-N.pth when due, the log.txt line
    {train_*, test_*, epoch}, checkpoint-last.pth last); flush tensorboard. The tensorboard writer (rank 0,
    --log_dir) and the process group are closed at the end, also when an epoch fails. `history` is
    util.metrics.epoch_history: log.txt's
    lines of the whole run, the epochs of an earlier process of a resumed run included.
    """
    log_writer = make_log_writer(args)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    first_epoch, new_epochs, test_stats = args.start_epoch, [], {}
    try:
        for epoch in range(args.start_epoch, args.epochs):
            set_epoch(loader_train, epoch)
            seed_everything(derive_seed(args.seed, epoch, get_rank()))
            train_stats = train_epoch(epoch, log_writer)
            if evaluate_epoch is not None:
                test_stats = evaluate_epoch(epoch, log_writer)
            new_epochs.append({**{f"train_{k}": v for k, v in train_stats.items()},
                               **{f"test_{k}": v for k, v in test_stats.items()}, "epoch": epoch})
            # checkpoint-N.pth, the log line, then checkpoint-last.pth, which holds the line too (save_epoch)
            save_model(args, epoch, checkpoint_model, optimizer, loss_scaler, log_stats=new_epochs[-1],
                       extra=progress)
            if log_writer is not None:
                log_writer.flush()
    finally:
        if log_writer is not None:
            log_writer.close()
        cleanup_distributed()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return epoch_history(args, first_epoch, new_epochs), test_stats
