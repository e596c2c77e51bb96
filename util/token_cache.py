"""Pre-tokenized training data: K augmented views of every image, tokenized once.

Layout of a cache folder (written by main_cache_tokens.py, one shard per rank):
    meta.json                  settings (views, grid, codebook, tokenizer, crop) and the shard list
    tokens-rank00000.npy       uint16 (N_r, K, L) token ids of the rank's images
    index-rank00000.npy        int64 (N_r,) dataset index of each row
    labels-rank00000.npy       int64 (N_r,) class of each row

This departs from the recipe's unlimited augmentation: each epoch draws one of the K fixed views of an
image instead of a fresh random crop. MAGE-C draws two different views of each image per epoch.
"""
import json
import os

import numpy as np
import torch

from util.checkpoint import save_json_atomic, write_atomic
from util.errors import UsageError
from util.seeding import derive_seed

META_FILE = "meta.json"


def shard_paths(cache_dir, rank):
    return {name: os.path.join(cache_dir, f"{name}-rank{rank:05d}.npy") for name in ("tokens", "index", "labels")}


def save_npy_atomic(path, array):
    write_atomic(path, lambda f: np.save(f, array))


def write_shard(cache_dir, rank, tokens, indices, labels):
    paths = shard_paths(cache_dir, rank)
    save_npy_atomic(paths["index"], np.asarray(indices, dtype=np.int64))
    save_npy_atomic(paths["labels"], np.asarray(labels, dtype=np.int64))
    save_npy_atomic(paths["tokens"], np.asarray(tokens, dtype=np.uint16))


def write_meta(cache_dir, meta):
    save_json_atomic(os.path.join(cache_dir, META_FILE), meta)


def read_meta(cache_dir):
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--cached_tokens '{cache_dir}' is not a token cache (no {META_FILE}); "
                         "write one with main_cache_tokens.py")
    with open(path) as f:
        return json.load(f)


def num_classes(cache_dir):
    """1 + the largest class label stored in the cache."""
    meta = read_meta(cache_dir)
    paths = [shard_paths(cache_dir, rank)["labels"] for rank in range(meta["world_size"])]
    return 1 + max((int(np.load(p).max(initial=-1)) for p in paths if os.path.isfile(p)), default=-1)


class CachedTokenDataset(torch.utils.data.Dataset):
    """Token ids of one view per image and epoch: item i of epoch e is view hash(seed, e, i) mod K.

    views_per_sample=2 (MAGE-C): item i is (2, L), the view above and a second, different one drawn uniformly
    from the other K - 1 views by hash(seed, e, i, 1) (so K >= 2 is needed).
    """

    def __init__(self, cache_dir, seed=0, views_per_sample=1):
        self.meta = read_meta(cache_dir)
        tokens, indices, labels = [], [], []
        for rank in range(self.meta["world_size"]):
            paths = shard_paths(cache_dir, rank)
            missing = [p for p in paths.values() if not os.path.isfile(p)]
            if missing:
                raise UsageError(f"token cache '{cache_dir}' is incomplete: missing {missing}")
            tokens.append(np.load(paths["tokens"], mmap_mode="r"))
            indices.append(np.load(paths["index"]))
            labels.append(np.load(paths["labels"]))
        order = np.argsort(np.concatenate(indices), kind="stable")
        self.row_of = order  # dataset index -> row in the concatenated shards
        self.shards = tokens
        self.shard_starts = np.cumsum([0] + [len(t) for t in tokens])
        self.labels = np.concatenate(labels)[order]
        self.num_views = self.meta["num_views"]
        if views_per_sample not in (1, 2) or views_per_sample > self.num_views:
            raise UsageError(f"token cache '{cache_dir}' holds {self.num_views} view(s) per image; "
                             f"{views_per_sample} different views per sample need at least that many")
        self.views_per_sample = views_per_sample
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.row_of)

    def views(self, index):
        """The cached views (indices in [0, K)) that item `index` of the current epoch returns."""
        first = derive_seed(self.seed, self.epoch, index) % self.num_views
        if self.views_per_sample == 1:
            return [first]
        offset = 1 + derive_seed(self.seed, self.epoch, index, 1) % (self.num_views - 1)
        return [first, (first + offset) % self.num_views]

    def __getitem__(self, index):
        row = int(self.row_of[index])
        shard = int(np.searchsorted(self.shard_starts, row, side="right") - 1)
        views = self.views(index)
        tokens = np.asarray(self.shards[shard][row - self.shard_starts[shard], views], dtype=np.int64)  # (V, L)
        return torch.from_numpy(tokens[0] if self.views_per_sample == 1 else tokens), int(self.labels[index])
