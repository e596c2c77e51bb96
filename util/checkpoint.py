"""Checkpoints: safe reading, checked state-dict loading, training save/resume, and the one atomic file write
(`write_atomic`) that every file the project writes whole goes through.

Every checkpoint in this project is read through `load_checkpoint`: `torch.load(weights_only=True)` with
`argparse.Namespace` allow-listed, so a file can never run code. Errors name the file and the problem.
"""
import argparse
import json
import logging
import os
import pickle
import secrets
import zipfile

import torch

from util.distributed import barrier, is_main_process
from util.errors import CheckpointError

logger = logging.getLogger(__name__)

torch.serialization.add_safe_globals([argparse.Namespace])

CHECKPOINT_LAST = "checkpoint-last.pth"
TMP_SUFFIX = ".tmp"  # every temporary file of write_atomic ends so; a rerun may delete leftovers of a killed run


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


def write_atomic(path, write, sync=True):
    """Write `path` through `write(file)` (a binary file) into a hidden temporary file in the same folder, then
    rename it over `path`. A crash at any point leaves either the previous file or the new one, never a
    partial file.

    sync: fsync the file before and the folder after the rename, so the new file also survives a power loss.
    Bulk outputs that a rerun checks anyway (generated images) skip it: it costs a disk flush per file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with open(tmp_path, "xb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    if sync:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint_atomic(obj, path):
    """torch.save through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_json_atomic(path, obj, indent=2):
    """json.dump through write_atomic."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints: save every epoch, resume
# ----------------------------------------------------------------------------------------------------------

def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=None, extra=None):
    """Write {model, optimizer, scaler, epoch, args, **extra} atomically (rank 0).

    `extra`: more training state to resume, e.g. {"max_accuracy": 81.2} (load_model's `progress`).

    Without `name`: checkpoint-last.pth every epoch, plus checkpoint-{epoch}.pth every --save_every epochs and
    after the last epoch. With `name`: checkpoint-{name}.pth only. Returns the paths written.
    """
    if not args.output_dir:
        return []
    paths = []
    if is_main_process():
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                 "epoch": epoch, "args": args_for_checkpoint(args), **(extra or {})}
        if name is not None:
            names = [f"checkpoint-{name}.pth"]
        else:
            names = [CHECKPOINT_LAST]
            save_every = getattr(args, "save_every", 0)
            if (save_every > 0 and epoch % save_every == 0) or epoch + 1 == args.epochs:
                names.append(f"checkpoint-{epoch}.pth")
        for file_name in names:
            path = os.path.join(args.output_dir, file_name)
            save_checkpoint_atomic(state, path)
            paths.append(path)
    barrier()
    return paths


def checkpoint_path(args):
    """output_dir/checkpoint-last.pth when the run writes checkpoints, else ''."""
    return os.path.join(args.output_dir, CHECKPOINT_LAST) if getattr(args, "output_dir", "") else ""


def args_for_checkpoint(args):
    """A copy of args whose values are plain types (torch.device -> str) so weights_only loading accepts it."""
    plain = argparse.Namespace(**vars(args))
    for key, value in vars(plain).items():
        if isinstance(value, torch.device):
            setattr(plain, key, str(value))
    return plain


def resolve_resume_path(args):
    """The checkpoint --resume / --auto_resume point at, or '' for a fresh start."""
    resume = getattr(args, "resume", "")
    if resume:
        if os.path.isdir(resume):
            path = os.path.join(resume, CHECKPOINT_LAST)
            if not os.path.isfile(path):
                raise CheckpointError(f"--resume folder '{resume}' has no {CHECKPOINT_LAST}")
            return path
        return resume
    if getattr(args, "auto_resume", False) and args.output_dir:
        path = os.path.join(args.output_dir, CHECKPOINT_LAST)
        if os.path.isfile(path):
            return path
    return ""


def load_model(args, model_without_ddp, optimizer=None, loss_scaler=None, progress=None):
    """Resume from --resume (file or folder) or --auto_resume: model, optimizer, scaler; start at epoch + 1.

    `progress`: a dict of training state that save_model's `extra` stored (e.g. {"max_accuracy": 0.0}); its
    entries are replaced by the checkpoint's when training resumes. Returns the checkpoint path used, or ''
    when there is nothing to resume. Mismatching keys raise CheckpointError with the key names.
    """
    path = resolve_resume_path(args)
    if not path:
        return ""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"'{path}' is not a training checkpoint (no 'model' entry)")
    load_state_dict_checked(model_without_ddp, checkpoint["model"], source=path)
    print(f"Resumed model weights from {path}")
    if optimizer is not None and "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", False):
        optimizer.load_state_dict(checkpoint["optimizer"])
        args.start_epoch = checkpoint["epoch"] + 1
        if loss_scaler is not None and checkpoint.get("scaler") is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        if progress is not None:
            progress.update({key: checkpoint[key] for key in progress if key in checkpoint})
        print(f"Resumed optimizer and scaler; continuing at epoch {args.start_epoch}")
    return path
