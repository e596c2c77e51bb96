"""MAGE-C contrastive branch: NT-Xent against a direct computation, gradients through the head, and the
global batch across processes (2 gloo processes x b rows == 1 process x 2b rows)."""
import math
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from util.contrastive import GlobalBatchNorm1d, ProjectionHead, info_nce, pooled_features


def loop_nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent and top-1 accuracy written out anchor by anchor, in float64 NumPy."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    count = z.shape[0]
    half = count // 2
    losses, hits = [], 0
    for i in range(count):
        positive = (i + half) % count
        others = [k for k in range(count) if k != i]
        similarity = {k: float(z[i] @ z[k]) / temperature for k in others}
        denominator = sum(math.exp(similarity[k]) for k in others)
        losses.append(-math.log(math.exp(similarity[positive]) / denominator))
        hits += max(others, key=lambda k: similarity[k]) == positive
    return sum(losses) / count, hits / count


def fixed_views(num_images=6, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(num_images, dim, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.9 * torch.randn(num_images, dim, generator=generator, dtype=torch.float64)  # noisy second view
    return z1, z2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_equals_direct_computation(temperature):
    z1, z2 = fixed_views()
    loss, accuracy = info_nce(z1, z2, temperature)
    expected_loss, expected_accuracy = loop_nt_xent(z1.numpy(), z2.numpy(), temperature)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert accuracy.item() == pytest.approx(expected_accuracy, abs=1e-12)
    assert 0 < expected_accuracy < 1  # the features rank some positives first and some not: the count is tested


def test_info_nce_rejects_bad_input():
    z1, z2 = fixed_views()
    with pytest.raises(ValueError, match="same shape"):
        info_nce(z1, z2[:-1])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z1, z2, temperature=0.0)


def test_projection_head_layout_and_pooling():
    head = ProjectionHead(768, 4096, 128, 3)  # CAN's projector for ViT-B
    kinds = [type(layer).__name__ for layer in head.mlp]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear", "GlobalBatchNorm1d", "ReLU", "Linear"]
    assert [tuple(layer.weight.shape) for layer in head.mlp if isinstance(layer, torch.nn.Linear)] == \
        [(4096, 768), (4096, 4096), (128, 4096)]
    assert [type(layer).__name__ for layer in ProjectionHead(8, 16, 4, 1).mlp] == ["Linear"]
    assert set(GlobalBatchNorm1d(5).state_dict()) == set(torch.nn.BatchNorm1d(5).state_dict())
    encoder_output = torch.stack([torch.full((4, 2), 100.0), torch.arange(8.0).reshape(4, 2)])
    encoder_output[1, 0] = 100.0  # class position: excluded from the pooled feature
    assert pooled_features(encoder_output)[1].tolist() == [4.0, 5.0]


def test_gradients_through_head_match_finite_differences():
    torch.manual_seed(0)
    head = ProjectionHead(5, 7, 3, 3).double()
    h1, h2 = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    names = ["mlp.0.weight", "mlp.1.weight", "mlp.6.bias"]
    params = {name: value.detach().clone().requires_grad_(True) for name, value in head.named_parameters()
              if name in names}

    def loss_of(h1, h2, *values):
        embeddings = torch.func.functional_call(head, dict(zip(names, values)), (torch.cat([h1, h2]),))
        return info_nce(embeddings[:4], embeddings[4:], temperature=0.2)[0]

    assert torch.autograd.gradcheck(loss_of, (h1, h2, *params.values()))


def _head_and_features(in_dim=5, num_images=6, seed=0):
    torch.manual_seed(seed)
    head = ProjectionHead(in_dim, 7, 4, 3).double()
    first_view = torch.randn(num_images, in_dim, dtype=torch.float64)
    second_view = first_view + 0.5 * torch.randn(num_images, in_dim, dtype=torch.float64)
    return head, torch.stack([first_view, second_view])  # (view, image, feature)


def _step(head, features, temperature):
    """One contrastive forward/backward; returns (loss, accuracy, {param: grad}, {buffer: value})."""
    num_images = features.shape[1]
    embeddings = head(torch.cat([features[0], features[1]]))  # both views in one batch, as in training
    loss, accuracy = info_nce(embeddings[:num_images], embeddings[num_images:], temperature)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in head.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in head.named_buffers() if "running" in name}
    return loss.detach(), accuracy, grads, buffers


def _two_process_worker(rank, world_size, rendezvous, head_state, features, temperature, out_path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        head = ProjectionHead(features.shape[-1], 7, 4, 3).double()
        head.load_state_dict(head_state)
        rows = features.shape[1] // world_size
        loss, accuracy, grads, buffers = _step(head, features[:, rank * rows:(rank + 1) * rows], temperature)
        for tensor in [loss, accuracy, *grads.values()]:  # DDP-style averaging of gradients (and of the logs)
            dist.all_reduce(tensor)
            tensor /= world_size
        if rank == 0:
            torch.save({"loss": loss, "accuracy": accuracy, "grads": grads, "buffers": buffers}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_with_b_rows_equal_one_process_with_2b_rows(tmp_path):
    """Negatives from every process, gradients back through the gather and global BatchNorm: 2 x b == 1 x 2b."""
    temperature = 0.1
    head, features = _head_and_features()
    head_state = {k: v.clone() for k, v in head.state_dict().items()}
    single_loss, single_accuracy, single_grads, single_buffers = _step(head, features, temperature)

    out_path = str(tmp_path / "two_processes.pt")
    context = mp.start_processes(_two_process_worker, nprocs=2, join=False, start_method="spawn",
                                 args=(2, str(tmp_path / "rendezvous"), head_state, features, temperature,
                                       out_path))
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the two-process run did not finish in 600 s")
    distributed = torch.load(out_path, weights_only=True)

    assert distributed["loss"].item() == pytest.approx(single_loss.item(), abs=1e-5)
    assert distributed["accuracy"].item() == pytest.approx(single_accuracy.item(), abs=1e-12)
    assert 0 < single_accuracy.item() < 1
    for name, grad in single_grads.items():
        assert torch.allclose(distributed["grads"][name], grad, rtol=0, atol=1e-5), name
        if name.endswith("weight"):  # (a bias right before BatchNorm has no gradient)
            assert grad.abs().max() > 1e-3, name  # a real gradient, not two zeros agreeing
    for name, value in single_buffers.items():
        assert torch.allclose(distributed["buffers"][name], value, rtol=0, atol=1e-5), name
