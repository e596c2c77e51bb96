"""Speed settings shared by every script: attention kernel, tokenizer precision/layout, optimizer kernel,
torch.compile and activation checkpointing.

`REFERENCE_NUMERICS` reproduces the reference computation (float32, explicit softmax attention, contiguous
NCHW, no compile); the defaults are the fast paths, each on only where it is safe.
"""
import argparse

import torch

REFERENCE_NUMERICS = dict(amp="none", fused_attn=False, channels_last=False, tokenizer_dtype="fp32",
                          compile=False, fused_optimizer=False)


def add_perf_args(parser):
    group = parser.add_argument_group("speed (defaults are the fast paths; --reference_numerics turns all off)")
    group.add_argument("--fused_attn", action=argparse.BooleanOptionalAction, default=True,
                       help="scaled_dot_product_attention; off: the reference's explicit float32 softmax")
    group.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                       help="channels_last layout for the tokenizer's convolutions")
    group.add_argument("--tokenizer_dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="precision of the frozen tokenizer; auto follows --amp (codes are always chosen "
                            "by float32 distances)")
    group.add_argument("--fused_optimizer", action=argparse.BooleanOptionalAction, default=True,
                       help="fused AdamW kernel where the device supports it (else foreach)")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (GPU)")
    group.add_argument("--grad_checkpointing", action="store_true",
                       help="recompute block activations in backward: less memory (ViT-L at large batch)")
    group.add_argument("--reference_numerics", action="store_true",
                       help="float32, explicit attention, contiguous NCHW, no compile: the reference's numbers")
    return parser


def resolve_perf_args(args):
    """Apply --reference_numerics in place; call right after parsing."""
    if getattr(args, "reference_numerics", False):
        for key, value in REFERENCE_NUMERICS.items():
            setattr(args, key, value)
    return args


def tokenizer_dtype(args, device):
    choice = getattr(args, "tokenizer_dtype", "auto")
    if choice == "auto":
        choice = {"bf16": "bf16", "fp16": "fp16" if torch.device(device).type == "cuda" else "fp32"}.get(
            getattr(args, "amp", "none"), "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def apply_perf_settings(model, args, device):
    """Configure a MAGE model or classifier (anything with `.vqgan` and `set_fused_attention`) for the chosen
    speed settings."""
    model.set_fused_attention(getattr(args, "fused_attn", True))
    model.vqgan.set_inference_mode(tokenizer_dtype(args, device), channels_last=getattr(args, "channels_last", False))
    if getattr(args, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    if getattr(args, "compile", False):
        compile_blocks(model)
    return model


def compile_blocks(model):
    """torch.compile each transformer block in place (shapes are static per block, so this compiles once)."""
    for name in ("blocks", "decoder_blocks"):
        blocks = getattr(model, name, None)
        if blocks is not None:
            for block in blocks:
                block.compile()


def adamw_kwargs(args, device):
    """fused=True where the fused AdamW kernel exists for this device, else foreach."""
    if getattr(args, "fused_optimizer", True) and torch.device(device).type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}
