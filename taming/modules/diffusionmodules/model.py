"""Encoder and decoder of the MaskGIT-variant VQGAN used by MAGE.

This is the architecture of `vqgan_jax_strongaug.ckpt` (converted from JAX), not the original taming VQGAN:
no attention blocks, bias-free 3x3 convolutions inside residual blocks, average-pool downsampling,
and `num_res_blocks` (not +1) blocks per decoder level.
"""
import torch.nn as nn
import torch.nn.functional as F


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x):
    return F.silu(x)  # swish: x * sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        if in_channels != out_channels:
            # Quirk of the released checkpoint: the 1x1 shortcut maps out->out and is applied to the
            # block's own output h, not to x. The weights were trained this way; keep it.
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            return self.nin_shortcut(h) + h
        return x + h


class Downsample(nn.Module):
    """2x2 average pooling; no parameters."""

    def forward(self, x):
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution with bias."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult=(1, 2, 4, 8), num_res_blocks, in_channels, z_channels, dropout=0.0,
                 double_z=False, resolution=None, out_ch=None, attn_resolutions=(), **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1, bias=False)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample()
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=1)

    def forward(self, x):
        # x: (B, 3, H, W) in [0, 1] -> (B, z_channels, H / 2^(L-1), W / 2^(L-1))
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, z_channels, dropout=0.0,
                 in_channels=None, resolution=None, double_z=False, attn_resolutions=(), **ignored):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
            if i_level != 0:
                level.upsample = Upsample(block_in)
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)  # up[i] is level i, run from the last level to the first
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z):
        # z: (B, z_channels, h, w) -> (B, out_ch, h * 2^(L-1), w * 2^(L-1)), roughly in [0, 1]
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.block_1(h))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for block in level.block:
                h = block(h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))
