"""The VQGAN tokenizer as a plain nn.Module (MaskGIT variant: no quant_conv / post_quant_conv)."""
import contextlib
import os

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from util.checkpoint import load_checkpoint, load_state_dict_checked


class VQModel(nn.Module):
    def __init__(self, ddconfig, n_embed, embed_dim, ckpt_path=None):
        super().__init__()
        ddconfig = dict(ddconfig)
        if ddconfig.get("z_channels", embed_dim) != embed_dim:
            raise ValueError(f"ddconfig.z_channels ({ddconfig['z_channels']}) must equal embed_dim ({embed_dim}): "
                             "this VQGAN has no quant_conv between the encoder and the codebook")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        self.compute_dtype = torch.float32
        self.follow_autocast = True  # trained like any module; set_inference_mode() pins a frozen one
        self.memory_format = torch.contiguous_format
        # Checkpoints always hold float32 weights, whatever dtype the frozen tokenizer computes in.
        self._register_state_dict_hook(_state_dict_in_float32)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path)

    def set_inference_mode(self, dtype=torch.float32, channels_last=False, follow_autocast=False):
        """Precision and layout of the frozen tokenizer.

        float32 (the default): the tokenizer computes in float32 even inside an autocast region, so its codes
        do not depend on the script's --amp. follow_autocast=True keeps float32 weights but lets a surrounding
        autocast run the convolutions (the reference trained under fp16 autocast this way). bfloat16 / float16:
        weights in that dtype, so GroupNorm and the convolutions run natively (fast, ~2 % of codes change).
        Codes are always chosen by float32 distances; checkpoints always hold float32.
        """
        self.compute_dtype = dtype
        self.follow_autocast = follow_autocast
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self.to(dtype=dtype, memory_format=self.memory_format)

    def precision(self, x):
        """The autocast state the tokenizer computes in: autocast off for float32 unless following it."""
        if self.compute_dtype == torch.float32 and not self.follow_autocast:
            return torch.autocast(x.device.type, enabled=False)
        return contextlib.nullcontext()

    def init_from_ckpt(self, path):
        """Strict load of a tokenizer file: `{'state_dict': sd}` (the release) or a bare state dict."""
        checkpoint = load_checkpoint(path)
        state_dict = checkpoint.get("state_dict", checkpoint)
        load_state_dict_checked(self, state_dict, source=path)

    def encode(self, x):
        # x: (B, 3, H, W) in [0, 1] -> quant (B, C, h, w), emb_loss, (perplexity, min_encodings, indices)
        with self.precision(x):
            return self.quantize(self.encoder(x.to(self.compute_dtype, memory_format=self.memory_format)))

    def decode(self, quant):
        # quant: (B, C, h, w) -> (B, 3, H, W) float32, roughly in [0, 1]
        with self.precision(quant):
            return self.decoder(quant.to(self.compute_dtype, memory_format=self.memory_format)).float()

    def decode_code(self, indices, grid_size):
        """indices: (B, h*w) token ids -> images (B, 3, H, W)."""
        shape = (indices.shape[0], grid_size, grid_size, self.quantize.e_dim)
        return self.decode(self.quantize.get_codebook_entry(indices.reshape(-1), shape=shape))

    def forward(self, x):
        quant, emb_loss, _ = self.encode(x)
        return self.decode(quant), emb_loss


def _state_dict_in_float32(module, state_dict, prefix, local_metadata):
    for key, value in state_dict.items():
        if key.startswith(prefix) and value.is_floating_point() and value.dtype != torch.float32:
            state_dict[key] = value.float()
    return state_dict


PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_config_path(path):
    """A config path as given if it exists, else relative to this repository (so 'config/vqgan.yaml' works
    from any working directory)."""
    path = os.fspath(path)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    return os.path.join(PACKAGE_ROOT, path)


def load_vqgan_config(config):
    """Tokenizer settings {'ddconfig', 'n_embed', 'embed_dim'} from a YAML path shaped like config/vqgan.yaml,
    or from an already loaded mapping of that shape (whole file, or its `model.params` part)."""
    if isinstance(config, (str, os.PathLike)):
        path = resolve_config_path(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer config '{config}' not found (also looked at '{path}')")
        config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(dict(config))
    params = config.model.params if "model" in config else config
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise ValueError(f"tokenizer config lacks {missing}; expected the shape of config/vqgan.yaml")
    return {"ddconfig": OmegaConf.to_container(params.ddconfig, resolve=True),
            "n_embed": int(params.n_embed), "embed_dim": int(params.embed_dim)}


def token_grid_size(vqgan_config):
    """Side of the token grid: resolution / 2^(len(ch_mult) - 1)."""
    ddconfig = vqgan_config["ddconfig"]
    return ddconfig["resolution"] // 2 ** (len(ddconfig["ch_mult"]) - 1)


def build_vqgan(config, ckpt_path=None):
    """A frozen tokenizer in eval mode, computing in float32 (see set_inference_mode), from a config path or
    mapping, optionally loading a checkpoint."""
    settings = load_vqgan_config(config)
    vqgan = VQModel(settings["ddconfig"], settings["n_embed"], settings["embed_dim"], ckpt_path=ckpt_path)
    vqgan.eval()
    vqgan.requires_grad_(False)
    vqgan.set_inference_mode()
    return vqgan, settings
