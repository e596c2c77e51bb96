"""Class-conditional MAGE: the released layout is untouched, the "no class" token is the unconditional model,
classifier-free guidance in the one sampler, label dropout in pre-training (DDP, resume, --finetune)."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import main_pretrain
from conftest import DATA_DIR, write_image_folder
from engine_pretrain import conditioning_labels, global_label_drop
from models_mage import NO_CLASS, mage_vit_tiny_patch16
from train_support import (max_abs_difference, model_state, parse, pretrain_args, run_script, run_torchrun)
import engine_pretrain
from util.errors import UsageError
from util.seeding import seed_everything
from util.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked
from util.sampling import guidance_scale, guided_logits, image_generators, iterative_decode

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def golden_state():
    return torch.load(os.path.join(DATA_DIR, "mage_tiny_golden.pt"), weights_only=True)["mage_state_dict"]


@pytest.fixture(scope="module")
def models(golden_state):
    """(unconditional, class-conditional) tiny MAGE, both with the released-format golden weights."""
    unconditional = mage_vit_tiny_patch16()
    unconditional.load_state_dict(golden_state, strict=True)
    conditional = mage_vit_tiny_patch16(class_cond=True, num_classes=NUM_CLASSES)
    load_state_dict_checked(conditional, golden_state, allowed_missing=("class_emb.",))
    return unconditional.eval(), conditional.eval()


def masked_ids(model, rows, seed=0):
    """Rows of random codes with a random half of the positions masked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.codebook_size, (rows, model.seq_len), generator=generator)
    return ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.5, model.mask_token_label)


def test_released_layout_unchanged_and_only_class_emb_new(golden_state):
    assert "class_emb.weight" not in mage_vit_tiny_patch16().state_dict()
    conditional = mage_vit_tiny_patch16(class_cond=True, num_classes=NUM_CLASSES)
    new_keys = set(conditional.state_dict()) - set(golden_state)
    assert new_keys == {"class_emb.weight"} and set(golden_state) <= set(conditional.state_dict())
    assert conditional.class_emb.weight.shape == (NUM_CLASSES, 64)
    assert 0.015 < conditional.class_emb.weight.std().item() < 0.025  # initialised like the word embeddings
    with pytest.raises(CheckpointError, match="missing keys: class_emb.weight"):
        load_state_dict_checked(conditional, golden_state)  # only when allowed explicitly


@torch.no_grad()
def test_no_class_token_gives_exactly_the_unconditional_logits(models):
    unconditional, conditional = models
    ids = masked_ids(unconditional, 3)
    expected = unconditional.predict_logits(ids)
    assert torch.equal(conditional.predict_logits(ids), expected)
    assert torch.equal(conditional.predict_logits(ids, torch.full((3,), NO_CLASS)), expected)
    mixed = conditional.predict_logits(ids, torch.tensor([NO_CLASS, 4, NO_CLASS]))
    assert torch.equal(mixed[[0, 2]], expected[[0, 2]])
    assert not torch.allclose(mixed[1], expected[1], atol=1e-3)  # a label does change the prediction
    with pytest.raises(ValueError, match="unconditional MAGE"):
        unconditional.predict_logits(ids, torch.zeros(3, dtype=torch.long))


def test_released_checkpoint_gives_identical_unconditional_tokens_through_the_conditional_path(models):
    unconditional, conditional = models
    ids = torch.full((3, unconditional.seq_len), unconditional.mask_token_label)
    expected = iterative_decode(unconditional, ids, num_iter=4, generator=image_generators(0, range(3), "cpu"))
    for labels in (None, torch.full((3,), NO_CLASS)):
        out = iterative_decode(conditional, ids, num_iter=4, generator=image_generators(0, range(3), "cpu"),
                               labels=labels)
        assert torch.equal(out, expected)


class Recorder(nn.Module):
    """Wraps a model's predict_logits, recording the batch size of every call."""

    def __init__(self, model, fixed_labels=None):
        super().__init__()
        self.model, self.fixed_labels, self.calls = model, fixed_labels, []
        self.mask_token_label, self.NO_CLASS = model.mask_token_label, NO_CLASS
        self.eval()  # the sampler restores the wrapper's mode, and with it the wrapped model's

    def predict_logits(self, ids, labels=None):
        self.calls.append(ids.shape[0])
        return self.model.predict_logits(ids, labels if self.fixed_labels is None else self.fixed_labels)


def test_guidance_zero_is_the_conditional_sampler(models):
    _, conditional = models
    labels = torch.tensor([0, 3, 7])
    ids = torch.full((3, conditional.seq_len), conditional.mask_token_label)
    guided = Recorder(conditional)
    out = iterative_decode(guided, ids, num_iter=4, generator=image_generators(1, range(3), "cpu"),
                           labels=labels, cfg=0.0)
    plain = Recorder(conditional, fixed_labels=labels)  # the conditional model, asked without labels
    expected = iterative_decode(plain, ids, num_iter=4, generator=image_generators(1, range(3), "cpu"))
    assert torch.equal(out, expected)
    assert guided.calls == [3] * 4  # no unconditional half when w = 0


@torch.no_grad()
def test_batched_cond_uncond_forward_equals_two_forwards(models):
    _, conditional = models
    ids, labels = masked_ids(conditional, 3, seed=1), torch.tensor([1, 5, 9])
    recorder = Recorder(conditional)
    logits = guided_logits(recorder, ids, labels, cfg=3.0)
    assert recorder.calls == [6]  # one forward of cond + uncond rows
    cond = conditional.predict_logits(ids, labels)
    uncond = conditional.predict_logits(ids, torch.full((3,), NO_CLASS))
    torch.testing.assert_close(logits, cond + 3.0 * (cond - uncond), atol=2e-5, rtol=0)
    assert (logits - cond).abs().max() > 1e-2


class LabelLogits(nn.Module):
    """A stand-in generator whose logits depend only on the label: a table row per class, NO_CLASS -> last row."""
    NO_CLASS = NO_CLASS

    def __init__(self, table, seq_len):
        super().__init__()
        self.register_buffer("table", table)  # (num_classes + 1, K)
        self.mask_token_label, self.seq_len = table.shape[1] + 1, seq_len
        self.steps = []

    def predict_logits(self, ids, labels=None):
        labels = torch.full(ids.shape[:1], NO_CLASS) if labels is None else labels
        return self.table[labels].unsqueeze(1).expand(-1, ids.shape[1], -1)


class GuidedByHand(LabelLogits):
    """The guided logits written out per step: what the sampler must compute from LabelLogits."""

    def __init__(self, table, seq_len, labels, cfg, num_iter, linear):
        super().__init__(table, seq_len)
        self.labels, self.cfg, self.num_iter, self.linear, self.step = labels, cfg, num_iter, linear, 0

    def predict_logits(self, ids, labels=None):
        w = self.cfg * (self.step + 1) / self.num_iter if self.linear else self.cfg
        self.step += 1
        cond, uncond = self.table[self.labels], self.table[NO_CLASS]
        return (cond + w * (cond - uncond)).unsqueeze(1).expand(-1, ids.shape[1], -1)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_guided_sampling_uses_cond_plus_w_times_difference(schedule):
    table = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, NO_CLASS, 2])
    fake = LabelLogits(table, seq_len=12)
    ids = torch.full((5, 12), fake.mask_token_label)
    out, history = iterative_decode(fake, ids, num_iter=5, generator=image_generators(0, range(5), "cpu"),
                                    labels=labels, cfg=2.5, cfg_schedule=schedule, return_history=True)
    by_hand = GuidedByHand(table, 12, labels, 2.5, 5, schedule == "linear")
    expected = iterative_decode(by_hand, ids, num_iter=5, generator=image_generators(0, range(5), "cpu"),
                                return_history=True)
    assert torch.equal(out, expected[0]) and all(torch.equal(a, b) for a, b in zip(history, expected[1]))
    other = "linear" if schedule == "constant" else "constant"
    assert not torch.equal(out, iterative_decode(fake, ids, num_iter=5, labels=labels, cfg=2.5, cfg_schedule=other,
                                                 generator=image_generators(0, range(5), "cpu")))


def test_guidance_schedules():
    assert [guidance_scale(4.0, "constant", t, 4) for t in range(4)] == [4.0] * 4
    assert [guidance_scale(4.0, "linear", t, 4) for t in range(4)] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_scale(1.0, "cosine", 0, 4)


def test_guidance_samples_from_the_guided_distribution():
    # Class 0 prefers code 0 a little, "no class" prefers code 1: guidance moves the samples towards code 0.
    table = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    fake = LabelLogits(table, seq_len=1)
    ids = torch.full((4000, 1), fake.mask_token_label)
    for cfg in (0.0, 4.0):
        out = iterative_decode(fake, ids, num_iter=1, generator=torch.Generator().manual_seed(0),
                               labels=torch.zeros(4000, dtype=torch.long), cfg=cfg)
        expected = (table[0] + cfg * (table[0] - table[-1])).softmax(0)
        assert abs((out == 0).float().mean().item() - expected[0].item()) < 0.03, cfg


def test_label_drop_rate_and_global_batch_rows(monkeypatch):
    drops = torch.cat([global_label_drop(64, "cpu", 0, epoch, step, 0.1) for epoch in range(4) for step in range(50)])
    assert abs(drops.float().mean().item() - 0.1) < 0.01  # 12,800 draws: 0.1 +- 3.8 standard errors
    assert global_label_drop(64, "cpu", 0, 0, 0, 0.0).sum() == 0 and global_label_drop(64, "cpu", 0, 0, 0, 1.0).all()
    # two processes with 4 rows each drop the rows that one process with 8 rows drops
    single = global_label_drop(8, "cpu", 3, 1, 2, 0.5)
    monkeypatch.setattr(engine_pretrain, "get_world_size", lambda: 2)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(engine_pretrain, "get_rank", lambda rank=rank: rank)
        ranks.append(global_label_drop(4, "cpu", 3, 1, 2, 0.5))
    assert torch.equal(torch.stack(ranks, dim=1).flatten(), single)


def test_training_sees_the_dropped_labels_as_no_class():
    model, labels = SimpleNamespace(NO_CLASS=NO_CLASS), torch.arange(64) % 8
    args = SimpleNamespace(class_cond=True, seed=0, label_drop_prob=0.5)
    seen = conditioning_labels(model, labels, 64, "cpu", 2, 3, args)
    drop = global_label_drop(64, "cpu", 0, 2, 3, 0.5)
    assert 0 < drop.sum() < 64 and torch.equal(seen, labels.masked_fill(drop, NO_CLASS))
    assert conditioning_labels(model, labels, 64, "cpu", 2, 3, SimpleNamespace(class_cond=False)) is None


# --------------------------------------------------------------------------------------------------------
# main_pretrain.py --class_cond
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("shapes"), splits=(("train", 4),))


def class_cond_args(shapes, out, tokenizer_config, *extra):
    return pretrain_args(shapes, out, tokenizer_config, "--class_cond", "--epochs", 2, "--warmup_epochs", 0,
                         "--lr", 1e-3, "--dropout", 0.0, "--label_drop_prob", 0.3, *extra)


@pytest.mark.usefixtures("one_torch_thread")
def test_class_conditional_pretraining_learns_the_labels_and_resumes(tmp_path, shapes, tokenizer_config):
    common = ("--batch_size", 8, "--save_every", 1)
    main_pretrain.main(parse(main_pretrain, class_cond_args(shapes, tmp_path / "straight", tokenizer_config, *common)))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint-last.pth")
    assert straight["model"]["class_emb.weight"].shape == (4, 64)  # --num_classes from the data
    assert straight["args"].num_classes == 4
    seed_everything(0)
    args = parse(main_pretrain, class_cond_args(shapes, tmp_path, tokenizer_config))
    main_pretrain.check_args(args)
    start = main_pretrain.build_model(args)
    assert (straight["model"]["class_emb.weight"] - start.class_emb.weight).abs().max() > 1e-4  # it trains

    main_pretrain.main(parse(main_pretrain, class_cond_args(
        shapes, tmp_path / "resumed", tokenizer_config, *common, "--resume",
        tmp_path / "straight" / "checkpoint-0.pth")))
    assert max_abs_difference(straight["model"], model_state(tmp_path / "resumed" / "checkpoint-last.pth")) == 0


@pytest.mark.slow
def test_class_conditional_ddp_step_equals_single_process(tmp_path, tokenizer_config):
    data = write_image_folder(tmp_path / "data", splits=(("train", 2),))
    common = ("--epochs", 1, "--label_drop_prob", 0.5)
    ddp = run_torchrun("main_pretrain.py", class_cond_args(data, tmp_path / "ddp", tokenizer_config,
                                                            "--batch_size", 4, *common))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_script("main_pretrain.py", class_cond_args(data, tmp_path / "single", tokenizer_config,
                                                             "--batch_size", 8, *common))
    assert single.returncode == 0, single.stderr[-3000:]
    assert max_abs_difference(model_state(tmp_path / "single" / "checkpoint-last.pth"),
                              model_state(tmp_path / "ddp" / "checkpoint-last.pth")) < 1e-5


@pytest.mark.usefixtures("one_torch_thread")
def test_finetune_from_an_unconditional_checkpoint(tmp_path, shapes, tokenizer_config):
    main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, tmp_path / "uncond", tokenizer_config,
                                                          "--batch_size", 8, "--epochs", 1)))
    unconditional = model_state(tmp_path / "uncond" / "checkpoint-last.pth")
    args = parse(main_pretrain, class_cond_args(shapes, tmp_path / "cond", tokenizer_config, "--finetune",
                                                tmp_path / "uncond" / "checkpoint-last.pth", "--num_classes", 6))
    main_pretrain.check_args(args)
    model = main_pretrain.build_model(args)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in unconditional.items())
    assert loaded["class_emb.weight"].shape == (6, 64)
    with pytest.raises(UsageError, match="--num_classes 2 is smaller than the 4 classes"):
        main_pretrain.check_args(parse(main_pretrain, class_cond_args(shapes, tmp_path, tokenizer_config,
                                                                      "--num_classes", 2)))
