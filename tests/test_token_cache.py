"""The token cache stores K seeded views per image, identical whatever the number of processes."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, write_image_folder
from taming.models.vqgan import build_vqgan
from util.datasets import SeededImageFolder, pretrain_transform
from util.token_cache import CachedTokenDataset

COMMON = ["--vqgan_config", "config/vqgan_tiny.yaml", "--num_views", "2", "--batch_size", "4",
          "--num_workers", "0", "--device", "cpu", "--amp", "none"]


def run(args, nproc=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", "29631"] if nproc > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + ["main_cache_tokens.py"] + args, cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), splits=(("train", 3),), num_classes=3, size=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(123)
    vqgan, _ = build_vqgan("config/vqgan_tiny.yaml")
    vqgan.quantize.embedding.weight.data.normal_(std=0.5)  # spread codes like encoder outputs: no near-ties
    path = str(tmp_path_factory.mktemp("tok") / "vqgan.ckpt")
    torch.save({"state_dict": vqgan.state_dict()}, path)
    return vqgan, path




def test_cache_matches_direct_tokenization_and_process_count(data, tokenizer, tmp_path):
    vqgan, ckpt = tokenizer
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # one image per batch and one thread in every process: the codes are the same by construction (another
    # batch size may round the encoder differently and flip near-tied codes)
    alone = ["--batch_size", "1"]
    run(["--data_path", data, "--output_dir", one, "--vqgan_ckpt", ckpt] + COMMON + alone)
    run(["--data_path", data, "--output_dir", two, "--vqgan_ckpt", ckpt] + COMMON + alone, nproc=2)
    single, sharded = CachedTokenDataset(one), CachedTokenDataset(two)
    assert len(single) == len(sharded) == 9 and sharded.meta["world_size"] == 2
    for epoch in range(3):
        single.set_epoch(epoch)
        sharded.set_epoch(epoch)
        for i in range(len(single)):
            assert torch.equal(single[i][0], sharded[i][0]) and single[i][1] == sharded[i][1]

    # view v of image i is the seeded training augmentation of epoch v, tokenized (up to a few codes that a
    # random tokenizer's near-ties flip between batch sizes and memory layouts)
    dataset = SeededImageFolder(os.path.join(data, "train"), pretrain_transform(256), seed=0)
    tokens = torch.from_numpy(np.load(os.path.join(one, "tokens-rank00000.npy")).astype(np.int64))
    assert tokens.shape == (9, 2, 256)
    for view in range(2):
        dataset.set_epoch(view)
        for index in (0, 4):
            image, _ = dataset[index]
            with torch.no_grad():
                _, _, (_, _, indices) = vqgan.encode(image[None])
            agreement = (tokens == indices).float().mean(dim=-1)  # (images, views)
            assert agreement[index, view] >= 0.85
            assert agreement.argmax() == index * 2 + view

    # a rerun with the same settings is a no-op; other settings in the same folder are refused
    rerun = run(["--data_path", data, "--output_dir", one, "--vqgan_ckpt", ckpt] + COMMON)
    assert "nothing to do" in rerun.stdout
    bad = subprocess.run([sys.executable, "main_cache_tokens.py", "--data_path", data, "--output_dir", one,
                          "--vqgan_ckpt", ckpt] + COMMON[:3] + ["3"] + COMMON[4:],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "other settings" in bad.stderr


def test_views_are_drawn_per_epoch(data, tmp_path):
    cache = str(tmp_path / "cache")
    run(["--data_path", data, "--output_dir", cache] + COMMON)
    dataset = CachedTokenDataset(cache, seed=0)
    tokens = np.load(os.path.join(cache, "tokens-rank00000.npy")).astype(np.int64)
    seen = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0][0].numpy()
        view = [v for v in range(2) if np.array_equal(tokens[0, v], item)]
        assert len(view) >= 1
        seen.update(view)
    assert seen == {0, 1}
