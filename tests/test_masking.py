"""Training-time masking follows the SPEC: exact counts, dropped within masked, class column never masked, one
mask ratio per group of rows of the global batch (as the reference's one per GPU), whatever the process count."""
import math

import pytest
import torch

from engine_pretrain import global_batch_masks, group_loss_weights, group_mask_rates
from models_mage import TruncatedNormal, mage_vit_tiny_patch16

CPU = torch.device("cpu")


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


@pytest.fixture(scope="module")
def tiny_mage():
    return mage_vit_tiny_patch16()


def masked_counts(model, local_bsz, group_size, step=0, rank=0, world=1):
    """Masked positions per row of this rank's rows, and the masks."""
    drop, masked = global_batch_masks(model, local_bsz, CPU, 0, 1, step, group_size, rank=rank, world=world)
    assert torch.all(drop.sum(1) == 128) and torch.all(drop <= masked)
    return masked.sum(1).long(), masked


def test_a_global_batch_of_128_gets_one_ratio_per_64_rows(tiny_mage):
    for step in range(3):
        counts, masked = masked_counts(tiny_mage, 128, 64, step)
        assert counts[:64].unique().numel() == 1 and counts[64:].unique().numel() == 1
        assert counts[0] != counts[64]  # two groups, two ratios
        assert len({tuple(row.tolist()) for row in masked}) == 128  # positions drawn per row
    counts, _ = masked_counts(tiny_mage, 100, 64)  # a last partial group draws its own ratio
    assert counts[:64].unique().numel() == 1 and counts[64:].unique().numel() == 1 and counts[0] != counts[64]


def test_group_at_least_the_global_batch_draws_one_ratio_per_batch(tiny_mage):
    for group_size in (128, 1000):
        counts, _ = masked_counts(tiny_mage, 128, group_size)
        assert counts.unique().numel() == 1


@pytest.mark.parametrize("group_size", [64, 3])
def test_two_processes_of_64_get_the_masks_of_one_process_of_128(tiny_mage, group_size):
    """DistributedSampler deals the global batch out round-robin: rank r holds global rows r, r + 2, ..."""
    _, single = masked_counts(tiny_mage, 128, group_size)
    for rank in (0, 1):
        _, own = masked_counts(tiny_mage, 64, group_size, rank=rank, world=2)
        assert torch.equal(own, single[rank::2])
    assert single[0::2].sum(1).unique().numel() > 1  # each rank's rows span several groups


def test_group_ratios_follow_the_truncated_normal():
    dist = TruncatedNormal(0.5, 1.0, 0.55, 0.25)
    rates = group_mask_rates(dist, 200_000, 1, seed=0, epoch=0, step=0)
    assert rates.min() >= 0.5 and rates.max() <= 1.0
    assert abs(rates.mean().item() - dist.mean()) < 3e-3
    again = group_mask_rates(dist, 8, 2, seed=0, epoch=0, step=0)
    assert torch.equal(again, rates[:4].repeat_interleave(2))  # group g's ratio: from (seed, epoch, step, g)
    assert not torch.equal(group_mask_rates(dist, 8, 2, seed=0, epoch=0, step=1), again)


def test_loss_is_the_mean_of_the_groups_masked_token_means_for_any_process_count(tiny_mage):
    """As the reference averages its GPUs' masked-token means, each group counts the same whatever its ratio; the
    processes' losses average (as DDP averages gradients) to the one-process loss. Groups of 3 rows out of 8: the
    processes hold unequal shares of the groups, and the last group is partial."""
    model, group_size = tiny_mage.eval(), 3
    tokens = torch.randint(0, 1024, (8, 256), generator=torch.Generator().manual_seed(0))

    def loss(rows, rank, world):
        masks = global_batch_masks(model, len(rows), CPU, 0, 1, 2, group_size, rank=rank, world=world)
        weights = group_loss_weights(masks[1], group_size, rank=rank, world=world)
        with torch.no_grad():
            return model(None, gt_indices=rows, masks=masks, loss_weights=weights)[0].item()

    with torch.no_grad():
        masks = global_batch_masks(model, 8, CPU, 0, 1, 2, group_size, rank=0, world=1)
        group_means = [model(None, gt_indices=tokens[g:g + group_size],
                             masks=tuple(m[g:g + group_size] for m in masks))[0].item()
                       for g in range(0, 8, group_size)]
    single = loss(tokens, 0, 1)
    assert single == pytest.approx(sum(group_means) / len(group_means), rel=1e-5)
    assert (sum(loss(tokens[rank::2], rank, 2) for rank in (0, 1)) / 2) == pytest.approx(single, rel=1e-5)
