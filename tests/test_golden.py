"""Parity with tensors produced by the reference implementation (tests/data/mage_tiny_golden.pt).

Tolerances are those of the golden README for CPU float32. Both attention paths are checked: the fused
scaled_dot_product_attention kernel meets the same 1e-4 bound as the explicit float32 softmax here.
"""
import os

import pytest
import torch

from conftest import DATA_DIR
from models_mage import mage_vit_tiny_patch16, set_fused_attention
from models_vit import load_mage_checkpoint_into_classifier, vit_tiny_patch16
from util.pos_embed import get_2d_sincos_pos_embed

ATOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(DATA_DIR, "mage_tiny_golden.pt"), weights_only=True)


@pytest.fixture(scope="module")
def mage(golden):
    model = mage_vit_tiny_patch16()
    model.load_state_dict(golden["mage_state_dict"], strict=True)
    return model.eval()


def test_tiny_config_matches_golden(golden, mage):
    config = golden["config"]
    assert mage.codebook_size == config["codebook_size"]
    assert mage.mask_token_label == config["mask_token_label"]
    assert mage.fake_class_label == config["fake_class_label"]
    assert mage.grid_size == 16 and mage.seq_len == 256


@torch.no_grad()
def test_tokenizer(golden, mage):
    vqgan = mage.vqgan
    torch.testing.assert_close(vqgan.encoder(golden["images"]), golden["vq_encoder_out"], atol=ATOL, rtol=0)
    quant, _, (_, _, indices) = vqgan.encode(golden["images"])
    agreement = (indices.reshape(2, -1) == golden["vq_indices"]).float().mean().item()
    assert agreement >= 0.99
    torch.testing.assert_close(quant, golden["vq_quant"], atol=ATOL, rtol=0)
    torch.testing.assert_close(vqgan.decode(golden["vq_quant"]), golden["vq_decoded"], atol=ATOL, rtol=0)
    entries = vqgan.quantize.get_codebook_entry(golden["vq_indices"].flatten(), shape=(2, 16, 16, 256))
    torch.testing.assert_close(vqgan.decode(entries), golden["vq_decoded_from_indices"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@torch.no_grad()
def test_mage_encoder_decoder_loss(golden, mage, fused):
    set_fused_attention(mage, fused)
    try:
        encoded = mage.encode_tokens(golden["mage_token_indices"], golden["mage_drop_mask"])
        torch.testing.assert_close(encoded, golden["mage_encoder_out"], atol=ATOL, rtol=0)
        logits = mage.forward_decoder(golden["mage_encoder_out"], golden["mage_drop_mask"], golden["mage_all_mask"])
        torch.testing.assert_close(logits, golden["mage_logits"], atol=ATOL, rtol=0)
        loss = mage.forward_loss(golden["vq_indices"], golden["mage_logits"], golden["mage_all_mask"])
        torch.testing.assert_close(loss, golden["mage_loss"], atol=1e-5, rtol=0)
        step_logits = mage.predict_logits(golden["mage_gen_token_indices"][:, 1:])
        torch.testing.assert_close(step_logits, golden["mage_gen_logits"][:, 1:, :1024], atol=ATOL, rtol=0)
    finally:
        set_fused_attention(mage, True)


@torch.no_grad()
def test_forward_encoder_with_given_masks_matches_golden(golden, mage):
    masks = (golden["mage_drop_mask"], golden["mage_all_mask"])
    encoded, gt_indices, _, _ = mage.forward_encoder(golden["images"], masks=masks)
    assert (gt_indices == golden["vq_indices"]).float().mean() >= 0.99
    torch.testing.assert_close(encoded, golden["mage_encoder_out"], atol=ATOL, rtol=0)
    loss, _, token_all_mask = mage(golden["images"], masks=masks)
    torch.testing.assert_close(loss, golden["mage_loss"], atol=1e-4, rtol=0)
    assert torch.equal(token_all_mask, golden["mage_all_mask"])


def test_sincos_table(golden, mage):
    torch.testing.assert_close(get_2d_sincos_pos_embed(64, 16, cls_token=True), golden["pos_embed_sincos"],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(mage.pos_embed[0], golden["pos_embed_sincos"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix,global_pool", [("vit_gp", True), ("vit_cls", False)])
@torch.no_grad()
def test_classifier(golden, prefix, global_pool):
    model = vit_tiny_patch16(global_pool=global_pool, num_classes=golden["config"]["num_classes"])
    result = load_mage_checkpoint_into_classifier(model, {"model": golden["mage_state_dict"]})
    assert sorted(result.missing_keys) == sorted(golden[f"{prefix}_missing_keys_when_loading_mage"])
    model.load_state_dict(golden[f"{prefix}_head_state_dict"], strict=False)
    model.eval()
    features = model.forward_features(golden["images"])
    torch.testing.assert_close(features, golden[f"{prefix}_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model(golden["images"]), golden[f"{prefix}_logits"], atol=ATOL, rtol=0)
