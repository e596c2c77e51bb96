"""gen_img_cond.py end to end on CPU: per-class folders, the same files for a class subset or any number of
processes (same per-process batch size and thread count), resume after a kill, wrong Inception weights refused
before any work, and --eval_classifier agreeing with main_finetune.py --eval."""
import glob
import json
import os

import pytest
import torch

import main_finetune
import models_vit
from gen_img_cond import check_args, get_args_parser
from models_mage import mage_vit_tiny_patch16
from train_support import kill_when_written, run_script, run_torchrun
from util.checkpoint import args_for_checkpoint, load_checkpoint
from util.errors import UsageError
from util.checkpoint import CheckpointError

NUM_CLASSES, PER_CLASS = 3, 2
COMMON = ["--model", "mage_vit_tiny_patch16", "--num_images_per_class", str(PER_CLASS), "--num_iter", "3",
          "--cfg", "2", "--cfg_schedule", "linear", "--device", "cpu", "--amp", "none"]
RUN_NAME = "mage_tiny_cond_cfg2-linear_temp4.5_iter3_seed0_none"
FILES = [f"{c:04d}/{k:05d}.png" for c in range(NUM_CLASSES) for k in range(PER_CLASS)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mage_tiny_cond.pth"
    torch.save({"model": mage_vit_tiny_patch16(class_cond=True, num_classes=NUM_CLASSES).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A main_finetune.py checkpoint (weights + its args) of a tiny classifier whose predictions vary."""
    argv = ["--model", "vit_tiny_patch16", "--nb_classes", str(NUM_CLASSES), "--amp", "none", "--device", "cpu"]
    args = main_finetune.get_args_parser().parse_args(argv)
    torch.manual_seed(1)
    model = models_vit.vit_tiny_patch16(num_classes=NUM_CLASSES, global_pool=True)
    with torch.no_grad():
        model.head.weight.normal_(std=3.0)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pth"
    torch.save({"model": model.state_dict(), "args": args_for_checkpoint(args), "epoch": 0}, path)
    return str(path)


def generate(args, processes=1, check=True):
    """gen_img_cond.py in fresh processes with one thread each (alone, or under torchrun)."""
    if processes == 1:
        return run_script("gen_img_cond.py", [*COMMON, *args], timeout=300, check=check)
    return run_torchrun("gen_img_cond.py", [*COMMON, *args], nproc=processes, timeout=300, check=check)


def image_bytes(output_dir):
    folder = os.path.join(output_dir, RUN_NAME, "images")
    paths = sorted(glob.glob(os.path.join(folder, "*", "*.png")))
    return {os.path.relpath(p, folder): open(p, "rb").read() for p in paths}


@pytest.fixture(scope="module")
def reference_run(ckpt, classifier, tmp_path_factory):
    """One process, batch 2, every class, labelled by the classifier."""
    output_dir = str(tmp_path_factory.mktemp("gen") / "single")
    generate(["--ckpt", ckpt, "--batch_size", "2", "--output_dir", output_dir, "--eval_classifier", classifier])
    return output_dir


@pytest.mark.slow
def test_layout_grid_and_classifier_metrics(reference_run):
    assert sorted(image_bytes(reference_run)) == FILES
    folder = os.path.join(reference_run, RUN_NAME)
    assert os.path.isfile(os.path.join(folder, "grid.png"))
    with open(os.path.join(folder, "metrics.json")) as f:
        report = json.load(f)
    classifier = report["classifier"]
    assert sorted(classifier["per_class_pct"]) == ["0", "1", "2"] and classifier["num_images"] == 6
    assert report["settings"]["cfg"] == 2.0 and report["settings"]["cfg_schedule"] == "linear"
    per_class = list(classifier["per_class_pct"].values())
    assert abs(classifier["accuracy_pct"] - sum(per_class) / 3) < 1e-6  # equal counts per class
    assert classifier["min_class_accuracy_pct"] == min(per_class)


@pytest.mark.slow
def test_same_files_for_a_class_subset_and_two_processes(ckpt, reference_run, tmp_path):
    """Batch 2 = PER_CLASS everywhere, so each batch holds the same images (of one class) in every run: the same
    bytes by construction. Another batch size may change some images (other matmul blocking): not compared."""
    expected = image_bytes(reference_run)
    generate(["--ckpt", ckpt, "--batch_size", "2", "--class_ids", "2", "0", "--output_dir", str(tmp_path / "subset")])
    generate(["--ckpt", ckpt, "--batch_size", "2", "--output_dir", str(tmp_path / "ranks2")], processes=2)
    assert image_bytes(tmp_path / "ranks2") == expected
    assert image_bytes(tmp_path / "subset") == {k: v for k, v in expected.items() if not k.startswith("0001/")}
    assert len(set(expected.values())) == len(expected)  # every image differs


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(ckpt, reference_run, tmp_path):
    args = ["--ckpt", ckpt, "--batch_size", "2", "--output_dir", str(tmp_path)]  # the reference run's batch size
    pattern = os.path.join(tmp_path, RUN_NAME, "images", "*", "*.png")
    written = kill_when_written("gen_img_cond.py", [*COMMON, *args], pattern, 2)
    assert 2 <= written < len(FILES), f"{written} images when killed"
    result = generate(args)
    assert f"{len(FILES) - written} to generate" in result.stdout or written == len(FILES)
    assert image_bytes(tmp_path) == image_bytes(reference_run)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.slow
def test_classifier_accuracy_matches_main_finetune_eval(reference_run, classifier, tmp_path):
    with open(os.path.join(reference_run, RUN_NAME, "metrics.json")) as f:
        reported = json.load(f)["classifier"]
    os.makedirs(tmp_path / "data")
    os.symlink(os.path.join(reference_run, RUN_NAME, "images"), tmp_path / "data" / "val")  # class folders in order
    argv = ["--eval", "--resume", classifier, "--model", "vit_tiny_patch16", "--nb_classes", str(NUM_CLASSES),
            "--data_path", str(tmp_path / "data"), "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--amp", "none", "--output_dir", "", "--log_dir", ""]
    stats = main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    assert abs(stats["acc1"] - reported["accuracy_pct"]) < 1e-4
    assert 0 < reported["accuracy_pct"] < 100  # the classifier is not constant on these samples


def test_flags_are_checked_before_any_work(ckpt, tmp_path):
    def parse(*argv):
        return get_args_parser().parse_args([*COMMON, *argv])

    with pytest.raises(UsageError, match="--random_init"):
        check_args(parse())
    with pytest.raises(UsageError, match="lists a class twice"):
        check_args(parse("--ckpt", ckpt, "--class_ids", "1", "1"))
    with pytest.raises(UsageError, match="--eval_classifier"):
        check_args(parse("--ckpt", ckpt, "--eval_classifier", str(tmp_path / "missing.pth")))
    with pytest.raises(CheckpointError, match="not a main_finetune.py checkpoint"):
        models_vit.load_finetuned_classifier(ckpt)


@pytest.mark.slow
def test_classes_and_checkpoints_the_model_cannot_serve_stop_the_script_before_any_work(ckpt, tmp_path):
    result = generate(["--ckpt", ckpt, "--class_ids", "5", "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2 and "--class_ids [5] outside the model's 3 classes" in result.stderr
    unconditional = tmp_path / "uncond.pth"
    torch.save({"model": mage_vit_tiny_patch16().state_dict()}, unconditional)
    result = generate(["--ckpt", str(unconditional), "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 1 and "is an unconditional MAGE" in result.stderr and "--finetune" in result.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_wrong_inception_weights_fail_before_any_png(ckpt, tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "w.pth")
    result = generate(["--ckpt", ckpt, "--output_dir", str(tmp_path / "out"), "--eval_fid", "--fid_ref",
                       str(tmp_path), "--fid_weights", str(tmp_path / "w.pth")], check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "keys missing" in errors[0] and "1 unexpected" in errors[0]
    assert not os.path.exists(tmp_path / "out")


def test_released_classifier_format_is_read_with_its_preset(classifier, tmp_path):
    state = load_checkpoint(classifier)["model"]
    torch.save({"model": state}, tmp_path / "released.pth")  # the released fine-tuned ViTs hold only weights
    with pytest.raises(CheckpointError, match="name its preset"):
        models_vit.load_finetuned_classifier(str(tmp_path / "released.pth"))
    model, args = models_vit.load_finetuned_classifier(str(tmp_path / "released.pth"), "vit_tiny_patch16")
    assert (args.nb_classes, args.global_pool, args.input_size, args.no_normalize) == (NUM_CLASSES, True, 256, False)
    assert torch.equal(model.head.weight, state["head.weight"])
