"""Linear probe: frozen backbone, BatchNorm + linear head with LARS, K cached views == K uncached epochs."""
import json
import os

import numpy as np
import pytest
import torch

import main_linprobe
import util.feature_cache as feature_cache
from train_support import (data_fitted_tokenizer_checkpoint, parse, run_torchrun, write_texture_folder,
                           write_tokenizer_config)
from util.checkpoint import CheckpointError, load_checkpoint
from util.datasets import SeededImageFolder, eval_transform
from util.errors import UsageError
from util.lars import LARS


pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEAD_KEYS = ("head.1.weight", "head.1.bias", "head.0.running_mean", "head.0.running_var")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(texture data, tokenizer config, MAGE checkpoint whose codebook follows the data)."""
    root = tmp_path_factory.mktemp("linprobe")
    data = write_texture_folder(root / "data", splits=(("train", 24), ("val", 16)))
    config = write_tokenizer_config(str(root))
    train = SeededImageFolder(os.path.join(data, "train"), eval_transform(32))
    images = torch.stack([train[i][0] for i in range(len(train))])
    checkpoint = data_fitted_tokenizer_checkpoint(root / "mage.pth", config, images)
    return data, config, checkpoint


def probe_args(setup, output_dir, *extra):
    data, config, checkpoint = setup
    return ["--model", "vit_tiny_patch16", "--vqgan_config", config, "--input_size", "32", "--data_path", data,
            "--finetune", str(checkpoint), "--nb_classes", "4", "--global_pool", "--batch_size", "16",
            "--epochs", "15", "--warmup_epochs", "1", "--lr", "10", "--output_dir", str(output_dir),
            "--log_dir", "", "--amp", "none", "--num_workers", "0", "--device", "cpu", *map(str, extra)]


@pytest.mark.slow
def test_a_cache_of_one_view_per_epoch_trains_as_the_uncached_probe(tmp_path, setup):
    """View v is the crop that the uncached probe draws in epoch v, so K = --epochs views give its head."""
    uncached = main_linprobe.main(parse(main_linprobe, probe_args(setup, tmp_path / "plain")))
    cached = main_linprobe.main(parse(main_linprobe, probe_args(setup, tmp_path / "cached", "--cache_views", 15)))
    # the training features come from other batches (shuffled vs in order), so their low bits may differ:
    # at most one of the 64 validation images may change its prediction
    assert abs(uncached["acc1"] - cached["acc1"]) <= 100 / 64 + 1e-6
    assert cached["acc1"] >= 45.0  # 4 classes: chance is 25 %
    head_plain = load_checkpoint(tmp_path / "plain" / "checkpoint-last.pth")["model"]
    head_cached = load_checkpoint(tmp_path / "cached" / "checkpoint-last.pth")["model"]
    for key in HEAD_KEYS:
        torch.testing.assert_close(head_plain[key], head_cached[key], rtol=1e-4, atol=1e-5)
    # one view only (the old --cache_features) trains every epoch on the epoch-0 crops: another head
    main_linprobe.main(parse(main_linprobe, probe_args(setup, tmp_path / "one", "--cache_views", 1)))
    head_one = load_checkpoint(tmp_path / "one" / "checkpoint-last.pth")["model"]
    assert (head_one["head.1.weight"] - head_plain["head.1.weight"]).abs().max() > 1e-3


def test_cached_views_are_new_crops_taken_in_turn_and_reused_by_a_rerun(tmp_path, setup, capsys):
    out = tmp_path / "out"
    argv = probe_args(setup, out, "--cache_views", 2, "--epochs", 3)
    main_linprobe.main(parse(main_linprobe, argv))
    folder = out / feature_cache.FOLDER
    views = [np.load(feature_cache.view_path(folder, v)) for v in range(2)]
    assert views[0].shape == (96, feature_cache.read_meta(folder)["feature_dim"]) and views[0].dtype == np.float32
    labels = np.load(folder / feature_cache.LABELS_FILE)
    assert labels.tolist() == [k // 24 for k in range(96)]
    differs = np.abs(views[0] - views[1]).max(axis=1) > 1e-3
    assert differs[labels != 3].all()  # two crops of a textured image give two feature vectors (class 3 is flat)
    dataset = feature_cache.FeatureViews([feature_cache.view_path(folder, v) for v in range(2)], labels)
    for epoch, view in ((0, 0), (1, 1), (2, 0), (3, 1)):  # epoch e: view e mod K
        dataset.set_epoch(epoch)
        assert np.array_equal(dataset[5][0].numpy(), views[view][5])

    mtimes = [os.stat(feature_cache.view_path(folder, v)).st_mtime_ns for v in range(2)]
    capsys.readouterr()
    main_linprobe.main(parse(main_linprobe, argv + ["--overwrite"]))  # same settings: read back, not computed
    assert "2 stored, 0 to compute" in capsys.readouterr().out
    assert [os.stat(feature_cache.view_path(folder, v)).st_mtime_ns for v in range(2)] == mtimes

    main_linprobe.main(parse(main_linprobe, argv + ["--overwrite", "--seed", "1"]))  # other crops: recomputed
    assert "written with other settings (seed)" in capsys.readouterr().out
    assert not np.array_equal(np.load(feature_cache.view_path(folder, 0)), views[0])


@pytest.mark.parametrize("flags, message", [
    (("--cache_views", -1), "--cache_views must be 0"),
    (("--cache_views", 16), "more than --epochs 15"),
    (("--cache_views", 2, "--no-train_aug"), "one view per image"),
    (("--cache_features", "--cache_views", 3), "--cache_features is --cache_views 1"),
])
def test_impossible_cache_views_stop_before_anything_is_written(tmp_path, setup, flags, message):
    with pytest.raises(UsageError, match=message):
        main_linprobe.main(parse(main_linprobe, probe_args(setup, tmp_path / "out", *flags)))
    assert not (tmp_path / "out").exists()


def test_only_the_head_trains_and_eval_reproduces_accuracy(tmp_path, setup):
    out = tmp_path / "out"
    stats = main_linprobe.main(parse(main_linprobe, probe_args(setup, out, "--cache_features", "--epochs", 3)))
    trained = load_checkpoint(out / "checkpoint-last.pth")["model"]
    pretrained = load_checkpoint(setup[2])["model"]
    shared = [k for k in trained if k in pretrained and not k.startswith("head.") and k != "pos_embed"]
    assert len(shared) > 50  # tokenizer, token_emb, blocks (pos_embed is resized and unused)
    for key in shared:
        assert torch.equal(trained[key], pretrained[key]), key
    assert "head.0.weight" not in trained  # BatchNorm1d(affine=False)

    evaluated = main_linprobe.main(parse(main_linprobe, probe_args(setup, tmp_path / "eval", "--eval", "--resume", out)))
    assert evaluated["acc1"] == stats["acc1"]


def test_rerun_of_a_finished_probe_reports_the_whole_run(tmp_path, setup):
    argv = probe_args(setup, tmp_path / "out", "--cache_features", "--epochs", 2, "--auto_resume")
    first = main_linprobe.main(parse(main_linprobe, argv))
    again = main_linprobe.main(parse(main_linprobe, argv))  # nothing left to train: read back and evaluated
    assert [e["epoch"] for e in first["history"]] == [0, 1] and again["history"] == first["history"]
    assert again["acc1"] == first["acc1"] == first["history"][-1]["test_acc1"]
    assert first["max_acc1"] == max(e["test_acc1"] for e in first["history"])
    assert again["checkpoint"] == str(tmp_path / "out" / "checkpoint-last.pth")


@pytest.mark.slow
def test_torchrun_cached_probe_gathers_features_from_both_processes(tmp_path, setup):
    out = tmp_path / "out"
    result = run_torchrun("main_linprobe.py", probe_args(setup, out, "--cache_views", 2, "--dist_eval",
                                                         "--batch_size", 8, "--epochs", 2))
    assert "Accuracy on the 64 test images" in result.stdout
    assert load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1
    # each view holds every image once, whichever process computed it: the single-process cache
    single = tmp_path / "single"
    main_linprobe.main(parse(main_linprobe, probe_args(setup, single, "--cache_views", 2, "--epochs", 2)))
    for view in range(2):
        torch.testing.assert_close(np.load(feature_cache.view_path(out / feature_cache.FOLDER, view)),
                                   np.load(feature_cache.view_path(single / feature_cache.FOLDER, view)),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sync_bn_makes_two_processes_of_8_train_as_one_of_16(tmp_path, setup):
    """--sync_bn: the head's BatchNorm normalises over the global batch, so 2 x 8 gives the 1 x 16 head (to float
    rounding: the cached features come from other batches). Without it the statistics are per process."""
    single = tmp_path / "single"
    main_linprobe.main(parse(main_linprobe, probe_args(setup, single, "--cache_features", "--epochs", 2)))
    synced = tmp_path / "synced"
    result = run_torchrun("main_linprobe.py", probe_args(setup, synced, "--cache_features", "--epochs", 2,
                                                         "--batch_size", 8, "--sync_bn"))
    assert result.returncode == 0, result.stderr[-3000:]
    head_single = load_checkpoint(single / "checkpoint-last.pth")["model"]
    head_synced = load_checkpoint(synced / "checkpoint-last.pth")["model"]
    for key in HEAD_KEYS:
        torch.testing.assert_close(head_synced[key], head_single[key], rtol=1e-4, atol=1e-5)


def test_max_accuracy_survives_a_resume(tmp_path, setup, capsys):
    out = tmp_path / "out"
    main_linprobe.main(parse(main_linprobe, probe_args(setup, out, "--cache_features", "--epochs", 2)))
    logged = [json.loads(line)["test_acc1"] for line in open(out / "log.txt")]
    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["max_accuracy"] == max(logged)
    checkpoint["max_accuracy"] = 99.0  # as if an earlier epoch had reached 99 %
    torch.save(checkpoint, out / "checkpoint-last.pth")
    capsys.readouterr()
    main_linprobe.main(parse(main_linprobe, probe_args(setup, out, "--cache_features", "--epochs", 3,
                                                       "--auto_resume")))
    assert "(max 99.00%)" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint-last.pth")["max_accuracy"] == 99.0


def test_checkpoint_that_does_not_fit_stops_with_key_names(tmp_path, setup):
    state = dict(load_checkpoint(setup[2])["model"])
    for key in [k for k in state if k.startswith("blocks.1.")]:
        del state[key]
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    data, config, _ = setup
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.proj\.bias"):
        main_linprobe.main(parse(main_linprobe, probe_args((data, config, broken), tmp_path / "out")))
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_lars_scales_matrices_by_trust_ratio_and_leaves_vectors_plain():
    weight = torch.nn.Parameter(torch.full((2, 2), 3.0))
    bias = torch.nn.Parameter(torch.ones(2))
    optimizer = LARS([weight, bias], lr=1.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    weight.grad = torch.ones(2, 2)
    bias.grad = torch.ones(2)
    optimizer.step()
    update = torch.ones(2, 2) + 0.5 * 3.0  # gradient + weight decay
    expected = 3.0 - 0.001 * torch.linalg.norm(torch.full((2, 2), 3.0)) / torch.linalg.norm(update) * update
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(bias.detach(), torch.zeros(2))  # no decay, no trust ratio: 1 - lr * grad
