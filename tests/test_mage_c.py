"""MAGE-C pre-training (main_pretrain.py --contrastive_weight): lambda 0 is plain MAGE bit for bit, the head
lives in the checkpoints and the optimizer, resumes exactly, is ignored by the classifier and the generator,
logs its losses, trains from a token cache, and 2 processes x b rows equal 1 process x 2b rows.
(The InfoNCE value against a loop computation is tests/test_contrastive.py's.)"""
import glob
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gen_img_uncond
import main_cache_tokens
import main_pretrain
import models_vit
from conftest import write_image_folder
from train_support import max_abs_difference, parse, pretrain_args, run_torchrun
from util.checkpoint import load_checkpoint
from util.errors import UsageError
from util.seeding import seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a small head keeps the steps fast; the layout (3 Linear layers, BatchNorm + ReLU between) is the default's
MAGE_C = ("--contrastive_weight", 0.5, "--projector_dim", 16, "--projector_hidden_dim", 32)
COMMON = ("--batch_size", 4, "--blr", 0.03, "--warmup_epochs", 1, "--save_every", 1, "--vis_every", 0)
CONTRASTIVE_KEYS = ("train_recon_loss", "train_contrastive_loss", "train_contrastive_acc")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 shape classes x 2 training images (64 pixels, cropped to 32): 2 steps of 4 per epoch."""
    return write_image_folder(tmp_path_factory.mktemp("shapes"), splits=(("train", 2),))


def pretrain(shapes, tokenizer_config, output_dir, *flags):
    argv = pretrain_args(shapes, output_dir, tokenizer_config, *COMMON, *flags)
    return main_pretrain.main(parse(main_pretrain, argv))


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def plain_run(shapes, tokenizer_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    pretrain(shapes, tokenizer_config, out, "--epochs", 1)
    return load_checkpoint(out / "checkpoint-last.pth")


@pytest.fixture(scope="module")
def mage_c_run(shapes, tokenizer_config, tmp_path_factory):
    """2 epochs of MAGE-C with tensorboard events and an image grid; (output folder, main()'s result)."""
    out = tmp_path_factory.mktemp("mage_c") / "run"
    argv = pretrain_args(shapes, out, tokenizer_config, *COMMON, *MAGE_C, "--epochs", 2, "--vis_every", 2,
                         "--vis_num", 2)
    argv[argv.index("--log_dir") + 1] = str(out)
    return out, main_pretrain.main(parse(main_pretrain, argv))


def test_lambda_zero_is_plain_mage_bit_for_bit(shapes, tokenizer_config, plain_run, tmp_path):
    """--contrastive_weight 0 ignores every other contrastive flag: no head, no second view, same random numbers."""
    pretrain(shapes, tokenizer_config, tmp_path / "zero", "--epochs", 1, "--contrastive_weight", 0,
             "--contrastive_aug", "mage", "--projector_dim", 7, "--projector_layers", 1,
             "--contrastive_temperature", 0.5)
    zero = load_checkpoint(tmp_path / "zero" / "checkpoint-last.pth")
    assert not any(key.startswith("contrastive_head") for key in zero["model"])
    assert max_abs_difference(zero["model"], plain_run["model"]) == 0
    moments = [(zero["optimizer"]["state"][i]["exp_avg"], plain_run["optimizer"]["state"][i]["exp_avg"])
               for i in plain_run["optimizer"]["state"]]
    assert len(zero["optimizer"]["state"]) == len(plain_run["optimizer"]["state"])
    assert all(torch.equal(a, b) for a, b in moments)
    assert not set(CONTRASTIVE_KEYS) & set(read_log(tmp_path / "zero")[0])


def test_head_is_saved_trained_and_logged(mage_c_run, plain_run):
    out, result = mage_c_run
    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    head = {k for k in checkpoint["model"] if k.startswith("contrastive_head.")}
    # exactly MAGE's keys plus the head's: Linear-BN-ReLU-Linear-BN-ReLU-Linear
    assert set(checkpoint["model"]) - head == set(plain_run["model"])
    assert {"contrastive_head.mlp.0.weight", "contrastive_head.mlp.1.running_var",
            "contrastive_head.mlp.6.weight"} <= head
    assert checkpoint["model"]["contrastive_head.mlp.6.weight"].shape == (16, 32)
    # the head is in the optimizer and gets gradients: AdamW holds a state for each of its 10 parameters (weight
    # and bias of 3 Linear and 2 BatchNorm layers) besides MAGE's
    assert len(checkpoint["optimizer"]["state"]) == len(plain_run["optimizer"]["state"]) + 10
    first = load_checkpoint(out / "checkpoint-0.pth")
    assert not torch.equal(first["model"]["contrastive_head.mlp.0.weight"],
                           checkpoint["model"]["contrastive_head.mlp.0.weight"])

    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]
    for entry in log:
        assert set(CONTRASTIVE_KEYS) <= set(entry)
        assert 0 <= entry["train_contrastive_acc"] <= 1
        # the total is reconstruction + lambda x contrastive (each averaged over the epoch's steps)
        assert entry["train_loss"] == pytest.approx(entry["train_recon_loss"] + 0.5 * entry["train_contrastive_loss"])
    assert result["final_contrastive_loss"] == log[-1]["train_contrastive_loss"]
    assert result["final_contrastive_acc"] == log[-1]["train_contrastive_acc"]
    assert result["final_recon_loss"] == log[-1]["train_recon_loss"]

    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {"train_loss", *CONTRASTIVE_KEYS} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train_contrastive_loss")) == 4  # 2 steps x 2 epochs
    grid = events.Images(events.Tags()["images"][0])[-1]  # of the first view: 4 rows of 2 images of 32 pixels
    assert (grid.width, grid.height) == (2 * 32 + 3 * 2, 4 * 32 + 5 * 2)


def test_resume_with_the_head_continues_exactly(mage_c_run, shapes, tokenizer_config, tmp_path):
    out, _ = mage_c_run
    pretrain(shapes, tokenizer_config, tmp_path / "resumed", *MAGE_C, "--epochs", 2,
             "--resume", out / "checkpoint-0.pth")
    straight = load_checkpoint(out / "checkpoint-last.pth")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint-last.pth")
    assert max_abs_difference(straight["model"], resumed["model"]) == 0
    for index, state in straight["optimizer"]["state"].items():
        assert all(torch.equal(value, resumed["optimizer"]["state"][index][name]) for name, value in state.items())


def test_mage_c_checkpoint_loads_into_classifier_and_generator(mage_c_run, tokenizer_config, tmp_path, caplog):
    out, _ = mage_c_run
    path = out / "checkpoint-last.pth"
    state = load_checkpoint(path)["model"]
    # the classifier (main_linprobe.py / main_finetune.py --finetune): the head is left out
    classifier = models_vit.vit_tiny_patch16(global_pool=True, num_classes=4, vqgan_config=tokenizer_config)
    models_vit.load_mage_checkpoint_into_classifier(classifier, str(path))
    assert torch.equal(classifier.state_dict()["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])
    # the generator: the head's keys are ignored and named
    argv = ["--model", "mage_vit_tiny_patch16", "--vqgan_config", tokenizer_config, "--ckpt", str(path),
            "--num_images", "2", "--batch_size", "2", "--num_iter", "2", "--device", "cpu", "--amp", "none",
            "--output_dir", str(tmp_path / "gen")]
    gen_img_uncond.main(gen_img_uncond.get_args_parser().parse_args(argv))
    assert "contrastive_head.mlp.0.weight" in caplog.text
    assert len(glob.glob(str(tmp_path / "gen" / "*" / "images" / "*.png"))) == 2


def test_finetune_from_mage_starts_a_fresh_head(shapes, tokenizer_config, tmp_path, capsys):
    plain = tmp_path / "plain"
    pretrain(shapes, tokenizer_config, plain, "--epochs", 1)
    pretrain(shapes, tokenizer_config, tmp_path / "c", *MAGE_C, "--epochs", 1, "--finetune",
             plain / "checkpoint-last.pth")
    assert "(contrastive head initialised)" in capsys.readouterr().out
    assert "contrastive_head.mlp.0.weight" in load_checkpoint(tmp_path / "c" / "checkpoint-last.pth")["model"]
    # and back: MAGE-C weights into plain MAGE, the head ignored
    pretrain(shapes, tokenizer_config, tmp_path / "back", "--epochs", 1, "--finetune",
             tmp_path / "c" / "checkpoint-last.pth")
    assert not any("contrastive_head" in k for k in load_checkpoint(tmp_path / "back" / "checkpoint-last.pth")["model"])


def test_cached_contrastive_views_train_mage_c(shapes, tokenizer_config, tmp_path):
    """main_cache_tokens.py --aug contrastive, then MAGE-C from the cache (two different cached views)."""
    cache = tmp_path / "cache"
    main_cache_tokens.main(parse(main_cache_tokens, [
        "--data_path", shapes, "--output_dir", str(cache), "--aug", "contrastive", "--num_views", "3",
        "--vqgan_config", tokenizer_config, "--input_size", "32", "--batch_size", "8", "--num_workers", "0",
        "--device", "cpu", "--amp", "none", "--random_tokenizer"]))
    assert json.load(open(cache / "meta.json"))["views"] == "contrastive"
    result = pretrain(shapes, tokenizer_config, tmp_path / "run", *MAGE_C, "--epochs", 1, "--cached_tokens", cache)
    assert result["final_contrastive_loss"] > 0 and result["steps_per_epoch"] == 2

    one_view = tmp_path / "one_view"
    main_cache_tokens.main(parse(main_cache_tokens, [
        "--data_path", shapes, "--output_dir", str(one_view), "--num_views", "1", "--vqgan_config", tokenizer_config,
        "--input_size", "32", "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--amp", "none",
        "--random_tokenizer"]))
    with pytest.raises(UsageError, match="needs two different views per image"):
        pretrain(shapes, tokenizer_config, tmp_path / "refused", *MAGE_C, "--epochs", 1, "--cached_tokens", one_view)
    with pytest.raises(UsageError, match="--contrastive_weight must not be negative"):
        pretrain(shapes, tokenizer_config, tmp_path / "refused", "--contrastive_weight", -1)
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_two_processes_with_b_images_equal_one_with_2b(tmp_path, shapes, tokenizer_config):
    """One MAGE-C step on 2 processes x 4 images == 1 process x 8 images (same views and masks): the negatives
    come from both processes, their gradients flow back through the gather, the head's BatchNorm is global."""
    common = (*MAGE_C, "--epochs", 1, "--warmup_epochs", 0, "--lr", 1e-4, "--dropout", 0.0)
    run_torchrun("main_pretrain.py", pretrain_args(shapes, tmp_path / "ddp", tokenizer_config, "--batch_size", 4,
                                                   *common))
    main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, tmp_path / "single", tokenizer_config,
                                                          "--batch_size", 8, *common)))
    single = load_checkpoint(tmp_path / "single" / "checkpoint-last.pth")
    distributed = load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pth")
    seed_everything(0)  # the initial weights of both runs
    start = main_pretrain.build_model(parse(main_pretrain, pretrain_args(shapes, tmp_path, tokenizer_config,
                                                                         *common)))
    assert max_abs_difference(single["model"], start.state_dict()) > 5e-5  # the step did move the weights
    head = "contrastive_head.mlp.3.weight"
    assert (single["model"][head] - start.state_dict()[head]).abs().max() > 5e-5  # the head's too
    # The biases right before BatchNorm have a zero gradient in exact arithmetic (BatchNorm removes any shift), so
    # AdamW's first step turns their float noise into +-lr: compared through their moments below only.
    pre_bn_biases = ("contrastive_head.mlp.0.bias", "contrastive_head.mlp.3.bias")
    # AdamW's first step moves every weight by about lr * g / (|g| + eps): an element whose gradient is near eps
    # turns float noise into a fraction of lr (1e-4 here); measured up to 1.05e-5 with the per-group loss weights.
    # The gradients themselves are compared tightly through the first moments below.
    differences = {k: (v.float() - distributed["model"][k].float()).abs().max().item()
                   for k, v in single["model"].items() if k not in pre_bn_biases}
    assert max(differences.values()) < 2e-5, sorted(differences.items(), key=lambda kv: -kv[1])[:3]  # BN stats too
    # AdamW's first moments are 0.1 x the (clipped) gradients: the gradients agree, the head's included
    for index, state in single["optimizer"]["state"].items():
        difference = (state["exp_avg"] - distributed["optimizer"]["state"][index]["exp_avg"]).abs().max().item()
        assert difference < 1e-6, index
    single_log, distributed_log = read_log(tmp_path / "single")[0], read_log(tmp_path / "ddp")[0]
    for key in CONTRASTIVE_KEYS:
        assert distributed_log[key] == pytest.approx(single_log[key], abs=1e-5), key
