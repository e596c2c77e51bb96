"""Training metrics: smoothed values, the progress/ETA logger, tensorboard on rank 0 and the log.txt lines."""
import datetime
import json
import os
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from util.distributed import collective_device, is_dist_avail_and_initialized, is_main_process

LOG_FILE = "log.txt"


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
        tensor = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
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


def tensorboard_dir(args):
    """--log_dir, or --output_dir when --log_dir is not given (as the reference, which sets one to the other);
    '' for no tensorboard events."""
    log_dir = getattr(args, "log_dir", None)
    return getattr(args, "output_dir", "") if log_dir is None else log_dir


def make_log_writer(args):
    """A tensorboard SummaryWriter in tensorboard_dir(args) on rank 0, or None when that is ''."""
    log_dir = tensorboard_dir(args)
    if not is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: only rank 0 with a log_dir needs it
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_log(args, stats):
    """Append one JSON line of epoch stats to output_dir/log.txt (rank 0)."""
    if not is_main_process() or not getattr(args, "output_dir", ""):
        return
    with open(os.path.join(args.output_dir, LOG_FILE), "a") as f:
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
