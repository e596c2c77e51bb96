"""Seeds: the global RNGs of a process, and well-mixed seeds derived from (seed, epoch, rank/step/index)."""
import random

import numpy as np
import torch


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    seed = int(seed) % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integers, e.g. (seed, epoch, rank) or (seed, epoch, step)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
