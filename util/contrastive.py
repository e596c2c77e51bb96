"""MAGE-C's contrastive branch: projection head, pooled encoder feature, and SimCLR's NT-Xent over the global batch.

The MAGE paper adds a contrastive loss on the encoder output; its head, temperature and weight are taken from
CAN's recipe (arXiv 2210.16870) where the stored copies of the MAGE paper are silent (docs/mage_c_recipe.md).

Every collective here works on any process group backend (gloo on CPU included) and passes gradients back
across processes, so that b rows on each of W processes give the loss and, after DDP's gradient averaging,
the gradients of one process holding all W*b rows.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from util.distributed import get_world_size

# CAN recipe (arXiv 2210.16870, as reimplemented by bwconrad/can): 3 linear layers, 4096 wide, 128 out, tau 0.1.
DEFAULT_HIDDEN_DIM = 4096
DEFAULT_OUT_DIM = 128
DEFAULT_NUM_LAYERS = 3
DEFAULT_TEMPERATURE = 0.1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum that every process used is the sum of their gradients."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    """Rows of every process, concatenated in rank order; each process gets back the gradient that all
    processes' losses send to its own rows.

    torch.distributed.nn.functional.all_gather does the same but is deprecated in this torch (a warning on
    every call) and its replacement is private; this uses only the public all_gather / all_reduce.
    """

    @staticmethod
    def forward(ctx, rows):
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        ctx.num_rows, ctx.rank = rows.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # (W*n, d): every process's loss gradient w.r.t. every row, summed
        start = ctx.rank * ctx.num_rows
        return grad[start:start + ctx.num_rows]


def _check_equal_rows(rows):
    """all_gather needs the same number of rows on every process; say so instead of hanging or failing deep."""
    counts = torch.tensor([rows.shape[0], -rows.shape[0]], device=rows.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0].item() != -counts[1].item():
        raise ValueError(f"info_nce: processes hold different batch sizes (from {-counts[1].item()} to "
                         f"{counts[0].item()} rows); the global batch needs the same per-process batch "
                         f"(drop_last=True)")


def gather_rows(rows):
    """(n, d) on each of W processes -> ((W*n, d) in rank order, index of this process's first row).

    Differentiable across processes. Without a process group (or with one process) returns (rows, 0).
    """
    if get_world_size() == 1:
        return rows, 0
    _check_equal_rows(rows)
    return _GatherRows.apply(rows), dist.get_rank() * rows.shape[0]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (all processes).

    SimCLR normalises its projector over the global batch; it also makes W processes x b rows equal one
    process x W*b rows. torch.nn.SyncBatchNorm does this only on GPUs (it refuses CPU tensors), so this
    computes the two moments with differentiable all-reduces and works on every device. With one process
    or in eval mode it is exactly nn.BatchNorm1d; its state_dict keys are nn.BatchNorm1d's.
    """

    def forward(self, x):
        world_size = get_world_size()
        if not self.training or world_size == 1:
            return super().forward(x)
        # x: (n, C) on this process; N = sum of n over processes. Moments in (at least) float32 under autocast.
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        total_rows = torch.tensor([float(x.shape[0])], device=x.device)
        dist.all_reduce(total_rows)
        total_rows = total_rows.item()
        if total_rows < 2:
            raise ValueError("GlobalBatchNorm1d: a training batch needs at least 2 rows in total")
        mean = _AllReduceSum.apply(x.sum(dim=0)) / total_rows  # (C,)
        centered = x - mean
        var = _AllReduceSum.apply((centered * centered).sum(dim=0)) / total_rows  # biased, as BatchNorm
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * total_rows / (total_rows - 1))
        y = centered * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


class ProjectionHead(nn.Module):
    """num_layers Linear layers; every one but the last followed by global-batch BatchNorm and ReLU.

    CAN's projector (the fallback recipe) is ProjectionHead(D, 4096, 128, 3):
    Linear(D, 4096)-BN-ReLU-Linear(4096, 4096)-BN-ReLU-Linear(4096, 128). Run both views through one call
    (torch.cat([view1, view2])) so that BatchNorm normalises over all 2N rows, as SimCLR does.
    """

    def __init__(self, in_dim, hidden_dim=DEFAULT_HIDDEN_DIM, out_dim=DEFAULT_OUT_DIM, num_layers=DEFAULT_NUM_LAYERS):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectionHead: num_layers must be >= 1, got {num_layers}")
        layers, dim = [], in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features):
        # features: (B, in_dim) -> (B, out_dim)
        return self.mlp(features)


def pooled_features(encoder_output):
    """Encoder output (B, 1 + kept, D) -> (B, D): mean over the image positions the encoder saw, class
    token excluded (CAN pools its encoder the same way; the linear probe's global pool also skips it)."""
    return encoder_output[:, 1:].mean(dim=1)


def info_nce(z1, z2, temperature=DEFAULT_TEMPERATURE):
    """SimCLR's NT-Xent over the global batch -> (loss, accuracy), both scalars.

    z1, z2: (n, d) embeddings of two views of the same n images on this process. Every one of the 2N global
    embeddings (N = n summed over processes) is an anchor; its positive is the other view of its image, its
    negatives the other 2N - 2 embeddings; similarity is cosine / temperature. The loss is the mean over this
    process's 2n anchors (DDP's gradient averaging turns it into the mean over all 2N); accuracy is the
    fraction of them whose positive ranks first (detached; the mean over processes is the global one).
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"info_nce: z1 and z2 must be (n, d) of the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    num_images = z1.shape[0]
    # Logits in (at least) float32 outside autocast: at tau = 0.1 a bf16 softmax over thousands of
    # candidates loses the positive's margin.
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2n, d)
        candidates, offset = gather_rows(anchors)  # (2N, d); this process's rows start at offset
        logits = anchors @ candidates.T / temperature  # (2n, 2N)
        rows = torch.arange(2 * num_images, device=anchors.device)
        self_columns = offset + rows
        positive_columns = offset + (rows + num_images) % (2 * num_images)
        logits = logits.index_put((rows, self_columns), torch.tensor(float("-inf"), device=logits.device,
                                                                     dtype=logits.dtype))
        loss = F.cross_entropy(logits, positive_columns)
        accuracy = (logits.detach().argmax(dim=1) == positive_columns).to(dtype).mean()
    return loss, accuracy
