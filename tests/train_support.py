"""Helpers for the tests: a 32-pixel tokenizer config, texture data, and the one way to run a script or torchrun."""
import glob
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
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
    """Command-line flags of a tiny, full-precision, single-worker pre-training run (on a random tokenizer unless
    `extra` gives --vqgan_ckpt, or --no-random_tokenizer)."""
    return ["--model", "mage_vit_tiny_patch16", "--vqgan_config", vqgan_config, "--input_size", "32",
            "--random_tokenizer",
            "--data_path", str(data_path), "--output_dir", str(output_dir), "--log_dir", "",
            "--amp", "none", "--num_workers", "0", "--device", "cpu", *map(str, extra)]


def parse(module, argv):
    return module.get_args_parser().parse_args(argv)


def script_env(**extra):
    """The environment of a script run by a test: one OpenMP thread with a short spin-wait (on a shared CPU
    the default spin-wait makes small steps 10x slower), the repository on PYTHONPATH."""
    return dict(os.environ, OMP_NUM_THREADS="1", GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "10000"),
                PYTHONPATH=REPO_ROOT, **extra)


def _tail(text, chars=3000):
    return text[-chars:] if text else ""


def run_command(command, timeout=300, check=True, env=None, cwd=REPO_ROOT):
    """Run `command` (a list) in its own process group; returns the CompletedProcess (text stdout/stderr).

    On a timeout the whole group (torchrun's workers included) is killed and the test fails with the output's
    tail; with check=True a non-zero exit fails the test with the command and the tail of stderr."""
    process = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env or script_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, command))}\n"
                    f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, (f"exit code {result.returncode}: {' '.join(result.args)}\n"
                                        f"--- stdout ---\n{_tail(stdout, 1500)}\n--- stderr ---\n{_tail(stderr)}")
    return result


def run_script(script, argv, timeout=300, check=True, env=None, cwd=REPO_ROOT):
    """`python script argv` in a fresh process (script relative to the repository root)."""
    return run_command([sys.executable, os.path.join(REPO_ROOT, script), *argv], timeout, check, env, cwd)


def run_torchrun(script, argv, nproc=2, timeout=300, check=True, env=None, cwd=REPO_ROOT):
    """`torchrun --standalone --nproc_per_node=nproc script argv` (gloo on CPU). --standalone lets the
    rendezvous pick a free port, so parallel test runs never collide."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO_ROOT, script), *argv]
    return run_command(command, timeout, check, env, cwd)


def kill_when_written(script, argv, pattern, count, timeout=120):
    """Start `python script argv` (one thread), SIGKILL it as soon as `count` files match the glob `pattern`
    (or when it ends first). Returns the number of matching files after the kill."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, script), *map(str, argv)], cwd=REPO_ROOT,
                               env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while len(glob.glob(pattern)) < count and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(glob.glob(pattern))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
