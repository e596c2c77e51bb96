"""Training-time masking follows the SPEC: exact counts, dropped within masked, class column never masked."""
import math

import torch

from models_mage import TruncatedNormal, mage_vit_tiny_patch16


def test_mask_counts_and_nesting():
    model = mage_vit_tiny_patch16()
    generator = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(50):
        drop, masked = model.sample_masks(8, torch.device("cpu"), generator)
        assert drop.shape == masked.shape == (8, 257)
        assert torch.all(drop[:, 0] == 0) and torch.all(masked[:, 0] == 0)
        assert torch.all(drop.sum(1) == 128)
        num_masked = masked.sum(1)
        assert torch.all(num_masked == num_masked[0])
        assert torch.all(drop <= masked), "every dropped position must also be masked"
        assert not torch.equal(masked[0], masked[1])  # positions are drawn per sample
        counts.add(int(num_masked[0]))
    assert len(counts) > 20  # one ratio per call, drawn afresh


def test_mask_ratio_distribution():
    dist = TruncatedNormal(0.5, 1.0, 0.55, 0.25)
    samples = dist.sample(200_000, generator=torch.Generator().manual_seed(1))
    assert samples.min() >= 0.5 and samples.max() <= 1.0
    assert abs(samples.mean().item() - dist.mean()) < 3e-3
    # mean of N(0.55, 0.25) truncated to [0.5, 1] (scipy.stats.truncnorm, which the reference samples from)
    assert abs(dist.mean() - 0.6936019) < 1e-6


def test_masked_count_is_ceil_of_ratio():
    model = mage_vit_tiny_patch16()
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    rate = float(model.mask_ratio_generator.sample(1, generator=generator)[0])
    generator.set_state(state)
    _, masked = model.sample_masks(2, torch.device("cpu"), generator)
    assert masked.sum(1)[0].item() == math.ceil(256 * rate)


def test_encoder_input_has_the_class_id_mask_ids_and_the_kept_tokens():
    """The ids forward_encoder feeds to the token embedding: class id first, the mask id at masked positions,
    the image's own tokens elsewhere; the dropped positions never reach the transformer."""
    model = mage_vit_tiny_patch16().eval()
    generator = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 1024, (2, 256), generator=generator)
    drop, masked = model.sample_masks(2, torch.device("cpu"), generator)
    seen = {}
    model.token_emb.register_forward_hook(lambda module, inputs, output: seen.update(ids=inputs[0]))
    model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.update(tokens=inputs[0].shape[1]))
    with torch.no_grad():
        encoded, *_ = model.forward_encoder(None, gt_indices=gt, masks=(drop, masked))
    expected = torch.cat([torch.full((2, 1), 1100), gt], dim=1)  # SPEC: fake_class_label 1100
    expected[masked.bool()] = 2024  # SPEC: mask_token_label
    assert torch.equal(seen["ids"], expected)
    assert seen["tokens"] == 1 + 256 - 128 and encoded.shape == (2, 1 + 256 - 128, 64)
