"""Safe checkpoint reading, checked state-dict loading and atomic writing.

Every checkpoint in this project is read through `load_checkpoint`: `torch.load(weights_only=True)` with
`argparse.Namespace` allow-listed, so a file can never run code. Errors name the file and the problem.
"""
import argparse
import logging
import os
import pickle
import tempfile
import zipfile

import torch

logger = logging.getLogger(__name__)

torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, unsafe, or not matching the model."""


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint safely. Raises CheckpointError naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise CheckpointError(
            f"refusing to load '{path}': it contains pickled objects that are not plain tensors/containers "
            f"(loading it would execute code). {detail}".strip()) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint '{path}': the file is truncated, corrupt or not a PyTorch checkpoint "
            f"({first_line})") from None


def extract_model_state(checkpoint, source="checkpoint"):
    """The model state dict inside a checkpoint: `ckpt['model']`, `ckpt['state_dict']` or the dict itself."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: expected a dict, found {type(checkpoint).__name__}")
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f"{source}: no model weights found (looked for 'model', 'state_dict' or a bare "
                          f"state dict; top-level keys are {sorted(checkpoint)[:10]})")


def _top_level_names(model):
    names = {name for name, _ in model.named_children()}
    names.update(name for name, _ in model.named_parameters(recurse=False))
    names.update(name for name, _ in model.named_buffers(recurse=False))
    return names


def _format_keys(keys, limit=20):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(model, state_dict, source="checkpoint", allowed_missing=(),
                            ignore_foreign_modules=False):
    """Load `state_dict` into `model`, failing with the key names on any mismatch.

    allowed_missing: key prefixes that may be absent (e.g. a classifier head that is trained from scratch).
    ignore_foreign_modules: skip keys whose top-level module does not exist in `model` at all (the extra
    contrastive head of MAGE-C checkpoints) and log them; anything else unexpected is still an error.
    """
    model_state = model.state_dict()
    ignored = []
    if ignore_foreign_modules:
        own = _top_level_names(model)
        ignored = [k for k in state_dict if k not in model_state and k.split(".")[0] not in own]
        if ignored:
            logger.warning("%s: ignoring %d keys of modules this model does not have: %s",
                           source, len(ignored), _format_keys(ignored))
    state_dict = {k: v for k, v in state_dict.items() if k not in ignored}

    missing = [k for k in model_state if k not in state_dict and not k.startswith(tuple(allowed_missing))]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)})"
                  for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_format_keys(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    result = model.load_state_dict(state_dict, strict=False)
    return result, ignored


def load_mage_weights(model, state_dict, source, tokenizer_given=False, allowed_missing=()):
    """Load a MAGE checkpoint's state dict into a MAGE model: every key checked, the heads of MAGE-C logged and
    ignored. tokenizer_given: the model's tokenizer weights came from --vqgan_ckpt, so the checkpoint's
    vqgan.* are ignored (and may be absent)."""
    if tokenizer_given:
        logger.warning("%s: tokenizer weights from --vqgan_ckpt; ignoring the checkpoint's vqgan.*", source)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("vqgan.")}
        allowed_missing = (*allowed_missing, "vqgan.")
    return load_state_dict_checked(model, state_dict, source=source, allowed_missing=allowed_missing,
                                   ignore_foreign_modules=True)


def save_checkpoint_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a partial file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
