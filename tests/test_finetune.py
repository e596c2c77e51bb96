"""Fine-tuning: layer-wise lr decay groups, lr schedule, Mixup/CutMix epoch under torchrun, normalisation."""
import argparse
import json
import math
import os

import pytest
import torch

import main_finetune
import models_vit
import util.lr_sched as lr_sched
from train_support import parse, run_torchrun
from util import datasets
from util.checkpoint import load_checkpoint
from util.errors import UsageError
from util.lr_decay import param_groups_lrd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mage_checkpoint(tmp_path_factory, tokenizer_config):
    import models_mage
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mage") / "mage.pth"
    torch.save({"model": models_mage.mage_vit_tiny_patch16(vqgan_config=tokenizer_config).state_dict()}, path)
    return path


def finetune_args(data, output_dir, tokenizer_config, checkpoint, *extra):
    return ["--model", "vit_tiny_patch16", "--vqgan_config", tokenizer_config, "--input_size", "32",
            "--data_path", str(data), "--finetune", str(checkpoint), "--nb_classes", "4", "--batch_size", "8",
            "--epochs", "1", "--warmup_epochs", "0", "--blr", "1e-3", "--output_dir", str(output_dir),
            "--log_dir", "", "--amp", "none", "--num_workers", "0", "--device", "cpu", *map(str, extra)]


def test_layer_decay_groups_scale_lr_by_depth_and_skip_decay_on_vectors():
    model = models_vit.vit_tiny_patch16(num_classes=4, global_pool=True)
    layer_decay, num_layers = 0.65, len(model.blocks) + 1
    groups = param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                              layer_decay=layer_decay)
    params = dict(model.named_parameters())
    seen = []
    for group in groups:
        assert group["lr_scale"] == pytest.approx(layer_decay ** (num_layers - group["layer_id"]))
        for name in group["param_names"]:
            if name.startswith(("token_emb.", "patch_embed.", "cls_token", "pos_embed")):
                expected_layer = 0
            elif name.startswith("blocks."):
                expected_layer = int(name.split(".")[1]) + 1
            else:
                expected_layer = num_layers
            assert group["layer_id"] == expected_layer, name
            no_decay = params[name].ndim == 1 or name in model.no_weight_decay()
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen.append(name)
    assert sorted(seen) == sorted(n for n, p in params.items() if p.requires_grad)
    assert not any(name.startswith("vqgan.") for name in seen)  # the tokenizer stays frozen
    assert {g["layer_id"] for g in groups if any(n.startswith("head.") for n in g["param_names"])} == {num_layers}

    optimizer = torch.optim.AdamW(groups, lr=1.0)
    args = argparse.Namespace(lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=10)
    lr_sched.adjust_learning_rate(optimizer, 0.0, args)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_lr_schedule_warms_up_per_iteration_then_follows_half_cosine():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert lr_sched.lr_at(0.0, args) == 0.0
    assert lr_sched.lr_at(0.5, args) == pytest.approx(0.25)
    assert lr_sched.lr_at(2.0, args) == pytest.approx(1.0)
    assert lr_sched.lr_at(6.0, args) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_sched.lr_at(10.0, args) == pytest.approx(0.1)


@pytest.mark.slow
def test_torchrun_epoch_with_mixup_cutmix_randaugment_then_eval(tmp_path, image_folder, tokenizer_config,
                                                               mage_checkpoint):
    out = tmp_path / "out"
    argv = finetune_args(image_folder, out, tokenizer_config, mage_checkpoint, "--mixup", 0.8, "--cutmix", 1.0,
                         "--aa", "rand-m9-mstd0.5-inc1", "--smoothing", 0.1, "--reprob", 0.25, "--drop_path", 0.1,
                         "--layer_decay", 0.65, "--batch_size", 4, "--dist_eval",
                         "--blr", 0.1)  # one epoch then moves the head off uniform predictions
    result = run_torchrun("main_finetune.py", argv)
    assert "Mixup is activated" in result.stdout and "SoftTargetCrossEntropy" in result.stdout
    assert "* Acc@1" in result.stdout

    checkpoint = load_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["args"].world_size == 2
    logged = [json.loads(line)["test_acc1"] for line in open(out / "log.txt")]
    assert checkpoint["max_accuracy"] == max(logged)  # restored by a resume (tests/test_linprobe.py)
    pretrained = load_checkpoint(mage_checkpoint)["model"]
    assert not torch.equal(checkpoint["model"]["blocks.0.mlp.fc1.weight"], pretrained["blocks.0.mlp.fc1.weight"])
    assert torch.equal(checkpoint["model"]["vqgan.quantize.embedding.weight"],
                       pretrained["vqgan.quantize.embedding.weight"])

    stats = main_finetune.main(parse(main_finetune, finetune_args(
        image_folder, tmp_path / "eval", tokenizer_config, mage_checkpoint, "--eval", "--resume", out)))
    loss, acc1 = evaluate_independently(checkpoint["model"], image_folder, tokenizer_config)
    assert stats["loss"] == pytest.approx(loss, rel=1e-4) and stats["acc1"] == pytest.approx(acc1)


def evaluate_independently(state, image_folder, tokenizer_config):
    """(cross-entropy, top-1 %) of the classifier `state` on the val split: plain pixels, one batch."""
    model = models_vit.vit_tiny_patch16(num_classes=4, global_pool=True, vqgan_config=tokenizer_config)
    model.load_state_dict(state)
    dataset = datasets.SeededImageFolder(os.path.join(image_folder, "val"), datasets.eval_transform(32, "bicubic"))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    with torch.no_grad():
        logits = model.eval()(images)
    return (torch.nn.functional.cross_entropy(logits, labels).item(),
            100.0 * (logits.argmax(-1) == labels).float().mean().item())


def test_reference_normalisation_is_undone_before_the_tokenizer(image_folder):
    path = os.path.join(image_folder, "val", "class_0_ellipse", "0000.png")
    dataset = datasets.SeededImageFolder(os.path.dirname(os.path.dirname(path)), None)
    image = dataset.load_image(0)[0]
    args = argparse.Namespace(normalize=True, interpolation="bicubic")
    mean, std = datasets.finetune_mean_std(args)
    normalised = datasets.eval_transform(32, "bicubic", mean, std)(image)
    pixels = datasets.eval_transform(32, "bicubic")(image)
    assert normalised.min() < 0
    torch.testing.assert_close(main_finetune.pixel_fn(args)(normalised[None].clone())[0], pixels)
    assert main_finetune.pixel_fn(argparse.Namespace(normalize=False)) is None


def test_impossible_flags_are_usage_errors(tmp_path, image_folder, tokenizer_config, mage_checkpoint):
    cases = [(("--mixup", 0.8, "--batch_size", 3), "--batch_size must be even"),
             (("--eval",), "--eval needs weights"),
             (("--nb_classes", 2), "has 4 classes but --nb_classes is 2"),
             (("--data_path", tmp_path), "has no 'val' folder")]
    for flags, message in cases:
        argv = finetune_args(image_folder, tmp_path / "out", tokenizer_config, mage_checkpoint, *flags)
        with pytest.raises(UsageError, match=message):
            main_finetune.main(parse(main_finetune, argv))
        assert not (tmp_path / "out" / "checkpoint-last.pth").exists()
