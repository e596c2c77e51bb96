"""Training-time masking follows the SPEC: exact counts, dropped within masked, class column never masked."""
import math

import torch

from models_mage import TruncatedNormal, mage_vit_tiny_patch16


def test_mask_counts_and_nesting():
    model = mage_vit_tiny_patch16()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        drop, masked = model.sample_masks(8, torch.device("cpu"), generator)
        assert drop.shape == masked.shape == (8, 257)
        assert torch.all(drop[:, 0] == 0) and torch.all(masked[:, 0] == 0)
        assert torch.all(drop.sum(1) == 128)
        num_masked = masked.sum(1)
        assert torch.all(num_masked == num_masked[0])
        ratio_lower, ratio_upper = (num_masked[0].item() - 1) / 256, num_masked[0].item() / 256
        assert 128 <= num_masked[0] <= 256 and ratio_upper >= 0.5 and ratio_lower < 1.0
        assert torch.all(drop <= masked), "every dropped position must also be masked"


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


def test_masked_inputs_use_mask_label():
    model = mage_vit_tiny_patch16().eval()
    generator = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 1024, (2, 256), generator=generator)
    drop, masked = model.sample_masks(2, torch.device("cpu"), generator)
    ids = model.with_class_token(gt).masked_fill(masked.bool(), model.mask_token_label)
    assert torch.all(ids[:, 0] == model.fake_class_label)
    assert torch.equal(ids == model.mask_token_label, masked.bool())
    with torch.no_grad():
        encoded, *_ = model.forward_encoder(None, gt_indices=gt, masks=(drop, masked))
    assert encoded.shape == (2, 1 + 256 - 128, 64)
