"""Fixed 2-D sin-cos position tables (MAE convention) and position-table resizing for checkpoint loading."""
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def get_1d_sincos_pos_embed(embed_dim, positions):
    """positions: (M,) float64 -> (M, embed_dim): [sin(p * w), cos(p * w)], w = 1 / 10000^(2i / embed_dim)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """(grid_size^2 [+1], embed_dim) float32 table; first half encodes the column, second half the row;
    with cls_token a leading row of zeros."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                       get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()


def interpolate_pos_embed(model, state_dict):
    """Resize state_dict['pos_embed'] (1, extra + n*n, D) to the model's grid with bicubic interpolation."""
    if "pos_embed" not in state_dict or not hasattr(model, "pos_embed"):
        return
    checkpoint_table = state_dict["pos_embed"]
    embed_dim = checkpoint_table.shape[-1]
    num_extra = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    old_size = int((checkpoint_table.shape[-2] - num_extra) ** 0.5)
    new_size = int(model.patch_embed.num_patches ** 0.5)
    if old_size == new_size:
        return
    logger.info("position table resized from %dx%d to %dx%d", old_size, old_size, new_size, new_size)
    extra_tokens = checkpoint_table[:, :num_extra]
    grid = checkpoint_table[:, num_extra:].reshape(-1, old_size, old_size, embed_dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(checkpoint_table.dtype)
    state_dict["pos_embed"] = torch.cat([extra_tokens, grid], dim=1)
