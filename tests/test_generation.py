"""gen_img_uncond.py end to end on CPU: same files for any batch size / number of processes, resume after a
kill, checkpoint errors before any work, FID evaluation written to metrics.json."""
import argparse
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, write_image_folder
from train_support import kill_when_written
from gen_img_uncond import build_model, check_args, get_args_parser
from models_mage import mage_vit_tiny_patch16
from util.checkpoint import CheckpointError
from util.generation import prepare_folder
from util.misc import UsageError

NUM_IMAGES = 8
COMMON = ["--model", "mage_vit_tiny_patch16", "--num_images", str(NUM_IMAGES), "--num_iter", "3",
          "--device", "cpu", "--amp", "none"]
RUN_NAME = "mage_tiny_temp4.5_iter3_seed0_none"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mage_tiny.pth"
    torch.save({"model": mage_vit_tiny_patch16().state_dict()}, path)
    return str(path)


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def generate(args, launcher=(sys.executable,), check=True):
    command = [*launcher, "gen_img_uncond.py", *COMMON, *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def image_bytes(output_dir):
    folder = os.path.join(output_dir, RUN_NAME, "images")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def reference_run(ckpt, tmp_path_factory):
    """One process, batch 2, evaluated with the offline feature extractor against a small ImageFolder."""
    root = tmp_path_factory.mktemp("gen")
    references = write_image_folder(root / "refs", splits=(("val", 3),), size=64)
    output_dir = str(root / "single")
    result = generate(["--ckpt", ckpt, "--batch_size", "2", "--output_dir", output_dir, "--eval_fid",
                       "--fid_ref", os.path.join(references, "val", "class_0_ellipse"),
                       "--fid_feature_extractor", "mage-pixel-stats"])
    return output_dir, result


def test_layout_grid_and_metrics(reference_run):
    output_dir, _ = reference_run
    folder = os.path.join(output_dir, RUN_NAME)
    assert sorted(image_bytes(output_dir)) == [f"{k:05d}.png" for k in range(NUM_IMAGES)]
    assert os.path.isfile(os.path.join(folder, "grid.png"))
    with open(os.path.join(folder, "metrics.json")) as f:
        report = json.load(f)
    assert report["metrics"]["frechet_inception_distance"] > 0
    assert report["metrics"]["inception_score_mean"] >= 1.0
    assert report["settings"]["temp"] == 4.5 and report["num_images"] == NUM_IMAGES


def test_rerun_skips_written_images(ckpt, reference_run):
    output_dir, _ = reference_run
    before = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(output_dir, RUN_NAME, "images", "*"))}
    result = generate(["--ckpt", ckpt, "--batch_size", "2", "--output_dir", output_dir])
    assert "0 to generate" in result.stdout
    assert {f: os.path.getmtime(f) for f in before} == before


def test_same_files_for_other_batch_size_and_two_processes(ckpt, reference_run, tmp_path):
    expected = image_bytes(reference_run[0])
    generate(["--ckpt", ckpt, "--batch_size", "3", "--output_dir", str(tmp_path / "batch3")])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    generate(["--ckpt", ckpt, "--batch_size", "2", "--output_dir", str(tmp_path / "ranks2")], launcher=torchrun)
    assert image_bytes(tmp_path / "batch3") == expected
    assert image_bytes(tmp_path / "ranks2") == expected


def test_killed_run_resumes_to_the_same_files(ckpt, reference_run, tmp_path):
    args = ["--ckpt", ckpt, "--batch_size", "1", "--output_dir", str(tmp_path)]
    pattern = os.path.join(tmp_path, RUN_NAME, "images", "*.png")
    written = kill_when_written("gen_img_uncond.py", [*COMMON, *args], pattern, 2)
    assert 2 <= written < NUM_IMAGES, f"{written} images when killed"
    generate(args)
    assert image_bytes(tmp_path) == image_bytes(reference_run[0])


def test_missing_inception_weights_fail_before_any_work(ckpt, tmp_path):
    result = generate(["--ckpt", ckpt, "--output_dir", str(tmp_path / "out"), "--eval_fid", "--fid_ref",
                       str(tmp_path), "--fid_weights", str(tmp_path / "inception.pth")], check=False)
    assert result.returncode == 1 and "--fid_weights" in result.stderr and "download" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_folder_of_other_weights_is_refused(reference_run):
    folder = os.path.join(reference_run[0], RUN_NAME)
    with open(os.path.join(folder, "settings.json")) as f:
        settings = json.load(f)
    prepare_folder(folder, dict(settings))  # same settings: fine
    with pytest.raises(UsageError, match="weights_sha256"):
        prepare_folder(folder, dict(settings, weights_sha256="0" * 16))


def parse(*argv):
    return get_args_parser().parse_args([*COMMON, *argv])


def test_missing_or_mismatched_checkpoint_names_the_problem(ckpt, tmp_path):
    args = parse("--ckpt", str(tmp_path / "missing.pth"))
    args.device = torch.device("cpu")
    with pytest.raises(CheckpointError, match="missing.pth' does not exist"):
        build_model(args)
    state = torch.load(ckpt, weights_only=True)["model"]
    state["token_emb.word_embeddings.weight"] = state["token_emb.word_embeddings.weight"][:, :32]
    del state["decoder_norm.weight"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    args.ckpt = str(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder_norm.weight.*shape mismatch: "
                                              r"token_emb.word_embeddings.weight"):
        build_model(args)


def test_mage_c_head_is_ignored_with_a_message(ckpt, tmp_path, caplog):
    state = torch.load(ckpt, weights_only=True)["model"]
    state["contrastive_head.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "mage_c.pth"
    torch.save({"model": state}, path)
    args = parse("--ckpt", str(path))
    args.device = torch.device("cpu")
    model = build_model(args)
    assert "contrastive_head.0.weight" in caplog.text
    assert torch.equal(model.decoder_norm.weight, state["decoder_norm.weight"])


def test_random_weights_need_an_explicit_flag():
    with pytest.raises(UsageError, match="--random_init"):
        check_args(parse())
    check_args(parse("--random_init"))
    with pytest.raises(UsageError, match="--fid_ref"):
        check_args(parse("--random_init", "--eval_fid"))
    assert isinstance(parse("--random_init"), argparse.Namespace)
