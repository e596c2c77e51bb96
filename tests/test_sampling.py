"""The iterative-decoding sampler (util/sampling.py): schedule, sampling, confidence masking, determinism."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models_mage import mage_vit_tiny_patch16
from util.sampling import generate_images, image_generators, iterative_decode, mask_len_table


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mage_vit_tiny_patch16().eval()


class FixedLogits(nn.Module):
    """A stand-in generator whose codebook logits (L, K) are the same at every step and for every row."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)
        self.mask_token_label = logits.shape[-1] + 1
        self.seq_len = logits.shape[0]

    def predict_logits(self, token_ids):
        return self.logits.expand(token_ids.shape[0], -1, -1)


def reference_schedule(num_unknown, num_iter):
    """Still-masked counts after each step by the SPEC formula, computed the reference's way (NumPy)."""
    counts, unknown = [], num_unknown
    for step in range(num_iter - 1):
        mask_len = np.floor(num_unknown * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        unknown = int(max(1, min(unknown - 1, mask_len)))
        counts.append(unknown)
    return counts + [0]


def partial_tokens(model, unknown_counts, seed=0):
    """Rows of random known codes with `unknown_counts[i]` random positions set to the mask id."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.codebook_size, (len(unknown_counts), model.seq_len), generator=generator)
    for row, count in enumerate(unknown_counts):
        positions = torch.randperm(model.seq_len, generator=generator)[:count]
        ids[row, positions] = model.mask_token_label
    return ids


@pytest.mark.parametrize("num_iter", [1, 3, 8, 12, 20])
def test_masked_counts_follow_the_schedule_per_row(model, num_iter):
    unknown_counts = [256, 200, 100, 37, 5, 2, 1]
    ids = partial_tokens(model, unknown_counts)
    out, history = iterative_decode(model, ids, num_iter=num_iter, temperature=4.5,
                                    generator=torch.Generator().manual_seed(1), return_history=True)
    assert len(history) == num_iter
    known = ids != model.mask_token_label
    for row, num_unknown in enumerate(unknown_counts):
        counts = [int((h[row] == model.mask_token_label).sum()) for h in history]
        assert counts == reference_schedule(num_unknown, num_iter), (num_unknown, num_iter)
    previous_masked = ~known
    for h in history:
        masked = h == model.mask_token_label
        assert torch.equal(h[known], ids[known])  # known tokens never change
        assert not (masked & ~previous_masked).any()  # a decoded token is never masked again
        previous_masked = masked
    assert torch.equal(out, history[-1])
    assert (out < model.codebook_size).all()


def test_unconditional_schedule_matches_reference_numbers():
    table = mask_len_table(12, 256, "cpu")[:, 256].tolist()
    expected = [int(np.floor(256 * np.cos(math.pi / 2 * (t + 1) / 12))) for t in range(12)]
    assert table == expected
    assert table[:3] == [253, 247, 236] and table[-1] == 0


def test_sampling_follows_the_categorical_distribution():
    # Each step samples from softmax(logits) without temperature: one step, many rows, compare frequencies.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    fake = FixedLogits(logits)
    ids = torch.full((20000, 2), fake.mask_token_label)
    out = iterative_decode(fake, ids, num_iter=1, temperature=4.5, generator=torch.Generator().manual_seed(0))
    frequencies = torch.stack([torch.bincount(out[:, i], minlength=4) / out.shape[0] for i in range(2)])
    assert torch.allclose(frequencies, logits.softmax(-1), atol=0.015)


def test_least_confident_positions_are_masked_again_without_noise():
    # Position i picks code 0 with probability 1 - ~e^-gap_i; with temperature 0 the positions with the
    # smallest log-probability (smallest gap) are the ones masked again after step 0.
    gaps = torch.linspace(8.0, 16.0, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    logits = torch.stack([gaps, torch.zeros(16)], dim=1)
    fake = FixedLogits(logits)
    ids = torch.full((1, 16), fake.mask_token_label)
    _, history = iterative_decode(fake, ids, num_iter=4, temperature=0.0,
                                  generator=torch.Generator().manual_seed(0), return_history=True)
    num_masked = math.floor(16 * math.cos(math.pi / 2 * 0.25))
    remasked = (history[0][0] == fake.mask_token_label).nonzero().flatten()
    assert sorted(remasked.tolist()) == sorted(gaps.argsort()[:num_masked].tolist())


class RowwiseLogits(nn.Module):
    """A stand-in generator whose logits for a row are a table lookup of that row's own tokens: the same numbers
    in any batch, by construction (a real network's matmuls may round differently for another batch size)."""

    def __init__(self, seq_len=16, codebook_size=8, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mask_token_label = codebook_size
        self.seq_len = seq_len
        self.register_buffer("table", torch.randn(codebook_size + 1, codebook_size, generator=generator))
        self.register_buffer("position", torch.randn(seq_len, codebook_size, generator=generator))

    def predict_logits(self, token_ids):
        # token_ids: (B, L) -> logits (B, L, K); row b depends on token_ids[b] only
        neighbours = token_ids.roll(1, dims=1)
        return self.table[token_ids] + self.table[neighbours] + self.position


def test_image_depends_only_on_its_own_generator():
    fake = RowwiseLogits()

    def run(indices):
        ids = torch.full((len(indices), fake.seq_len), fake.mask_token_label)
        return iterative_decode(fake, ids, num_iter=4, temperature=4.5,
                                generator=image_generators(7, indices, "cpu"))

    together = run([0, 1, 2, 3])
    split = torch.cat([run([0]), run([1, 2, 3])])
    reversed_order = run([3, 2, 1, 0]).flip(0)
    assert torch.equal(together, split) and torch.equal(together, reversed_order)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together, run([4, 5, 6, 7]))


def test_no_global_rng_and_train_mode_restored(model):
    ids = torch.full((2, model.seq_len), model.mask_token_label)
    expected = iterative_decode(model, ids, num_iter=3, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    model.train()
    try:
        out = iterative_decode(model, ids, num_iter=3, generator=torch.Generator().manual_seed(3))
        assert model.training  # restored
    finally:
        model.eval()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, expected)  # dropout was off during decoding


def test_rows_without_unknown_tokens_are_returned_unchanged(model):
    ids = partial_tokens(model, [0, 50])
    out = iterative_decode(model, ids, num_iter=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], ids[0])
    assert (out[1] != model.mask_token_label).all()


def test_generate_images_decodes_the_sampled_tokens(model):
    images = generate_images(model, 2, num_iter=2, generator=torch.Generator().manual_seed(0))
    ids = iterative_decode(model, torch.full((2, model.seq_len), model.mask_token_label), num_iter=2,
                           generator=torch.Generator().manual_seed(0))
    # token k of a row is the codebook vector at grid row k // grid, column k % grid
    codes = model.vqgan.quantize.embedding.weight[ids]  # (2, L, C)
    grid = codes.view(2, model.grid_size, model.grid_size, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model.vqgan.decoder(grid).clamp(0, 1)
    assert images.shape == (2, 3, 256, 256)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)  # conv kernels vary with memory layout
