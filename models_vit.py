"""ViT classifier on MAGE's token path (linear probe and fine-tuning), built on timm's VisionTransformer."""
import argparse
import logging
from functools import partial

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from models_mage import BertEmbeddings, MageAttention, TokenVocab, set_fused_attention
from taming.models.vqgan import build_vqgan, token_grid_size
from util.checkpoint import CheckpointError, extract_model_state, load_checkpoint, load_state_dict_checked
from util.pos_embed import interpolate_pos_embed

logger = logging.getLogger(__name__)


class VisionTransformerMage(VisionTransformer):
    """Images -> frozen VQGAN tokens -> [class id] + tokens -> token_emb -> timm blocks -> pooled features.

    timm's patch_embed, cls_token and pos_embed (224-pixel table) stay for checkpoint compatibility; the
    forward pass does not use them.
    """

    def __init__(self, global_pool=False, vqgan_config="config/vqgan.yaml", vqgan_ckpt_path=None,
                 token_dropout=0.1, **kwargs):
        kwargs.setdefault("attn_layer", MageAttention)
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)
        embed_dim = self.embed_dim
        self.global_pool_features = global_pool
        self.vqgan, vqgan_settings = build_vqgan(vqgan_config, vqgan_ckpt_path)
        self.grid_size = token_grid_size(vqgan_settings)
        self.vocab = TokenVocab(vqgan_settings["n_embed"])
        self.codebook_size = self.vocab.codebook_size
        self.fake_class_label = self.vocab.fake_class_label
        self.mask_token_label = self.vocab.mask_token_label
        self.token_emb = BertEmbeddings(self.vocab.size, embed_dim, self.grid_size ** 2 + 1, dropout=token_dropout)

    def train(self, mode=True):
        super().train(mode)
        self.vqgan.eval()
        return self

    def set_fused_attention(self, enabled):
        set_fused_attention(self, enabled)

    @torch.no_grad()
    def tokenize(self, imgs):
        """imgs (B, 3, H, W) -> (B, 1 + h*w) token ids with the class id in front."""
        _, _, (_, _, indices) = self.vqgan.encode(imgs)
        return self.vocab.with_class_token(indices.reshape(imgs.shape[0], -1))

    def forward_tokens(self, token_indices):
        """token_indices (B, 1 + L) -> pooled representation (B, D)."""
        x = self.token_emb(token_indices)  # (B, 1 + L, D)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.global_pool_features:
            return self.fc_norm(x[:, 1:].mean(dim=1))  # mean over image tokens, class token excluded
        return self.norm(x)[:, 0]

    def forward_features(self, imgs):
        # imgs: (B, 3, H, W) -> (B, D)
        return self.forward_tokens(self.tokenize(imgs))

    def forward_head(self, features, pre_logits=False):
        features = self.head_drop(features)
        return features if pre_logits else self.head(features)

    def forward(self, imgs):
        return self.forward_head(self.forward_features(imgs))


def _vit(embed_dim, depth, num_heads, **kwargs):
    return VisionTransformerMage(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_base_patch16(**kwargs):
    return _vit(768, 12, 12, **kwargs)


def vit_large_patch16(**kwargs):
    return _vit(1024, 24, 16, **kwargs)


def vit_tiny_patch16(**kwargs):
    """CPU preset matching mage_vit_tiny_patch16's encoder."""
    kwargs.setdefault("vqgan_config", "config/vqgan_tiny.yaml")
    return _vit(64, 2, 4, **kwargs)


def vit_demo(**kwargs):
    """Classifier matching mage_vit_demo's encoder (demo.py)."""
    kwargs.setdefault("vqgan_config", "config/vqgan_demo.yaml")
    return _vit(128, 6, 4, **kwargs)


MODELS = {
    "vit_base_patch16": vit_base_patch16,
    "vit_large_patch16": vit_large_patch16,
    "vit_tiny_patch16": vit_tiny_patch16,
    "vit_demo": vit_demo,
}


def load_mage_checkpoint_into_classifier(model, checkpoint, source=None):
    """Initialise a classifier from a MAGE pre-training checkpoint, the reference way.

    `checkpoint` is a path, a checkpoint dict or a state dict. A head of the wrong shape is dropped,
    pos_embed is resized, the load is non-strict (the MAGE decoder is left out), and the only keys allowed
    to stay missing are head.* (and fc_norm.* with global pooling). Returns the load result.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        source = source or str(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    source = source or "checkpoint"
    state_dict = dict(extract_model_state(checkpoint, source))
    model_state = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in state_dict and state_dict[key].shape != model_state[key].shape:
            logger.info("%s: dropping %s of shape %s (model needs %s)", source, key,
                        tuple(state_dict[key].shape), tuple(model_state[key].shape))
            del state_dict[key]
    interpolate_pos_embed(model, state_dict)

    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)})"
                  for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: shape mismatch: {', '.join(mismatched)}")
    state_dict = {k: v for k, v in state_dict.items() if k in model_state}
    allowed_missing = {"head.weight", "head.bias"}
    if model.global_pool_features:
        allowed_missing |= {"fc_norm.weight", "fc_norm.bias"}
    missing = sorted(k for k in model_state if k not in state_dict and k not in allowed_missing)
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        raise CheckpointError(f"{source} is not a MAGE checkpoint for {type(model).__name__}: missing keys: {shown}")
    return model.load_state_dict(state_dict, strict=False)


def load_finetuned_classifier(path, model_name=None):
    """A classifier fine-tuned by main_finetune.py (its checkpoint stores the training args) or a released
    fine-tuned ViT ({'model': ...} only; then `model_name` names the preset, the classes come from the head and
    the pooling from fc_norm). Returns (model with the weights loaded strictly, the args its evaluation needs:
    model, nb_classes, global_pool, input_size, interpolation, no_normalize)."""
    checkpoint = load_checkpoint(path)
    state_dict = extract_model_state(checkpoint, path)
    train_args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if model_name is not None or train_args is None:
        if model_name not in MODELS or "head.weight" not in state_dict:
            raise CheckpointError(f"'{path}' is not a main_finetune.py checkpoint (no 'args'): name its preset, "
                                  f"one of {sorted(MODELS)}, to read it as a released classifier")
        train_args = argparse.Namespace(
            model=model_name, nb_classes=state_dict["head.weight"].shape[0],
            global_pool="fc_norm.weight" in state_dict, vqgan_config="", input_size=256,
            interpolation="bicubic", no_normalize=False)  # main_finetune.py's evaluation defaults
    elif not hasattr(train_args, "nb_classes") or train_args.model not in MODELS:
        raise CheckpointError(f"'{path}' holds the args of another script, not of a main_finetune.py vit_* classifier")
    kwargs = {"vqgan_config": train_args.vqgan_config} if train_args.vqgan_config else {}
    model = MODELS[train_args.model](num_classes=train_args.nb_classes, global_pool=train_args.global_pool, **kwargs)
    load_state_dict_checked(model, state_dict, source=path)
    return model, train_args
