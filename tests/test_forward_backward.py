"""Training step of the tiny preset on CPU in fp32 and under bf16 autocast."""
import pytest
import torch

from models_mage import mage_vit_tiny_patch16, set_fused_attention


# bf16 on a CPU without bf16 matrix units is emulated: the 256-pixel tokenizer then takes seconds
@pytest.mark.parametrize("dtype", [pytest.param(None, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_forward_backward(dtype, fused):
    torch.manual_seed(0)
    model = mage_vit_tiny_patch16().train()
    set_fused_attention(model, fused)
    assert not model.vqgan.training, "the tokenizer stays in eval mode"
    images = torch.rand(2, 3, 256, 256)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, _, mask = model(images, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert 5.0 < loss.item() < 9.0  # near log(1024) = 6.93 at initialisation
    loss.backward()
    assert all(p.grad is None for p in model.vqgan.parameters()), "no gradient may reach the tokenizer"
    assert not any(p.requires_grad for p in model.vqgan.parameters())
    for name in ("token_emb.word_embeddings.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                 "decoder_blocks.1.attn.proj.weight", "mlm_layer.fc.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_fused_and_explicit_attention_agree_under_bf16():
    torch.manual_seed(0)
    model = mage_vit_tiny_patch16().eval()
    ids = torch.randint(0, 1024, (2, 256))
    ids[:, ::3] = model.mask_token_label
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.predict_logits(ids).float()
        set_fused_attention(model, False)
        explicit = model.predict_logits(ids).float()
    assert (fused - explicit).abs().max() < 0.1
