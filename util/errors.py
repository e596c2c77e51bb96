"""The errors the scripts report as one line (see util.cli.run_script), and the checks that raise them."""
import math


class UsageError(ValueError):
    """Flags that cannot work together; the scripts report it as an argparse error before any work."""


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, unreadable image); the scripts print it and exit with status 1."""


class DiskWriteError(TrainingError):
    """A file that cannot be written because its disk is full, over quota or read-only."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not matching the model."""


def check_finite(loss_value, epoch, step):
    """Raise TrainingError naming the epoch/step when the (all-reduced) loss is NaN or inf."""
    if not math.isfinite(loss_value):
        raise TrainingError(f"loss is {loss_value} at epoch {epoch}, step {step}; stopping. The last saved "
                            f"checkpoint is untouched (resume from it, e.g. with a lower --blr)")
