"""Pre-training pipeline: torchrun DDP, exact DDP/resume equivalence, atomic checkpoints, failure messages."""
import glob
import json
import os
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_pretrain
from conftest import write_image_folder
from train_support import (file_sha256 as sha256, max_abs_difference, model_state, parse, pretrain_args, run_script, run_torchrun)
from util.checkpoint import CheckpointError, load_checkpoint
from util.errors import TrainingError, UsageError
from util.seeding import seed_everything


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 shape classes, 8 training images each, 64 pixels (cropped/resized to 32)."""
    return write_image_folder(tmp_path_factory.mktemp("shapes"), splits=(("train", 8),))


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_torchrun_two_processes_trains_and_writes_checkpoints_and_events(tmp_path, shapes, tokenizer_config):
    out = tmp_path / "out"
    argv = pretrain_args(shapes, out, tokenizer_config, "--batch_size", 4, "--epochs", 2, "--blr", 0.03,
                         "--warmup_epochs", 0, "--save_every", 1, "--vis_every", 1, "--vis_num", 4)
    argv[argv.index("--log_dir") + 1] = str(out)
    result = run_torchrun("main_pretrain.py", argv)
    assert "distributed init (rank 0/2, gloo)" in result.stdout

    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"):
        checkpoint = load_checkpoint(out / name)
        assert set(checkpoint) == {"model", "optimizer", "scaler", "epoch", "args", "log_stats"}
    last = load_checkpoint(out / "checkpoint-last.pth")
    assert last["epoch"] == 1 and last["args"].world_size == 2
    assert not glob.glob(str(out / "*.tmp"))

    losses = [entry["train_loss"] for entry in read_log(out)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.05, losses  # token statistics are learnable

    events = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"train_loss", "lr", "grad_norm", "mask_ratio"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train_loss")) == 8  # 32 images / (2 x 4) per step, 2 epochs
    grids = events.Images(events.Tags()["images"][0])
    # rows: inputs | reconstruction | masked-token prediction | samples, 4 images each, 2-pixel padding
    assert len(grids) == 2 and grids[-1].width == 4 * 32 + 5 * 2 and grids[-1].height == 4 * 32 + 5 * 2


@pytest.mark.slow
def test_ddp_step_equals_single_process_with_double_batch(tmp_path, tokenizer_config):
    """One step on 2 processes x 4 images == one step on 1 process x 8 images (same data, crops and masks; mask
    ratio groups of 3 global rows, so each process's rows span three groups, the last partial)."""
    data = write_image_folder(tmp_path / "data", splits=(("train", 2),))
    common = ("--epochs", 1, "--warmup_epochs", 0, "--lr", 1e-4, "--dropout", 0.0, "--mask_ratio_group", 3)
    run_torchrun("main_pretrain.py", pretrain_args(data, tmp_path / "ddp", tokenizer_config,
                                                   "--batch_size", 4, *common))
    main_pretrain.main(parse(main_pretrain, pretrain_args(data, tmp_path / "single", tokenizer_config,
                                                          "--batch_size", 8, *common)))

    single = load_checkpoint(tmp_path / "single" / "checkpoint-last.pth")
    distributed = load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pth")
    seed_everything(0)  # the initial weights of both runs
    start = main_pretrain.build_model(parse(main_pretrain, pretrain_args(data, tmp_path, tokenizer_config)))
    assert max_abs_difference(single["model"], start.state_dict()) > 5e-5  # the step did move the weights
    assert max_abs_difference(single["model"], distributed["model"]) < 1e-5
    moments_single = [s["exp_avg"] for _, s in sorted(single["optimizer"]["state"].items())]
    moments_ddp = [s["exp_avg"] for _, s in sorted(distributed["optimizer"]["state"].items())]
    assert max((a - b).abs().max().item() for a, b in zip(moments_single, moments_ddp)) < 1e-6  # = 0.1 * grad


def test_tensorboard_events_go_to_the_output_dir(tmp_path, shapes, tokenizer_config, monkeypatch):
    """Without --log_dir the events land in --output_dir (as in the reference), not in ./output_dir."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8, "--epochs", 1, "--vis_every", 0)
    del argv[argv.index("--log_dir"):argv.index("--log_dir") + 2]
    main_pretrain.main(parse(main_pretrain, argv))
    events = glob.glob(str(out / "events.out.tfevents.*"))
    assert len(events) == 1 and not (tmp_path / "output_dir").exists()
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    assert len(accumulator.Scalars("train_loss")) == 4  # 32 images / 8 per step


@pytest.mark.slow
def test_resume_and_auto_resume_continue_exactly(tmp_path, shapes, tokenizer_config):
    """2 epochs straight == epoch 0, a restart from its checkpoint, then epoch 1 (dropout and crops included)."""
    common = ("--batch_size", 8, "--epochs", 2, "--warmup_epochs", 1, "--blr", 0.03, "--save_every", 1)
    straight_result = main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, tmp_path / "straight",
                                                                            tokenizer_config, *common)))
    straight = model_state(tmp_path / "straight" / "checkpoint-last.pth")

    # a crash after epoch 0 leaves exactly checkpoint-0 behind; --resume a file
    resumed = run_script("main_pretrain.py", pretrain_args(
        shapes, tmp_path / "resumed", tokenizer_config, *common,
        "--resume", tmp_path / "straight" / "checkpoint-0.pth"))
    assert "continuing at epoch 1" in resumed.stdout
    assert max_abs_difference(straight, model_state(tmp_path / "resumed" / "checkpoint-last.pth")) == 0

    # re-running the same command with --auto_resume picks up output_dir/checkpoint-last.pth
    os.makedirs(tmp_path / "auto")
    shutil.copy(tmp_path / "straight" / "checkpoint-0.pth", tmp_path / "auto" / "checkpoint-last.pth")
    with open(tmp_path / "auto" / "log.txt", "w") as f:  # what the crashed process logged
        f.write(json.dumps(read_log(tmp_path / "straight")[0]) + "\n")
    auto_result = main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, tmp_path / "auto", tokenizer_config,
                                                                        *common, "--auto_resume")))
    auto = load_checkpoint(tmp_path / "auto" / "checkpoint-last.pth")
    assert auto["epoch"] == 1 and [e["epoch"] for e in read_log(tmp_path / "auto")] == [0, 1]
    assert os.path.isfile(tmp_path / "auto" / "checkpoint-0.pth")  # the resume wrote the missing milestone
    assert max_abs_difference(straight, auto["model"]) == 0
    # the result covers the whole run, the crashed process's epoch included
    assert [e["epoch"] for e in straight_result["history"]] == [0, 1]
    assert auto_result["history"] == straight_result["history"] == read_log(tmp_path / "straight")
    assert auto_result["final_loss"] == straight_result["history"][-1]["train_loss"]
    assert auto_result["checkpoint"] == str(tmp_path / "auto" / "checkpoint-last.pth")
    assert auto_result["steps_per_epoch"] == 4  # 32 images / batch 8


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, shapes, tokenizer_config, monkeypatch):
    out = tmp_path / "out"
    argv = pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8, "--epochs", 2, "--save_every", 0)
    real_replace = os.replace
    calls = []

    def replace_failing_after_first_save(src, dst):
        calls.append(dst)
        if len(calls) > 1:  # the file of epoch 1 is written and fsynced, then the process "dies"
            raise OSError("simulated crash between write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_after_first_save)
    with pytest.raises(OSError, match="simulated crash"):
        main_pretrain.main(parse(main_pretrain, argv))
    monkeypatch.undo()

    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 0
    assert sorted(os.listdir(out)) == ["checkpoint-last.pth", "log.txt"]  # no temporary file left behind


def test_non_finite_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path, shapes, tokenizer_config):
    out = tmp_path / "out"
    main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8,
                                                          "--epochs", 1)))
    before = sha256(out / "checkpoint-last.pth")
    argv = pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8, "--epochs", 2, "--resume", out,
                         "--lr", 1e30, "--warmup_epochs", 0)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch 1, step \d+"):
        main_pretrain.main(parse(main_pretrain, argv))
    assert sha256(out / "checkpoint-last.pth") == before


def test_bad_image_is_named_or_skipped(tmp_path, tokenizer_config, caplog):
    data = write_image_folder(tmp_path / "data", splits=(("train", 2),))
    bad = os.path.join(data, "train", "class_1_rectangle", "0001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    argv = pretrain_args(data, tmp_path / "out", tokenizer_config, "--batch_size", 4, "--epochs", 1)
    with pytest.raises(TrainingError, match=f"cannot read image '{bad}'"):
        main_pretrain.main(parse(main_pretrain, argv))
    assert not os.path.exists(tmp_path / "out" / "checkpoint-last.pth")

    main_pretrain.main(parse(main_pretrain, argv + ["--skip_bad_images"]))
    assert load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")["epoch"] == 0
    assert bad in caplog.text


@pytest.mark.slow
def test_impossible_flags_are_a_usage_error_of_the_script(tmp_path, shapes, tokenizer_config):
    out = tmp_path / "out"
    result = run_script("main_pretrain.py", pretrain_args(shapes, out, tokenizer_config, "--mask_ratio_min", 0.9,
                                                          "--mask_ratio_max", 0.6), check=False)
    assert result.returncode == 2
    assert "error: need 0 < --mask_ratio_min <= --mask_ratio_max <= 1, got 0.9 and 0.6" in result.stderr
    assert not out.exists()


def test_impossible_flags_fail_before_any_work(tmp_path, shapes, tokenizer_config):
    out = tmp_path / "out"
    with_empty_class = shutil.copytree(shapes, tmp_path / "with_empty_class")
    os.makedirs(with_empty_class / "train" / "class_9_empty")
    (tmp_path / "a_file").write_text("x")
    cases = [(("--mask_ratio_min", 0.9, "--mask_ratio_max", 0.6), "need 0 < --mask_ratio_min"),
             (("--mask_ratio_group", 0), "--mask_ratio_group must be at least 1, got 0"),
             (("--data_path", tmp_path / "nowhere"), "has no 'train' folder"),
             (("--input_size", 64), "--input_size 64 does not fit the tokenizer"),
             (("--batch_size", 1000), "smaller than one batch"),
             (("--data_path", with_empty_class), "the class folders 'class_9_empty' hold no images"),
             (("--output_dir", tmp_path / "a_file"), "--output_dir '.*a_file' is a file, not a folder")]
    for flags, message in cases:
        with pytest.raises(UsageError, match=message) as error:
            main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, out, tokenizer_config, *flags)))
        assert "\n" not in str(error.value)
        assert not out.exists()  # nothing written, not even an empty folder


def test_resume_from_checkpoint_of_another_model_names_the_keys(tmp_path, shapes, tokenizer_config):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(3)}, "epoch": 0}, bad)
    argv = pretrain_args(shapes, tmp_path / "out", tokenizer_config, "--epochs", 1, "--batch_size", 8,
                         "--resume", bad)
    with pytest.raises(CheckpointError, match=r"missing keys: .*blocks\.0\.attn\.proj\.bias.*shape mismatch: "
                                        r"blocks\.0\.norm1\.weight"):
        main_pretrain.main(parse(main_pretrain, argv))


@pytest.mark.slow
def test_pretraining_without_tokenizer_weights_is_an_error_naming_the_flag_and_the_file(tmp_path, shapes,
                                                                                         tokenizer_config):
    out = tmp_path / "out"
    result = run_script("main_pretrain.py", pretrain_args(shapes, out, tokenizer_config, "--no-random_tokenizer"),
                        check=False)
    assert result.returncode == 2
    assert "error: no tokenizer weights: pass --vqgan_ckpt with the released vqgan_jax_strongaug.ckpt" in result.stderr
    assert "--random_tokenizer" in result.stderr
    assert not out.exists()  # nothing written, not even the output folder


def test_tokenizer_weights_come_from_a_file_a_loaded_checkpoint_or_an_explicit_random_tokenizer(
        tmp_path, shapes, tokenizer_config):
    """--vqgan_ckpt, or a --resume / --auto_resume / --finetune checkpoint holding vqgan.*; a random tokenizer only
    with --random_tokenizer; anything else is refused before any work."""
    def argv(out, *flags):  # without --random_tokenizer
        return pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8, "--no-random_tokenizer", *flags)

    first = tmp_path / "first"
    with pytest.raises(UsageError, match="no tokenizer weights: pass --vqgan_ckpt .*vqgan_jax_strongaug.ckpt"):
        main_pretrain.main(parse(main_pretrain, argv(first, "--epochs", 1)))
    assert not first.exists()
    main_pretrain.main(parse(main_pretrain, argv(first, "--epochs", 1, "--random_tokenizer")))
    trained = model_state(first / "checkpoint-last.pth")
    tokenizer = {k: v for k, v in trained.items() if k.startswith("vqgan.")}

    # resuming takes the checkpoint's tokenizer: no --vqgan_ckpt needed
    result = main_pretrain.main(parse(main_pretrain, argv(first, "--epochs", 2, "--resume", first)))
    assert [e["epoch"] for e in result["history"]] == [0, 1]
    resumed = model_state(first / "checkpoint-last.pth")
    assert all(torch.equal(resumed[k], v) for k, v in tokenizer.items())
    main_pretrain.check_args(parse(main_pretrain, argv(first, "--epochs", 3, "--auto_resume")))

    # so does --finetune; a checkpoint without vqgan.* needs --vqgan_ckpt
    args = parse(main_pretrain, argv(tmp_path / "ft", "--finetune", first / "checkpoint-last.pth"))
    main_pretrain.check_args(args)
    model = main_pretrain.build_model(args)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tokenizer.items())
    bare = tmp_path / "no_tokenizer.pth"
    torch.save({"model": {k: v for k, v in trained.items() if not k.startswith("vqgan.")}}, bare)
    with pytest.raises(UsageError, match=f"no tokenizer weights \\({bare} holds no vqgan.\\* weights\\)"):
        main_pretrain.main(parse(main_pretrain, argv(tmp_path / "ft", "--finetune", bare)))
    assert not (tmp_path / "ft").exists()
    tokenizer_file = tmp_path / "tokenizer.ckpt"
    torch.save({"state_dict": {k.removeprefix("vqgan."): v for k, v in tokenizer.items()}}, tokenizer_file)
    args = parse(main_pretrain, argv(tmp_path / "ft", "--finetune", bare, "--vqgan_ckpt", tokenizer_file))
    main_pretrain.check_args(args)
    model = main_pretrain.build_model(args)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tokenizer.items())


def _distance_correlation(a, b):
    """Pearson correlation between the pairwise distances of the rows of a and those of b."""
    off_diagonal = ~torch.eye(len(a), dtype=torch.bool)
    da, db = torch.cdist(a, a)[off_diagonal], torch.cdist(b, b)[off_diagonal]
    return torch.corrcoef(torch.stack([da, db]))[0, 1].item()


@pytest.mark.parametrize("init", ["random", "codebook"])
def test_code_embeddings_start_from_the_codebook_only_when_asked(tmp_path, shapes, tokenizer_config, init):
    """--code_emb_init codebook: codes close in the tokenizer start close in MAGE (their pairwise distances are
    correlated); with the default (the reference) they are unrelated. Class rows are untouched."""
    args = parse(main_pretrain, pretrain_args(shapes, tmp_path, tokenizer_config, "--code_emb_init", init))
    seed_everything(args.seed)
    model = main_pretrain.build_model(args)
    codes = model.vqgan.quantize.embedding.weight.detach().float()
    rows = model.token_emb.word_embeddings.weight.detach()
    correlation = _distance_correlation(codes, rows[:model.codebook_size])
    if init == "codebook":
        assert correlation > 0.5  # a square Gaussian projection (64 -> 64 here) distorts; 16 -> 128 (demo) far less
        assert rows[:model.codebook_size].std().item() == pytest.approx(0.02, rel=1e-3)
    else:
        assert abs(correlation) < 0.1
    seed_everything(args.seed)
    reference = main_pretrain.build_model(parse(main_pretrain, pretrain_args(shapes, tmp_path, tokenizer_config)))
    assert torch.equal(rows[model.codebook_size:], reference.token_emb.word_embeddings.weight[model.codebook_size:])
