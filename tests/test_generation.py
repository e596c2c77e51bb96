"""gen_img_uncond.py end to end on CPU: same files for any number of processes (same batch size and threads),
resume after a kill, checkpoint errors before any work, FID evaluation written to metrics.json."""
import argparse
import glob
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img_uncond
from conftest import REPO_ROOT, draw_shape_image
from gen_img_uncond import build_model, check_args, get_args_parser
from train_support import kill_when_written
from models_mage import mage_vit_tiny_patch16
from train_support import run_script, run_torchrun, script_env
from util.checkpoint import CheckpointError
from util.errors import UsageError
from util.fid import PIXEL_STATS, FidWeightsError, compute_metrics
from util.generation import prepare_folder
from util.sampling import decode_tokens, image_generators, iterative_decode

NUM_IMAGES = 8
COMMON = ["--model", "mage_vit_tiny_patch16", "--num_images", str(NUM_IMAGES), "--num_iter", "3",
          "--device", "cpu", "--amp", "none"]
RUN_NAME = "mage_tiny_temp4.5_iter3_seed0_none"

# One torch thread, as in the torchrun and subprocess runs (OMP_NUM_THREADS=1): the files are compared byte
# for byte across them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mage_tiny.pth"
    torch.save({"model": mage_vit_tiny_patch16().state_dict()}, path)
    return str(path)


def parse(*argv):
    return get_args_parser().parse_args([*COMMON, *map(str, argv)])


def generate(*argv):
    """gen_img_uncond.py in this process (one process, like `python gen_img_uncond.py COMMON argv`)."""
    gen_img_uncond.main(parse(*argv))


def image_bytes(output_dir):
    folder = os.path.join(output_dir, RUN_NAME, "images")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def reference_run(ckpt, tmp_path_factory):
    """(output dir, reference folder): one process, batch 2, evaluated with the offline feature extractor
    against a folder of shapes (varied enough for an inception score above 1, unlike the samples)."""
    root = tmp_path_factory.mktemp("gen")
    references = root / "refs"
    os.makedirs(references)
    rng = random.Random(0)
    for k in range(20):
        draw_shape_image(("ellipse", "rectangle")[k % 2], 64, rng).save(references / f"{k:05d}.png")
    output_dir = str(root / "single")
    generate("--ckpt", ckpt, "--batch_size", 2, "--output_dir", output_dir, "--eval_fid", "--fid_ref", references,
             "--fid_feature_extractor", PIXEL_STATS)
    return output_dir, str(references)


def test_layout_grid_and_metrics(reference_run):
    output_dir, references = reference_run
    folder = os.path.join(output_dir, RUN_NAME)
    assert sorted(image_bytes(output_dir)) == [f"{k:05d}.png" for k in range(NUM_IMAGES)]
    assert os.path.isfile(os.path.join(folder, "grid.png"))
    with open(os.path.join(folder, "metrics.json")) as f:
        report = json.load(f)
    assert report["settings"]["temp"] == 4.5 and report["num_images"] == NUM_IMAGES
    # the metrics are those of the written images against --fid_ref
    expected = compute_metrics(os.path.join(folder, "images"), references, feature_extractor=PIXEL_STATS)
    for name in ("frechet_inception_distance", "inception_score_mean"):
        assert report["metrics"][name] == pytest.approx(expected[name], rel=1e-5), name


def test_pngs_hold_the_decoded_images_truncated_like_the_reference(ckpt, reference_run):
    """Each PNG is np.clip(x * 255, 0, 255).astype(np.uint8) of the decoded float32 image, as the reference saves
    its samples (FID is compared against its numbers): truncated, not rounded."""
    args = parse("--ckpt", ckpt, "--batch_size", 2)
    args.device = torch.device("cpu")
    model = build_model(args)
    indices = [0, 1]  # the first batch of the reference run
    start = torch.full((len(indices), model.seq_len), model.mask_token_label, dtype=torch.long)
    ids = iterative_decode(model, start, num_iter=3, temperature=4.5,
                           generator=image_generators(0, indices, args.device))
    decoded = decode_tokens(model, ids).numpy().transpose(0, 2, 3, 1)
    truncated = np.clip(decoded * 255, 0, 255).astype(np.uint8)
    saved = np.stack([np.array(Image.open(os.path.join(reference_run[0], RUN_NAME, "images", f"{k:05d}.png")))
                      for k in indices])
    assert (np.round(decoded * 255).astype(np.uint8) != truncated).mean() > 0.1  # rounding would not pass
    np.testing.assert_array_equal(saved, truncated)


def test_rerun_skips_written_images(ckpt, reference_run, capsys):
    output_dir, _ = reference_run
    before = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(output_dir, RUN_NAME, "images", "*"))}
    generate("--ckpt", ckpt, "--batch_size", 2, "--output_dir", output_dir)
    assert "0 to generate" in capsys.readouterr().out
    assert {f: os.path.getmtime(f) for f in before} == before


@pytest.mark.slow
def test_same_files_for_two_processes(ckpt, reference_run, tmp_path):
    run_torchrun("gen_img_uncond.py", [*COMMON, "--ckpt", ckpt, "--batch_size", 2, "--output_dir", tmp_path])
    assert image_bytes(tmp_path) == image_bytes(reference_run[0])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(ckpt, reference_run, tmp_path):
    args = ["--ckpt", ckpt, "--batch_size", "2", "--output_dir", str(tmp_path)]  # the reference run's batch size
    pattern = os.path.join(tmp_path, RUN_NAME, "images", "*.png")
    written = kill_when_written("gen_img_uncond.py", [*COMMON, *args], pattern, 2)
    assert 2 <= written < NUM_IMAGES, f"{written} images when killed"
    generate(*args)
    assert image_bytes(tmp_path) == image_bytes(reference_run[0])


def test_missing_inception_weights_fail_before_any_work(ckpt, tmp_path):
    with pytest.raises(FidWeightsError, match="--fid_weights .*download"):
        generate("--ckpt", ckpt, "--output_dir", tmp_path / "out", "--eval_fid", "--fid_ref", tmp_path,
                 "--fid_weights", tmp_path / "inception.pth")
    assert not os.path.exists(tmp_path / "out")


def test_wrong_inception_weights_fail_before_any_png(ckpt, reference_run, tmp_path):
    """A file that loads but is not torch-fidelity's InceptionV3 stops the run up front, in one line."""
    torch.save({"a": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(FidWeightsError, match=r"keys missing .*1 unexpected") as error:
        generate("--ckpt", ckpt, "--output_dir", tmp_path / "out", "--eval_fid", "--fid_ref", reference_run[1],
                 "--fid_weights", tmp_path / "w.pth")
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_inception_path_runs_offline_with_a_local_weights_file(ckpt, reference_run, random_inception_weights,
                                                                tmp_path, capsys):
    """--fid_weights FILE with torch-fidelity's real Inception architecture (random weights here): the check up
    front passes and the evaluation writes metrics.json, without any network."""
    output_dir = tmp_path / "copy"
    shutil.copytree(reference_run[0], output_dir)
    generate("--ckpt", ckpt, "--batch_size", 2, "--output_dir", output_dir, "--eval_fid",
             "--fid_ref", reference_run[1], "--fid_weights", random_inception_weights)
    assert "0 to generate" in capsys.readouterr().out
    with open(output_dir / RUN_NAME / "metrics.json") as f:
        report = json.load(f)
    assert report["feature_extractor"] == "inception-v3-compat"
    assert math.isfinite(report["metrics"]["frechet_inception_distance"])


def test_folder_of_other_weights_is_refused(reference_run):
    folder = os.path.join(reference_run[0], RUN_NAME)
    with open(os.path.join(folder, "settings.json")) as f:
        settings = json.load(f)
    prepare_folder(folder, dict(settings))  # same settings: fine
    with pytest.raises(UsageError, match="weights_sha256"):
        prepare_folder(folder, dict(settings, weights_sha256="0" * 16))


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


@pytest.mark.parametrize("flags, message", [
    (("--temp", "-1"), r"--temp must be >= 0 \(0 picks the most likely tokens\), got -1.0"),
    (("--temp", "nan"), "--temp must be >= 0"),
    (("--num_iter", "0"), "--num_iter must be >= 1, got 0"),
    (("--batch_size", "0"), "--batch_size must be >= 1, got 0"),
])
def test_impossible_sampling_flags_are_refused(flags, message):
    with pytest.raises(UsageError, match=message):
        check_args(parse("--random_init", *flags))


def test_rerun_regenerates_damaged_images(ckpt, reference_run, tmp_path, capsys):
    """A rerun checks every file's header and end: a truncated PNG and a PNG of the wrong size are made again."""
    expected = image_bytes(reference_run[0])
    output_dir = tmp_path / "copy"
    shutil.copytree(reference_run[0], output_dir)
    images = output_dir / RUN_NAME / "images"
    (images / "00002.png").write_bytes(expected["00002.png"][:len(expected["00002.png"]) // 2])
    Image.new("RGB", (16, 16)).save(images / "00005.png")
    os.remove(output_dir / RUN_NAME / "grid.png")
    generate("--ckpt", ckpt, "--batch_size", 2, "--output_dir", output_dir)
    assert "2 damaged images will be generated again: 00002.png, 00005.png" in capsys.readouterr().out
    assert image_bytes(output_dir) == expected
    assert os.path.isfile(output_dir / RUN_NAME / "grid.png")


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused(ckpt, reference_run, tmp_path):
    argv = [*COMMON, "--ckpt", ckpt, "--batch_size", "2", "--output_dir", str(tmp_path)]
    first = subprocess.Popen([sys.executable, "gen_img_uncond.py", *argv], cwd=REPO_ROOT, env=script_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(tmp_path, RUN_NAME, ".lock")
    deadline = time.time() + 240
    while not (os.path.isfile(lock) and f"pid {first.pid} " in open(lock).read()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold the first run while it owns the folder
    try:
        second = run_script("gen_img_uncond.py", argv, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid} on " in second.stderr.splitlines()[-1]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert image_bytes(tmp_path) == image_bytes(reference_run[0])
