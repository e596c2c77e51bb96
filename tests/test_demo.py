"""The built-in demo: `demo.py --quick` runs every stage, writes summary.json and the pictures, resumes after an
interruption and skips finished stages on a rerun."""
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import demo
from conftest import REPO_ROOT
from util import plots
from train_support import run_command

PICTURES = ("reconstructions.png", "samples.png", "samples_by_class.png", "inpainting.png", "loss_curves.png",
            "class_conditional.png", "guidance_sweep.png")
STAGE_NAMES = [stage.name for stage in demo.STAGES]


def demo_command(out, *extra):
    return [sys.executable, "demo.py", "--quick", "--device", "cpu", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(output dir, whether the first run was interrupted, the completing run, a rerun).

    The first run is killed as soon as pre-training has saved its first epoch; the second must continue it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    checkpoint = out / "pretrain" / "checkpoint-last.pth"
    with open(tmp_path_factory.getbasetemp() / "demo_first_run.log", "w") as log:
        first = subprocess.Popen(demo_command(out), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while first.poll() is None and not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.1)
        interrupted = first.poll() is None
        first.kill()
        first.wait()
    second = run_command(demo_command(out), timeout=900, env=dict(os.environ))  # the user's threads
    third = run_command(demo_command(out), timeout=600, env=dict(os.environ))
    return out, interrupted, second, third


@pytest.mark.slow
def test_every_stage_reports_its_numbers(runs):
    out, _, second, _ = runs
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == STAGE_NAMES
    for name, stage in summary["stages"].items():
        assert stage["result"], name
    assert 5.0 < summary["tokenizer_psnr_db"] < 60.0
    assert 0.0 < summary["tokenizer_codebook_usage_pct"] <= 100.0
    assert math.isfinite(summary["pretrain_final_loss"])
    assert summary["stages"]["pretrain"]["result"]["epochs"] == demo.PRESETS["quick"]["pretrain"]["epochs"]
    # the accuracies count right answers on the val split; main_linprobe's is the one its log ends with
    classes = json.loads((out / "data" / "dataset.json").read_text())["classes"]
    num_val = len(glob.glob(str(out / "data" / "val" / "*" / "*.png")))
    assert num_val == len(classes) * demo.PRESETS["quick"]["data"]["num_val"]
    for key in ("linprobe_acc", "raw_pixel_acc", "linprobe_lars_acc", "classifier_val_acc",
                "classifier_reconstruction_acc"):
        assert summary[key] * num_val / 100 == pytest.approx(round(summary[key] * num_val / 100), abs=1e-6), key
    reconstruction_per_class = summary["stages"]["classes"]["result"]["reconstruction_per_class_pct"]
    assert list(reconstruction_per_class) == classes
    assert summary["classifier_reconstruction_acc"] == \
        pytest.approx(sum(reconstruction_per_class.values()) / len(classes))
    probe_log = (out / "probe" / "linprobe" / "log.txt").read_text().splitlines()
    assert summary["linprobe_lars_acc"] == json.loads(probe_log[-1])["test_acc1"]
    # the histogram counts the generated samples per dataset class
    num_samples = len(glob.glob(str(out / "generate" / "*" / "images" / "*.png")))
    assert num_samples == demo.PRESETS["quick"]["generate"]["num_images"]
    histogram = summary["sample_class_histogram"]
    assert list(histogram) == classes
    counts = [fraction * num_samples for fraction in histogram.values()]
    assert counts == pytest.approx([round(count) for count in counts], abs=1e-6)
    # the stages' results come from the scripts' main(): the files they name, the whole pre-training run (its
    # first epoch ran in the interrupted process) and the probe's final accuracy, as their logs have them
    stages = {name: stage["result"] for name, stage in summary["stages"].items()}
    assert (out / stages["tokenizer"]["tokenizer"]).is_file() and (out / stages["pretrain"]["checkpoint"]).is_file()
    assert len(list((out / stages["generate"]["image_dir"]).glob("*.png"))) == stages["generate"]["num_images"]
    pretrain_log = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    assert stages["pretrain"]["first_epoch_loss"] == pretrain_log[0]["train_loss"]
    assert summary["pretrain_final_loss"] == pretrain_log[-1]["train_loss"]
    preset = demo.PRESETS["quick"]
    steps_per_epoch = 8 * preset["data"]["num_train"] // preset["pretrain"]["batch_size"]
    assert stages["pretrain"]["steps"] == preset["pretrain"]["epochs"] * steps_per_epoch
    # class-conditional samples: num_per_class of every class at every guidance scale of the sweep, and
    # accuracies that count them (equal counts per class: the overall accuracy is the mean of the classes')
    generate = preset["generate"]
    sweep = stages["classes"]["guidance_sweep"]
    assert list(sweep) == [f"{w:g}" for w in demo.guidance_scales(generate)] == \
        list(stages["generate"]["conditional_dirs"])
    for scale, image_dir in stages["generate"]["conditional_dirs"].items():
        class_dirs = sorted(os.listdir(out / image_dir))
        assert class_dirs == [f"{c:04d}" for c in range(len(classes))]
        assert all(len(os.listdir(out / image_dir / d)) == generate["num_per_class"] for d in class_dirs)
        per_class = sweep[scale]["per_class_pct"]
        assert list(per_class) == classes
        assert [p * generate["num_per_class"] / 100 for p in per_class.values()] == \
            pytest.approx([round(p * generate["num_per_class"] / 100) for p in per_class.values()], abs=1e-6)
        assert sweep[scale]["accuracy_pct"] == pytest.approx(sum(per_class.values()) / len(classes))
    assert summary["cfg"] == generate["cfg"]
    assert summary["class_conditional_per_class_pct"] == sweep[f"{generate['cfg']:g}"]["per_class_pct"]
    assert summary["class_conditional_accuracy_pct"] == sweep[f"{generate['cfg']:g}"]["accuracy_pct"]
    fid = summary["fid"]
    assert ("skipped" in fid and "Inception" in fid["skipped"]) or math.isfinite(fid["fid"])
    # the progress log names every stage, and the table ends the run
    for index, name in enumerate(STAGE_NAMES, 1):
        assert f"[{index}/{len(STAGE_NAMES)}] {name}" in second.stdout
    table = second.stdout[second.stdout.index("\nstage "):]
    assert all(f"\n{name} " in table for name in STAGE_NAMES) and "\ntotal " in table


@pytest.mark.slow
def test_pictures_are_written(runs):
    out = runs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["pictures"]) == sorted(f"pictures/{name}" for name in PICTURES)
    for name in PICTURES:
        with Image.open(out / "pictures" / name) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 64, name
            low, high = picture.convert("L").getextrema()
            assert high - low > 20, f"{name} is blank"


@pytest.mark.slow
def test_interrupted_run_continues_instead_of_starting_over(runs):
    _, interrupted, second, _ = runs
    assert interrupted, "the first run finished before it could be interrupted"
    log = second.stdout
    assert "data: make the dataset: done earlier, skipped" in log
    assert "tokenizer: train the VQGAN tokenizer: done earlier, skipped" in log
    assert "pre-train MAGE on the tokens (continuing an interrupted run)" in log
    assert "Resumed optimizer and scaler; continuing at epoch" in log
    assert "is complete; nothing to do" in log and not re.search(r"cached \d+ views of", log)  # cache reused


@pytest.mark.slow
def test_rerun_skips_every_stage_and_keeps_the_summary(runs):
    out, _, second, third = runs
    for index, stage in enumerate(demo.STAGES, 1):
        assert f"[{index}/{len(demo.STAGES)}] {stage.name}: {stage.title}: done earlier, skipped" in third.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert all(stage["skipped"] for stage in summary["stages"].values())
    assert "Epoch:" not in third.stdout


def test_changed_settings_redo_a_stage(tmp_path):
    args = demo.get_args_parser().parse_args(["--quick", "--device", "cpu", "--output_dir", str(tmp_path),
                                              "--stop_after", "data"])
    assert demo.run(demo.Context(args)) is None  # stopped after the data
    image = tmp_path / "data" / "train" / "0_disc" / "00000.png"
    before = image.read_bytes()
    again = demo.Context(args)
    demo.run(again)
    assert again.skipped == ["data"] and image.read_bytes() == before
    args.seed = 1
    changed = demo.Context(args)
    demo.run(changed)
    assert changed.skipped == [] and image.read_bytes() != before


def test_pretrain_epochs_overrides_only_the_pretraining_schedule(tmp_path):
    parse = demo.get_args_parser().parse_args
    plain = demo.Context(parse(["--quick", "--output_dir", str(tmp_path)]))
    longer = demo.Context(parse(["--quick", "--output_dir", str(tmp_path), "--pretrain_epochs", "7"]))
    assert longer.preset["pretrain"]["epochs"] == 7
    assert plain.preset["pretrain"]["epochs"] == demo.PRESETS["quick"]["pretrain"]["epochs"] != 7
    assert {k: v for k, v in longer.preset.items() if k != "pretrain"} == \
        {k: v for k, v in plain.preset.items() if k != "pretrain"}
    with pytest.raises(SystemExit, match="pretrain_epochs"):
        demo.Context(parse(["--quick", "--output_dir", str(tmp_path), "--pretrain_epochs", "-1"]))
    with pytest.raises(SystemExit, match="--contrastive_weight needs --contrastive"):
        demo.Context(parse(["--quick", "--output_dir", str(tmp_path), "--contrastive_weight", "0.5"]))


@pytest.mark.slow
def test_summary_table_points_to_more_pretraining_only_when_samples_collapse(runs, capsys):
    out = runs[0]
    summary = json.loads((out / "summary.json").read_text())
    for collapsed in (True, False):
        demo.print_table({**summary, "samples_collapsed": collapsed})
        printed = capsys.readouterr().out
        assert ("--pretrain_epochs N" in printed) == collapsed
        assert "disc" in printed and "total" in printed


def test_loss_curve_running_mean_is_trailing():
    assert plots.running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plots.running_mean([5.0, 1.0], 1) == [5.0, 1.0]


def test_fid_skip_message_names_the_file_it_looks_for(tmp_path, monkeypatch):
    """Following the hint (put NAME at the folder it names) makes the FID stage find the weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    ctx = demo.Context(demo.get_args_parser().parse_args(["--quick", "--output_dir", str(tmp_path / "out")]))
    reason = demo.stage_fid(ctx, str(tmp_path / "fid"))["skipped"]
    hint = re.search(r"no Inception weights at (\S+) .*put (\S+) there", reason)
    folder = os.path.dirname(hint.group(1))
    os.makedirs(folder)
    open(os.path.join(folder, hint.group(2)), "wb").close()
    assert demo.fid_weights(ctx) == os.path.join(folder, hint.group(2))


def test_unusable_fid_weights_stop_the_demo_before_any_stage(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(3)}}, tmp_path / "w.pth")
    args = demo.get_args_parser().parse_args(["--quick", "--output_dir", str(tmp_path / "out"),
                                              "--fid_weights", str(tmp_path / "w.pth")])
    with pytest.raises(SystemExit, match=r"demo: unusable Inception weights .*not a state dict"):
        demo.main(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_contrastive_demo_pretrains_mage_c_in_the_same_budget(tmp_path):
    """--contrastive: pre-training carries the MAGE-C head and logs its loss, on half the epochs (each step
    holds two views of every image) from a cache of SimCLR views."""
    parse = demo.get_args_parser().parse_args
    plain = demo.Context(parse(["--output_dir", str(tmp_path / "plain")]))
    args = parse(["--quick", "--device", "cpu", "--contrastive", "--output_dir", str(tmp_path / "out"),
                  "--stop_after", "pretrain"])
    ctx = demo.Context(args)
    assert demo.Context(parse(["--contrastive", "--output_dir", str(tmp_path)])).preset["pretrain"]["epochs"] == \
        round(plain.preset["pretrain"]["epochs"] * demo.CONTRASTIVE["epochs_factor"])
    assert demo.run(ctx) is None
    result = ctx.results["pretrain"]
    assert result["contrastive_weight"] == demo.CONTRASTIVE["contrastive_weight"]
    log = [json.loads(line) for line in (tmp_path / "out" / "pretrain" / "log.txt").read_text().splitlines()]
    assert result["final_contrastive_loss"] == log[-1]["train_contrastive_loss"]
    state = torch.load(tmp_path / "out" / result["checkpoint"], map_location="cpu", weights_only=True)["model"]
    assert any(key.startswith("contrastive_head.") for key in state)
    cache = json.loads((tmp_path / "out" / "pretrain" / "token_cache" / "meta.json").read_text())
    assert cache["views"] == "contrastive"
