"""Mixed precision: the --amp choices, autocast for any device, and the loss scaler."""
import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def default_amp():
    """bf16 where the default device supports it (CPU, or CUDA with bf16), else fp16."""
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16"


def amp_dtype(amp):
    """torch dtype for an --amp choice, or None for full precision."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp '{amp}', expected one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def autocast(device, amp):
    """torch.amp.autocast for `device` with the --amp dtype; disabled (explicitly) for 'none'."""
    device_type = torch.device(device).type
    dtype = amp_dtype(amp)
    if dtype is None:
        return torch.amp.autocast(device_type=device_type, enabled=False)
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


class NativeScalerWithGradNormCount:
    """backward + optional unscale/clip + step. A GradScaler is active only for fp16.

    Returns the gradient norm (before clipping) on update steps, None on accumulation steps.
    """
    state_dict_key = "amp_scaler"

    def __init__(self, amp="none", device="cpu"):
        self._scaler = torch.amp.GradScaler(device=torch.device(device).type, enabled=amp == "fp16")

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad is not None and clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.tensor(0.0)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        self._scaler.load_state_dict(state_dict)
