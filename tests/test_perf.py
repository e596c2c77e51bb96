"""Fast paths keep the reference's results: golden parity with the fast kernels on, exact gradients with
activation checkpointing, float32 checkpoints from a bf16 tokenizer, and a working benchmark."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmark
from conftest import DATA_DIR
from models_mage import mage_vit_tiny_patch16, set_fused_attention


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(DATA_DIR, "mage_tiny_golden.pt"), weights_only=True)


@torch.no_grad()
def test_channels_last_tokenizer_matches_golden_in_fp32(golden):
    model = mage_vit_tiny_patch16()
    model.load_state_dict(golden["mage_state_dict"])
    model.eval().vqgan.set_inference_mode(torch.float32, channels_last=True)
    set_fused_attention(model, True)
    assert model.vqgan.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    quant, _, (_, _, indices) = model.vqgan.encode(golden["images"])
    assert (indices.reshape(2, -1) == golden["vq_indices"]).float().mean() >= 0.99
    torch.testing.assert_close(quant, golden["vq_quant"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.vqgan.decode(golden["vq_quant"]), golden["vq_decoded"], atol=1e-4, rtol=0)
    loss, _, _ = model(golden["images"], masks=(golden["mage_drop_mask"], golden["mage_all_mask"]))
    torch.testing.assert_close(loss, golden["mage_loss"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_tokenizer_keeps_float32_checkpoints_and_most_codes(golden):
    model = mage_vit_tiny_patch16()
    model.load_state_dict(golden["mage_state_dict"])
    model.eval().vqgan.set_inference_mode(torch.bfloat16, channels_last=True)
    state = model.state_dict()
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    torch.testing.assert_close(state["vqgan.quantize.embedding.weight"],
                               golden["mage_state_dict"]["vqgan.quantize.embedding.weight"], atol=1e-2, rtol=1e-2)
    agreement = (model.tokenize(golden["images"]) == golden["vq_indices"]).float().mean().item()
    assert agreement > 0.8, f"bf16 tokenizer agrees with fp32 codes on only {agreement:.1%}"


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = mage_vit_tiny_patch16().train()
    images = torch.rand(2, 3, 256, 256)
    masks = model.sample_masks(2, torch.device("cpu"), torch.Generator().manual_seed(0))
    gradients = []
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(1)  # same dropout draws
        loss, _, _ = model(images, masks=masks)
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_records_every_mode_and_task_with_their_flops(tmp_path):
    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(
        ["--model", "mage_vit_tiny_patch16", "--batch_size", "2", "--steps", "1", "--warmup", "0",
         "--tasks", "pretrain_cached", "--compare", "--json", str(out)])
    benchmark.main(args)
    results = json.loads(out.read_text())["results"]
    assert {mode: list(rows) for mode, rows in results.items()} == {"reference": ["pretrain_cached"],
                                                                    "fast": ["pretrain_cached"]}
    # the FLOPs of a training step on the tokens of one image, counted here
    model = mage_vit_tiny_patch16().train()
    with FlopCounterMode(display=False) as step_flops:
        model(None, gt_indices=torch.randint(0, 1024, (1, 256)))[0].backward()
    for mode in ("reference", "fast"):  # the same work whatever the numerics
        assert results[mode]["pretrain_cached"]["gflops_per_image"] == \
            pytest.approx(step_flops.get_total_flops() / 1e9, rel=1e-6)
