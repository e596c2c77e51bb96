"""The linear probe's feature cache: frozen-backbone features of K augmented views of every training image.

View v of image i is the probe's training transform seeded by (seed, v, i), which is the crop the uncached
probe draws for image i in epoch v (util.datasets.SeededImageFolder); epoch e trains on view e mod K of every
image. A cache of K >= epochs views therefore trains as the uncached probe does (to float rounding: the
features come from other batches), and K < epochs repeats each crop every K epochs.

Layout of the folder (OUTPUT_DIR/features; rank 0 writes, every process reads):
    meta.json           what the features depend on: backbone weights, images, transform, seed, precision
    train-labels.npy    int64 (N,) class of each training image, in dataset order
    train-view000.npy   float32 (N, D) features of view 0 of every training image, in dataset order
    ...
Each file is written atomically (util.checkpoint.write_atomic) once complete, so a killed run keeps its finished
views and a rerun with the same settings computes only the missing ones; the views do not depend on K, so a
larger K reuses them too. A folder written with other settings is emptied and rebuilt.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from util.checkpoint import format_bytes, save_json_atomic
from util.datasets import build_loader
from util.distributed import all_gather_rows, barrier, is_dist_avail_and_initialized, is_main_process
from util.metrics import MetricLogger
from util.token_cache import save_npy_atomic

FOLDER = "features"  # inside --output_dir
META_FILE = "meta.json"
LABELS_FILE = "train-labels.npy"


def view_path(folder, view):
    return os.path.join(folder, f"train-view{view:03d}.npy")


def state_fingerprint(state_dict, skip_prefixes=()):
    """sha256 of a state dict's names, dtypes, shapes and bytes (keys starting with `skip_prefixes` left out)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if name.startswith(tuple(skip_prefixes)):
            continue
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def samples_fingerprint(dataset):
    """sha256 of an ImageFolder's (path relative to its root, class) list."""
    listing = "\n".join(f"{os.path.relpath(path, dataset.root)}\t{target}" for path, target in dataset.samples)
    return hashlib.sha256(listing.encode()).hexdigest()


@torch.no_grad()
def extract_rows(features, dataset, args, header):
    """(features, labels) of a whole split in dataset order: each process extracts its share, then all gather."""
    loader = build_loader(dataset, args, train=False, distributed=True)
    feats, labels = [], []
    for images, targets in MetricLogger().log_every(loader, 20, header):
        feats.append(features(images.to(args.device, non_blocking=True)).cpu())
        labels.append(targets)
    return all_gather_rows(torch.cat(feats), len(dataset)), all_gather_rows(torch.cat(labels), len(dataset))


def extract_features(features, dataset, args):
    """TensorDataset(features, labels) of a whole split (the validation features, kept in memory)."""
    return torch.utils.data.TensorDataset(*extract_rows(features, dataset, args, "Extracting features:"))


def broadcast_from_main(obj):
    """`obj` of rank 0 on every process."""
    if not is_dist_avail_and_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_meta(folder):
    try:
        with open(os.path.join(folder, META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def open_cache(folder, settings, num_views):
    """Rank 0: keep `folder` when its meta.json holds `settings`, else empty it and write them. Returns, on every
    process, the views of 0..num_views-1 already stored."""
    present = None
    if is_main_process():
        os.makedirs(folder, exist_ok=True)
        meta = read_meta(folder)
        if meta != settings:
            stale = sorted(n for n in os.listdir(folder) if n.startswith("train-") and n.endswith(".npy"))
            if meta is not None or stale:
                changed = sorted(k for k in set(settings) | set(meta or {})
                                 if (meta or {}).get(k) != settings.get(k))
                print(f"feature cache '{folder}' was written with other settings ({', '.join(changed)}); "
                      f"recomputing it")
            for name in stale:
                os.remove(os.path.join(folder, name))
            save_json_atomic(os.path.join(folder, META_FILE), settings)
        present = [v for v in range(num_views)
                   if os.path.isfile(view_path(folder, v)) and os.path.isfile(os.path.join(folder, LABELS_FILE))]
    return broadcast_from_main(present)


def cache_train_views(features, dataset, args, num_views, folder="", settings=None):
    """FeatureViews of `num_views` views of `dataset` (a SeededImageFolder with the training transform).

    With `folder`, views are stored there (see the module docstring) and those already stored with the same
    `settings` are reused; without, they are kept in memory on every process."""
    present = open_cache(folder, settings, num_views) if folder else []
    if folder:
        dim = settings["feature_dim"]
        print(f"feature cache '{folder}': {num_views} views x {len(dataset)} images x {dim} floats "
              f"({format_bytes(4 * num_views * len(dataset) * dim)}); {len(present)} stored, "
              f"{num_views - len(present)} to compute")
    views, labels = [], None
    for view in range(num_views):
        if view in present:
            views.append(view_path(folder, view))
            continue
        dataset.set_epoch(view)  # the seeded crops of epoch `view`
        feats, labels = extract_rows(features, dataset, args, f"Caching view {view + 1}/{num_views}:")
        if not folder:
            views.append(feats)
            continue
        if is_main_process():
            labels_path = os.path.join(folder, LABELS_FILE)
            if not os.path.isfile(labels_path):
                save_npy_atomic(labels_path, labels.numpy().astype(np.int64))
            save_npy_atomic(view_path(folder, view), feats.numpy())  # float32
        barrier()
        views.append(view_path(folder, view))
    if folder:
        labels = torch.from_numpy(np.load(os.path.join(folder, LABELS_FILE)))
    return FeatureViews(views, labels)


class FeatureViews(torch.utils.data.Dataset):
    """(features, label) of the training images; in epoch e (set_epoch) item i is view e mod K of image i.

    Each view is a (N, D) tensor in memory or a .npy file, memory-mapped on first use in each process (the data
    workers included), so that processes on one machine share the page cache instead of holding copies."""

    def __init__(self, views, labels):
        self.views = list(views)
        self.labels = labels
        self.num_views = len(self.views)
        self.epoch = 0
        self._mapped = {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def view_of_epoch(self, epoch):
        return epoch % self.num_views

    def _view(self, view):
        stored = self.views[view]
        if isinstance(stored, torch.Tensor):
            return stored
        if view not in self._mapped:
            self._mapped[view] = np.load(stored, mmap_mode="r")
        return self._mapped[view]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        row = self._view(self.view_of_epoch(self.epoch))[index]
        if not isinstance(row, torch.Tensor):
            row = torch.from_numpy(np.array(row))  # a copy: the map is read-only
        return row, int(self.labels[index])

    def __getstate__(self):  # data workers map the files themselves
        return {**self.__dict__, "_mapped": {}}
