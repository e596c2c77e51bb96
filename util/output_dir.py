"""The output folder of a run: checked before any work, locked while the run writes, cleaned of what killed saves
left behind, and never silently started over.

`check_output_dir` (in util.run.setup_run, before any work) writes nothing: it refuses an --output_dir that is a
file or not writable, one that holds an earlier run's checkpoints without --resume / --auto_resume / --overwrite,
and one that another run holds. `open_output_dir` (where the script starts writing, after its usage checks)
creates the folder and, on rank 0, takes its lock for the rest of the process, removes stale temporary files,
applies --overwrite, repairs a folder being resumed (util.checkpoint.repair_run_files) and warns when the disk is
short of space.

The lock is `fcntl.flock` on OUTPUT_DIR/.lock, which holds the pid and host of the run that has it. The kernel
drops it when that process ends, however it ends, so a killed run never leaves a folder locked; a run that ends
normally deletes the file.
"""
import fcntl
import glob
import os
import re
import shutil
import socket
import tempfile

from util.checkpoint import CHECKPOINT_LAST, TMP_SUFFIX, format_bytes, repair_run_files, resolve_resume_path
from util.distributed import barrier, is_main_process
from util.errors import UsageError
from util.metrics import LOG_FILE

LOCK_FILE = ".lock"
# the temporary files of util.checkpoint.write_atomic: .NAME.PID.HEX.tmp (older versions: .NAME.PID.tmp)
STALE_TEMP = re.compile(r"^\..+\.\d+(\.[0-9a-f]+)?" + re.escape(TMP_SUFFIX) + "$")
CHECKPOINT_PATTERN = "checkpoint-*.pth"

_held = {}  # real path of a folder -> its DirectoryLock, for the folders this process has locked


class OutputDirError(UsageError):
    """An output folder that this run must not use: a file, not writable, in use, or holding another run."""


class DirectoryLock:
    """An exclusive, non-blocking flock on FOLDER/.lock; the file records the holder's pid and host and is
    deleted on release (a killed holder leaves it behind, unlocked: the next run takes it over)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None

    def acquire(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirError(in_use_message(self.folder)) from None
            try:  # the file may have been deleted by a holder releasing it between our open and our flock
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.path)  # while still holding it, so no other run holds a deleted file
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def in_use_message(folder):
    try:
        with open(os.path.join(folder, LOCK_FILE)) as f:
            holder = f.read().strip() or "pid unknown"
    except OSError:
        holder = "pid unknown"
    return (f"--output_dir '{folder}' is in use by another run ({holder}); wait for it to end, or give this run "
            f"another folder")


def probe_lock(folder):
    """OutputDirError when another process holds FOLDER/.lock; takes nothing and writes nothing."""
    path = os.path.join(folder, LOCK_FILE)
    if os.path.realpath(folder) in _held or not os.path.isfile(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputDirError(in_use_message(folder)) from None
    finally:
        os.close(fd)  # also releases the probe's lock


def lock_output_dir(folder):
    """Lock `folder` (which exists) for the rest of this process, or until release_output_dirs(). A folder this
    process already holds stays held (a script run twice in one process, as the demo and the tests do)."""
    key = os.path.realpath(folder)
    if key not in _held:
        _held[key] = DirectoryLock(folder).acquire()
    return _held[key]


def release_output_dirs():
    """Release every folder lock this process holds (after in-process runs of the scripts' main())."""
    while _held:
        _held.popitem()[1].release()


def check_writable_folder(folder, flag="--output_dir"):
    """OutputDirError unless `folder` is, or can be created as, a folder this process can write to.

    Writes nothing that stays: it creates and deletes one empty file in the folder or its nearest existing
    parent, which catches read-only mounts, permissions and full inode tables alike."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputDirError(f"{flag} '{folder}' is a file, not a folder")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputDirError(f"{flag} '{folder}' cannot be created: '{existing}' is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputDirError(f"{flag} '{folder}' is not writable: {err.strerror} ('{existing}')") from None


def earlier_checkpoints(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(folder), CHECKPOINT_PATTERN)))


def _launcher_rank():
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def check_output_dir(args):
    """Usage checks of args.output_dir before any work (nothing is written):

    - it must not be a file and must be writable;
    - in scripts with --overwrite (the training scripts), a folder holding checkpoint-*.pth of an earlier run
      needs --resume, --auto_resume or --overwrite: a rerun never replaces a trained checkpoint silently;
    - no other run may hold its lock (checked by the launcher's rank 0).
    """
    folder = getattr(args, "output_dir", "")
    if not folder:
        return
    check_writable_folder(folder)
    resuming = getattr(args, "resume", "") or getattr(args, "auto_resume", False)
    if getattr(args, "overwrite", False) and resuming:
        raise OutputDirError("--overwrite starts over; it cannot go with --resume or --auto_resume")
    if hasattr(args, "overwrite") and not (args.overwrite or getattr(args, "resume", "")
                                           or getattr(args, "auto_resume", False)):
        found = earlier_checkpoints(folder)
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise OutputDirError(f"--output_dir '{folder}' holds {shown} of an earlier run: pass --auto_resume to "
                                 f"continue it, --overwrite to start over (deleting its checkpoints and log.txt), or "
                                 f"another --output_dir")
    if _launcher_rank() == 0 and os.path.isdir(folder):
        probe_lock(folder)


def remove_stale_temp_files(folder):
    """Delete the temporary files that killed saves (util.checkpoint.write_atomic) left in `folder` (not its
    subfolders). Only call it while holding the folder's lock: no other run writes there then."""
    names = sorted(n for n in os.listdir(folder) if STALE_TEMP.match(n))
    freed = 0
    for name in names:
        path = os.path.join(folder, name)
        freed += os.path.getsize(path)
        os.remove(path)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(f"removed {len(names)} temporary files of interrupted saves from '{folder}' ({format_bytes(freed)}): "
              f"{shown}")
    return names


def _start_over(folder):
    """--overwrite: delete the earlier run's checkpoints and log.txt."""
    doomed = earlier_checkpoints(folder) + ([LOG_FILE] if os.path.isfile(os.path.join(folder, LOG_FILE)) else [])
    for name in doomed:
        os.remove(os.path.join(folder, name))
    if doomed:
        print(f"--overwrite: deleted {', '.join(doomed)} of an earlier run from '{folder}'")


def _prepare_training_folder(args, folder):
    """--overwrite, or the repair of a folder that the run resumes from (util.checkpoint.repair_run_files)."""
    resume_path = resolve_resume_path(args)
    if args.overwrite and not resume_path:
        _start_over(folder)
    if not resume_path:
        repair_run_files(args, "")  # log lines of a run killed before its first checkpoint-last.pth
    elif os.path.realpath(resume_path) == os.path.realpath(os.path.join(folder, CHECKPOINT_LAST)):
        repair_run_files(args, resume_path)


def warn_if_short_of_space(folder, expected_bytes):
    """Warn when the disk of `folder` has less than twice `expected_bytes` free (a save writes the new file
    next to the old one before replacing it)."""
    free = shutil.disk_usage(folder).free
    if expected_bytes and free < 2 * expected_bytes:
        print(f"WARNING: {format_bytes(free)} free on the disk of '{folder}', less than twice the "
              f"{format_bytes(expected_bytes)} of a checkpoint: saves may fail (the previous checkpoint stays "
              f"intact if they do)")


def open_folder(folder, subfolders=()):
    """Create `folder`, lock it for this process (OutputDirError naming the holder when another run has it) and
    remove the stale temporary files in it and in `subfolders` (rank 0; util.generation calls it directly)."""
    os.makedirs(folder, exist_ok=True)
    lock_output_dir(folder)
    for sub in ("", *subfolders):
        if os.path.isdir(os.path.join(folder, sub)):
            remove_stale_temp_files(os.path.join(folder, sub))


def open_output_dir(args, folder=None, subfolders=(), expected_bytes=None):
    """Start writing to `folder` (default args.output_dir); every process calls it, rank 0 does the work:

    create it, lock it (OutputDirError naming the holder when another run has it), remove stale temporary files
    (also in `subfolders`), apply --overwrite, repair the folder when the run resumes from its own
    checkpoint-last.pth, and warn when free space is below twice `expected_bytes` (one checkpoint).
    Returns the folder ('' when there is none)."""
    folder = folder or getattr(args, "output_dir", "")
    if not folder:
        return ""
    if is_main_process():
        open_folder(folder, subfolders)
        if hasattr(args, "auto_resume"):  # a training script
            _prepare_training_folder(args, folder)
        warn_if_short_of_space(folder, expected_bytes)
    barrier()
    return folder
