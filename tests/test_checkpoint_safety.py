"""Checkpoints are read without executing code, and every bad file gets a clear error naming it."""
import argparse
import os
import pickle
import random
import stat

import pytest
import torch

import models_mage
from models_vit import load_mage_checkpoint_into_classifier, vit_tiny_patch16
from taming.models.vqgan import VQModel, load_vqgan_config
from util.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked, save_checkpoint_atomic

EXPLOIT_MARKER = "pwned"


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARKER}",))


def test_pickled_callable_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*execute code"):
        load_checkpoint(path)
    assert not (tmp_path / EXPLOIT_MARKER).exists()


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "legacy.pkl"
    with open(path, "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="legacy.pkl"):
        load_checkpoint(path)


def test_training_checkpoint_with_args_namespace_loads(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint_atomic({"model": {"w": torch.ones(2)}, "epoch": 3,
                            "args": argparse.Namespace(lr=1e-3, model="mage_vit_base_patch16")}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["args"].model == "mage_vit_base_patch16" and checkpoint["epoch"] == 3


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated, corrupt"):
        load_checkpoint(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="nowhere.pth' does not exist"):
        load_checkpoint("nowhere.pth")


def test_missing_key_is_named(tmp_path):
    model = models_mage.mage_vit_tiny_patch16()
    state = model.state_dict()
    del state["blocks.1.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight"):
        load_state_dict_checked(model, state, source="mage.pth")


def test_shape_mismatch_is_named():
    model = models_mage.mage_vit_tiny_patch16()
    state = model.state_dict()
    state["norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match=r"norm\.weight \(checkpoint \(65,\) vs model \(64,\)\)"):
        load_state_dict_checked(model, state, source="mage.pth")


def test_mage_c_extra_head_is_ignored_and_reported(caplog):
    model = models_mage.mage_vit_tiny_patch16()
    state = dict(model.state_dict())
    state["contrastive_head.fc.weight"] = torch.zeros(4, 4)
    _, ignored = load_state_dict_checked(model, state, source="mage-c.pth", ignore_foreign_modules=True)
    assert ignored == ["contrastive_head.fc.weight"]
    assert "contrastive_head.fc.weight" in caplog.text
    state["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.extra"):
        load_state_dict_checked(model, state, source="mage-c.pth", ignore_foreign_modules=True)


def test_tokenizer_file_loads_strictly_in_release_format(tmp_path):
    settings = load_vqgan_config("config/vqgan_tiny.yaml")
    source = VQModel(**settings)
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = VQModel(**settings, ckpt_path=str(path))
    assert torch.equal(loaded.quantize.embedding.weight, source.quantize.embedding.weight)
    mage = models_mage.mage_vit_tiny_patch16(vqgan_ckpt_path=str(path))
    assert torch.equal(mage.vqgan.encoder.conv_in.weight, source.encoder.conv_in.weight)
    state = source.state_dict()
    del state["quantize.embedding.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="missing keys: quantize.embedding.weight"):
        VQModel(**settings, ckpt_path=str(path))


def test_classifier_refuses_a_checkpoint_that_is_not_mage():
    classifier = vit_tiny_patch16(num_classes=10)
    state = models_mage.mage_vit_tiny_patch16().state_dict()
    del state["token_emb.word_embeddings.weight"]
    with pytest.raises(CheckpointError, match="missing keys: token_emb.word_embeddings.weight"):
        load_mage_checkpoint_into_classifier(classifier, {"model": state}, source="wrong.pth")


def test_random_bytes_are_called_corrupt_not_code(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match="noise.pth': the file is corrupt or not a PyTorch checkpoint") as error:
        load_checkpoint(path)
    assert "execute code" not in str(error.value)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_checkpoint_atomic({"w": torch.ones(2)}, tmp_path / "checkpoint-last.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "checkpoint-last.pth").st_mode) == 0o666 & ~umask
