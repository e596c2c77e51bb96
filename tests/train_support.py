"""Helpers for the training-pipeline tests: a 32-pixel tokenizer config, texture data, script runners."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from conftest import REPO_ROOT

# The tiny presets' tokenizer works on 256-pixel images; this one takes 32 pixels to an 8x8 token grid
# (64 tokens, 256 codes) so that whole training runs take a second or two on a CPU.
TOKENIZER_32PX = """\
model:
  params:
    embed_dim: 64
    n_embed: 256
    ddconfig:
      double_z: False
      z_channels: 64
      resolution: 32
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 1, 2]
      num_res_blocks: 1
      attn_resolutions: []
      dropout: 0.0
"""


def write_tokenizer_config(folder):
    path = os.path.join(folder, "vqgan_32px.yaml")
    with open(path, "w") as f:
        f.write(TOKENIZER_32PX)
    return path


def _texture(label, size, rng):
    """Class 0: horizontal stripes, 1: vertical stripes, 2: checkerboard, 3: flat; random colours, period, phase."""
    background = np.array([rng.randrange(0, 256) for _ in range(3)], dtype=float)
    foreground = (background + 128 + rng.randrange(-40, 40)) % 256
    y, x = np.mgrid[0:size, 0:size]
    half = 2
    phase = rng.randrange(2 * half)
    rows, cols = (y + phase) // half % 2, (x + phase) // half % 2
    pattern = (rows, cols, (rows + cols) % 2, np.zeros_like(x))[label]
    return Image.fromarray(np.where(pattern[..., None] == 1, foreground, background).astype(np.uint8))


def write_texture_folder(root, splits, size=32, seed=0):
    """root/{split}/class_{k}/*.png with 4 texture classes (what a tokenizer sees: local patterns)."""
    rng = random.Random(seed)
    for split, per_class in splits:
        for label in range(4):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                _texture(label, size, rng).save(os.path.join(folder, f"{k:04d}.png"))
    return str(root)


def pretrain_args(data_path, output_dir, vqgan_config, *extra):
    """Command-line flags of a tiny, full-precision, single-worker pre-training run."""
    return ["--model", "mage_vit_tiny_patch16", "--vqgan_config", vqgan_config, "--input_size", "32",
            "--data_path", str(data_path), "--output_dir", str(output_dir), "--log_dir", "",
            "--amp", "none", "--num_workers", "0", "--device", "cpu", *map(str, extra)]


def parse(module, argv):
    return module.get_args_parser().parse_args(argv)


def run_torchrun(script, argv, nproc=2, timeout=180):
    """`torchrun --standalone --nproc_per_node=nproc script argv` (gloo on CPU). Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO_ROOT, script), *map(str, argv)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_script(script, argv, timeout=120):
    """`python script argv` in a fresh process. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, argv)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def kill_when_written(script, argv, pattern, count, timeout=120):
    """Start `python script argv` (one thread), SIGKILL it as soon as `count` files match the glob `pattern`
    (or when it ends first). Returns the number of matching files after the kill."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, script), *map(str, argv)], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while len(glob.glob(pattern)) < count and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(glob.glob(pattern))


def model_state(path):
    from util.checkpoint import load_checkpoint
    return load_checkpoint(path)["model"]


def max_abs_difference(state_a, state_b):
    assert state_a.keys() == state_b.keys()
    return max((state_a[k].double() - state_b[k].double()).abs().max().item() for k in state_a)


def data_fitted_tokenizer_checkpoint(path, vqgan_config, images, seed=0):
    """A MAGE tiny checkpoint whose codebook is a random sample of encoder outputs on `images`.

    A tokenizer with a random codebook maps most inputs to a few arbitrary codes; drawing the codes from
    real encoder outputs makes the tokens follow the images' local patterns, as a trained tokenizer's do.
    """
    import models_mage
    torch.manual_seed(seed)
    model = models_mage.mage_vit_tiny_patch16(vqgan_config=vqgan_config)
    with torch.no_grad():
        z = model.vqgan.encoder(images).permute(0, 2, 3, 1).reshape(-1, model.vqgan.quantize.e_dim)
        codebook = model.vqgan.quantize.embedding.weight
        codebook.copy_(z[torch.randperm(z.shape[0])[:codebook.shape[0]]])
    torch.save({"model": model.state_dict()}, path)
    return path
