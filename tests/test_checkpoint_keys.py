"""The full-size presets produce exactly the keys and shapes of the released checkpoints."""
import json
import os

import pytest
import torch

import models_mage
import models_vit
from conftest import DATA_DIR
from taming.models.vqgan import build_vqgan


@pytest.fixture(scope="module")
def released_keys():
    with open(os.path.join(DATA_DIR, "checkpoint_keys.json")) as f:
        return json.load(f)


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def assert_same_keys(actual, expected):
    assert sorted(set(expected) - set(actual)) == [], "keys missing from the model"
    assert sorted(set(actual) - set(expected)) == [], "keys the release does not have"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert wrong == {}


@pytest.mark.parametrize("name", ["mage_vit_base_patch16", "mage_vit_large_patch16"])
def test_mage_presets(released_keys, name):
    with torch.device("meta"):
        model = models_mage.MODELS[name]()
    assert_same_keys(shapes(model), released_keys[name])
    assert (model.grid_size, model.seq_len, model.codebook_size) == (16, 256, 1024)
    assert (model.mask_token_label, model.fake_class_label) == (2024, 1100)


def test_tokenizer(released_keys):
    with torch.device("meta"):
        vqgan, _ = build_vqgan("config/vqgan.yaml")
    assert_same_keys(shapes(vqgan), released_keys["vqgan"])


@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16"])
@pytest.mark.parametrize("global_pool", [True, False])
def test_classifiers(released_keys, name, global_pool):
    with torch.device("meta"):
        model = models_vit.MODELS[name](global_pool=global_pool, num_classes=1000)
    assert_same_keys(shapes(model), released_keys[name + ("_global_pool" if global_pool else "")])


def test_config_can_be_a_mapping_and_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.device("meta"):
        from_path = models_mage.mage_vit_tiny_patch16()
        mapping = {"ddconfig": dict(double_z=False, z_channels=64, resolution=32, in_channels=3, out_ch=3, ch=32,
                                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
                   "n_embed": 128, "embed_dim": 64}
        from_mapping = models_mage.mage_vit_tiny_patch16(vqgan_config=mapping)
    assert from_path.seq_len == 256
    # 32 / 2^(2-1) = 16: the grid comes from the tokenizer config, as do vocabulary and sequence length
    assert (from_mapping.grid_size, from_mapping.seq_len, from_mapping.codebook_size) == (16, 256, 128)
    assert from_mapping.token_emb.word_embeddings.weight.shape[0] == 128 + 1000 + 1
    assert from_mapping.mask_token_label == 1128
    small = dict(mapping, ddconfig=dict(mapping["ddconfig"], ch_mult=[1, 2, 2]))
    with torch.device("meta"):
        eight = models_mage.mage_vit_tiny_patch16(vqgan_config=small)
    assert (eight.grid_size, eight.seq_len, eight.pos_embed.shape[1]) == (8, 64, 65)
