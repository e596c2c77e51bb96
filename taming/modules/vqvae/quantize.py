"""Vector quantizer of the MaskGIT-variant VQGAN (taming's VectorQuantizer2, legacy loss)."""
import torch
import torch.nn as nn


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e, e_dim, beta=0.25):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def nearest_codes(self, z_flat):
        """Index of the nearest code for each row of z_flat (N, e_dim), by squared Euclidean distance."""
        codebook = self.embedding.weight.float()
        with torch.autocast(z_flat.device.type, enabled=False):
            z_flat = z_flat.float()
            distances = (z_flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                         - 2 * z_flat @ codebook.t())
        return distances.argmin(dim=1)

    def forward(self, z):
        # z: (B, C, h, w) -> quantized (B, C, h, w), loss, (perplexity, min_encodings, indices (B*h*w,))
        z = z.permute(0, 2, 3, 1).contiguous()
        indices = self.nearest_codes(z.view(-1, self.e_dim))
        z_q = self.embedding(indices).view(z.shape).to(z.dtype)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape=None):
        """indices: (B*h*w,) or (B, h*w); shape: (B, h, w, C) -> (B, C, h, w)."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
