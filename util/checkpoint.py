"""Checkpoints: safe reading, checked state-dict loading, training save/resume, and the one atomic file write
(`write_atomic`) that every file the project writes whole goes through.

Every checkpoint in this project is read through `load_checkpoint`: `torch.load(weights_only=True)` with
`argparse.Namespace` allow-listed, so a file can never run code. Errors name the file and the problem.
"""
import argparse
import errno
import io
import json
import logging
import os
import pickle
import pickletools
import secrets
import shutil
import signal
import zipfile

import torch

from util.distributed import barrier, is_main_process
from util.errors import CheckpointError, DiskWriteError
from util.metrics import LOG_FILE, append_log

logger = logging.getLogger(__name__)

torch.serialization.add_safe_globals([argparse.Namespace])

CHECKPOINT_LAST = "checkpoint-last.pth"
TMP_SUFFIX = ".tmp"  # every temporary file of write_atomic ends so; a rerun may delete leftovers of a killed run


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint safely. Raises CheckpointError naming the file and the problem.

    mmap: map the tensors' bytes instead of reading them (cheap when only small entries are needed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        forbidden = next((line for line in lines if "GLOBAL" in line), "") or _forbidden_global(path)
        if forbidden:
            raise CheckpointError(
                f"refusing to load '{path}': it contains pickled objects that are not plain tensors/containers "
                f"(loading it would execute code). {forbidden}") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), "")
        raise CheckpointError(f"cannot read checkpoint '{path}': the file is corrupt or not a PyTorch checkpoint"
                              + (f" ({detail})" if detail else "")) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint '{path}': the file is truncated, corrupt or not a PyTorch checkpoint "
            f"({first_line})") from None


SAFE_MODULES = ("collections", "argparse", "_codecs", "numpy", "numpy.core.multiarray", "numpy._core.multiarray")
SCAN_BYTES = 2 ** 26


def _pickle_bytes(path):
    """The pickle stream of a checkpoint: data.pkl of a zip checkpoint, else the file's first SCAN_BYTES."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return archive.read(name)[:SCAN_BYTES] if name else b""
    with open(path, "rb") as f:
        return f.read(SCAN_BYTES)


def _forbidden_global(path):
    """'GLOBAL module.name' of the first import of code in the file's pickles (outside torch and plain
    containers), or '' when there is none: tells a file that would run code from a corrupt one, e.g. random
    bytes, which torch's unpickler rejects with the same exception."""
    stream = io.BytesIO(_pickle_bytes(path))
    strings = []
    for _ in range(8):  # the legacy format is a few pickles in a row
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    module, name = strings[-2:]
                else:
                    if isinstance(arg, str) and "UNICODE" in opcode.name:
                        strings.append(arg)
                    continue
                if not (module.startswith("torch") or module in SAFE_MODULES):
                    return f"Found GLOBAL {module}.{name}"
        except Exception:  # not (or no longer) a pickle stream: nothing more to find
            return ""
    return ""


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


def holds_tokenizer(path):
    """Whether the MAGE or classifier checkpoint at `path` holds tokenizer weights (vqgan.* keys). Cheap: a
    zip checkpoint (torch.save's format since 1.6) is memory-mapped, so only its keys are read; a legacy one is
    read whole."""
    checkpoint = load_checkpoint(path, mmap=zipfile.is_zipfile(path))
    return any(key.startswith("vqgan.") for key in extract_model_state(checkpoint, source=os.fspath(path)))


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


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
KILL_HOOK = "MAGE_TEST_KILL"  # "written:NAME" or "renamed:NAME": kill -9 this process there (failure tests)


def _kill_point(stage, path):
    """SIGKILL this process when $MAGE_TEST_KILL names this stage of writing this file: the tests' real kill
    between two writes (see docs/training.md#failures-and-what-survives-them)."""
    if os.environ.get(KILL_HOOK) == f"{stage}:{os.path.basename(path)}":
        os.kill(os.getpid(), signal.SIGKILL)


def format_bytes(count):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def disk_error(err):
    """The OSError meaning "disk full / quota / read-only" in err's chain of causes, or None. torch.save reports
    a full disk as RuntimeError('[enforce fail at inline_container.cc...]') raised while handling it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def write_atomic(path, write, sync=True, size_hint=None):
    """Write `path` through `write(file)` (a binary file) into a hidden temporary file in the same folder, then
    rename it over `path`. A crash at any point leaves either the previous file or the new one, never a
    partial file; a kill leaves the temporary file, which the next run in that folder removes
    (util.output_dir.remove_stale_temp_files).

    sync: fsync the file before and the folder after the rename, so the new file also survives a power loss.
    Bulk outputs that a rerun checks anyway (generated images) skip it: it costs a disk flush per file.
    size_hint: the bytes the file will take, for the message when the disk is full.
    A full or read-only disk raises DiskWriteError: one line with the file, the bytes needed and free, and
    that the previous file is intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    existed = os.path.exists(path)
    try:
        with open(tmp_path, "xb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        _kill_point("written", path)
        os.replace(tmp_path, path)
    except BaseException as err:
        written = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        cause = disk_error(err)
        if cause is None:
            raise
        needed = format_bytes(size_hint) if size_hint else f"at least {format_bytes(written)}"
        free = format_bytes(shutil.disk_usage(folder).free)
        kept = f"the previous {os.path.basename(path)} is intact" if existed else "no file was replaced"
        raise DiskWriteError(f"cannot write '{path}': {cause.strerror} ({needed} needed, {free} free); {kept}") \
            from None
    _kill_point("renamed", path)
    if sync:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def estimated_size(obj):
    """Bytes of the tensors in a nested checkpoint object (each storage once): about what torch.save writes."""
    storages = {}

    def visit(value):
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            storages[(storage.data_ptr(), value.device)] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(obj)
    return sum(storages.values()) + 4096


def expected_checkpoint_size(model, optimizer_moments=2):
    """Bytes of a training checkpoint of `model`: its state dict plus `optimizer_moments` float32 tensors per
    trainable parameter (2 for Adam/AdamW, 1 for LARS momentum)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return state + optimizer_moments * 4 * trainable


def save_checkpoint_atomic(obj, path):
    """torch.save through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f), size_hint=estimated_size(obj))


def save_json_atomic(path, obj, indent=2):
    """json.dump through write_atomic."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints: save every epoch, resume
# ----------------------------------------------------------------------------------------------------------

def milestone_due(args, epoch):
    """Whether epoch `epoch` keeps its own checkpoint-{epoch}.pth: every --save_every epochs and the last one."""
    save_every = getattr(args, "save_every", 0)
    return (save_every > 0 and epoch % save_every == 0) or epoch + 1 == args.epochs


def save_epoch(args, epoch, state, log_stats=None):
    """Write one epoch's files (rank 0 only), in this order: checkpoint-{epoch}.pth when it is a milestone, the
    epoch's log.txt line, then checkpoint-last.pth. "last" is written last, so whatever point a kill hits, the
    epoch of checkpoint-last.pth has its milestone and its log line; `repair_run_files` mends folders where that
    does not hold (written by an older version, or a file deleted by hand). `state` carries `log_stats` too, so
    that the log line can be written again from the checkpoint. Returns the checkpoint paths written."""
    paths = []
    try:
        if milestone_due(args, epoch):
            paths.append(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
            save_checkpoint_atomic(state, paths[-1])
        if log_stats is not None:
            _append_log_line(args, log_stats)
        paths.append(os.path.join(args.output_dir, CHECKPOINT_LAST))
        save_checkpoint_atomic(state, paths[-1])
    except DiskWriteError as err:
        last = os.path.join(args.output_dir, CHECKPOINT_LAST)
        previous = (f"{CHECKPOINT_LAST} of the previous epoch still loads: free some space, then rerun with "
                    f"--auto_resume") if os.path.isfile(last) else "no checkpoint of this run exists yet"
        raise DiskWriteError(f"epoch {epoch} not saved: {err}; {previous}") from None
    return paths


def _append_log_line(args, log_stats):
    try:
        append_log(args, log_stats)
    except OSError as err:
        cause = disk_error(err)
        if cause is None:
            raise
        path = os.path.join(args.output_dir, LOG_FILE)
        raise DiskWriteError(f"cannot append to '{path}': {cause.strerror} "
                             f"({format_bytes(shutil.disk_usage(args.output_dir).free)} free)") from None


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=None, log_stats=None, extra=None):
    """Write {model, optimizer, scaler, epoch, args, log_stats, **extra} atomically (rank 0).

    `extra`: more training state to resume, e.g. {"max_accuracy": 81.2} (load_model's `progress`).

    Without `name`: `save_epoch` (checkpoint-{epoch}.pth every --save_every epochs and after the last epoch, the
    log.txt line `log_stats`, then checkpoint-last.pth). With `name`: checkpoint-{name}.pth only. Returns the
    paths written.
    """
    if not args.output_dir:
        return []
    paths = []
    if is_main_process():
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                 "epoch": epoch, "args": args_for_checkpoint(args), "log_stats": log_stats, **(extra or {})}
        if name is not None:
            paths = [os.path.join(args.output_dir, f"checkpoint-{name}.pth")]
            save_checkpoint_atomic(state, paths[0])
        else:
            paths = save_epoch(args, epoch, state, log_stats)
    barrier()
    return paths


def read_log(output_dir):
    """(JSON entries of output_dir/log.txt, its raw text); a line cut short by a kill is left out of the entries."""
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.isfile(path):
        return [], ""
    with open(path) as f:
        text = f.read()
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries, text


def repair_run_files(args, path):
    """Make the output folder agree with its checkpoint-last.pth (`path`, epoch N) before a resumed run goes on:
    write checkpoint-N.pth when epoch N is a milestone and the file is missing, drop log.txt lines of epochs
    after N (a run killed before its "last" was written redoes them) and lines cut short, and add epoch N's line
    from the checkpoint's `log_stats` when it is missing. path '': a run starting from scratch, whose folder may
    only hold log lines of a run killed before its first checkpoint-last.pth; they are dropped.
    Rank 0, with the folder locked. Returns what it did."""
    checkpoint = load_checkpoint(path, mmap=True) if path else {"epoch": -1}  # mmap: the tensors stay on disk
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    if not isinstance(epoch, int):
        return []
    repaired = []
    milestone = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
    if path and milestone_due(args, epoch) and not os.path.isfile(milestone):
        with open(path, "rb") as source:
            write_atomic(milestone, lambda f: shutil.copyfileobj(source, f, 2 ** 24))
        repaired.append(f"wrote the missing {os.path.basename(milestone)} from {CHECKPOINT_LAST}")
    entries, text = read_log(args.output_dir)
    kept = [e for e in entries if not (isinstance(e.get("epoch"), int) and e["epoch"] > epoch)]
    if len(kept) < len(entries):
        repaired.append(f"dropped {len(entries) - len(kept)} log.txt lines of "
                        + (f"epochs after {epoch} (they are redone)" if path else "a run that saved no checkpoint"))
    if path and not any(e.get("epoch") == epoch for e in kept):
        log_stats = checkpoint.get("log_stats")
        if isinstance(log_stats, dict):
            kept.append(log_stats)
            repaired.append(f"restored the missing log.txt line of epoch {epoch} from {CHECKPOINT_LAST}")
        else:
            print(f"resume: log.txt has no line for epoch {epoch} and {CHECKPOINT_LAST} does not hold one")
    new_text = "".join(json.dumps(e) + "\n" for e in kept)
    if new_text != text:
        write_atomic(os.path.join(args.output_dir, LOG_FILE), lambda f: f.write(new_text.encode()))
    for line in repaired:
        print(f"{'resume' if path else 'start'}: {line}")
    return repaired


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
