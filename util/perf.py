"""The speed flags, defined once for every script: autocast, attention kernel, tokenizer precision and layout,
optimizer kernel, torch.compile and activation checkpointing, plus `--reference_numerics`.

Each script takes the flags that act on what it runs (`add_perf_args(parser, flags)`), always with the
spellings, help and defaults below. `REFERENCE_NUMERICS` reproduces the reference computation (float32,
explicit softmax attention, contiguous NCHW, no compile, AdamW without fusion).
"""
import argparse

import torch

from util.precision import default_amp

# Codes of the trained demo tokenizer (config/vqgan_demo.yaml, 8x8 tokens) that stay as in float32, on 480
# held-out images, 2-core AMD EPYC CPU (docs/performance.md#tokenizer-precision has the command).
TOKENIZER_AGREEMENT = {"bf16_autocast": "98.0 %", "bf16": "97.9 %", "fp16": "99.8 %"}

TOKENIZER_DTYPES = {"fp32": torch.float32, "autocast": torch.float32, "bf16": torch.bfloat16,
                    "fp16": torch.float16}

PERF_FLAGS = {
    "amp": (("--amp",), dict(
        default=default_amp(), choices=("bf16", "fp16", "none"),
        help="autocast dtype (default: bf16 where the device has it, else fp16; fp16 adds a GradScaler; the "
             "attention softmax stays float32); none = float32")),
    "fused_attn": (("--fused_attn",), dict(
        action=argparse.BooleanOptionalAction, default=True,
        help="scaled_dot_product_attention; --no-fused_attn: the reference's explicit float32 softmax")),
    "tokenizer_dtype": (("--tokenizer_dtype",), dict(
        default="fp32", choices=tuple(TOKENIZER_DTYPES),
        help="precision of the frozen tokenizer. fp32 (default): float32, outside autocast; autocast: float32 "
             "weights under --amp (with --amp fp16 on a GPU, the reference's setting); bf16 / fp16: weights in "
             "that dtype, faster. Codes that stay as in fp32 (trained demo tokenizer, CPU): "
             + ", ".join(f"{name.replace('_', ' ')} {share}" for name, share in TOKENIZER_AGREEMENT.items()
                         ).replace("%", "%%")  # argparse formats help with %
             + ". Codes are always chosen by float32 distances")),
    "channels_last": (("--channels_last",), dict(
        action=argparse.BooleanOptionalAction, default=True,
        help="channels_last layout for the tokenizer's convolutions (rounding only)")),
    "fused_optimizer": (("--fused_optimizer",), dict(
        action=argparse.BooleanOptionalAction, default=True,
        help="fused AdamW kernel where the device has it, else foreach (rounding only)")),
    "compile": (("--compile",), dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile each transformer block (GPU)")),
    "grad_checkpointing": (("--grad_checkpointing",), dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="recompute block activations in backward: less memory (ViT-L at large batch)")),
}
ALL_FLAGS = tuple(PERF_FLAGS)
# What each kind of script runs: a frozen tokenizer only, a model without an optimizer, ...
TOKENIZER_FLAGS = ("amp", "tokenizer_dtype", "channels_last")
INFERENCE_FLAGS = ("amp", "fused_attn", "tokenizer_dtype", "channels_last", "compile")

REFERENCE_NUMERICS = dict(amp="none", fused_attn=False, channels_last=False, tokenizer_dtype="fp32",
                          compile=False, fused_optimizer=False)


def add_perf_args(parser, flags=ALL_FLAGS):
    """Add the speed flags `flags` (names of PERF_FLAGS) and --reference_numerics to `parser`."""
    unknown = set(flags) - set(PERF_FLAGS)
    if unknown:
        raise ValueError(f"unknown speed flags {sorted(unknown)}")
    group = parser.add_argument_group("speed (--reference_numerics turns every fast path off)")
    for name in PERF_FLAGS:
        if name in flags:
            option_strings, kwargs = PERF_FLAGS[name]
            group.add_argument(*option_strings, **kwargs)
    turned_off = ", ".join(f"--{k} {v}" if not isinstance(v, bool) else f"--{'' if v else 'no-'}{k}"
                           for k, v in REFERENCE_NUMERICS.items() if k in flags)
    group.add_argument("--reference_numerics", action="store_true",
                       help=f"the reference's numerics: {turned_off} (--grad_checkpointing stays as given)")
    return parser


def resolve_perf_args(args):
    """Apply --reference_numerics in place (to the flags the script has); call right after parsing."""
    if getattr(args, "reference_numerics", False):
        for key, value in REFERENCE_NUMERICS.items():
            if hasattr(args, key):
                setattr(args, key, value)
    return args


def configure_tokenizer(vqgan, args):
    """Set the frozen tokenizer's precision and layout from --tokenizer_dtype and --channels_last."""
    choice = getattr(args, "tokenizer_dtype", "fp32")
    return vqgan.set_inference_mode(TOKENIZER_DTYPES[choice], channels_last=getattr(args, "channels_last", False),
                                    follow_autocast=choice == "autocast")


def apply_perf_settings(model, args, device=None):
    """Configure a MAGE model or classifier (anything with `.vqgan` and `set_fused_attention`) for the chosen
    speed settings."""
    model.set_fused_attention(getattr(args, "fused_attn", True))
    configure_tokenizer(model.vqgan, args)
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
