"""What survives kills, concurrent runs, reruns, read-only and full disks (README "Failures")."""
import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_pretrain
from conftest import REPO_ROOT, write_image_folder
from train_support import (file_sha256 as sha256, max_abs_difference, parse, pretrain_args, run_script, script_env)
from util.checkpoint import (CHECKPOINT_LAST, KILL_HOOK, expected_checkpoint_size, load_checkpoint,
                             repair_run_files, save_checkpoint_atomic)
from util.errors import DiskWriteError, TrainingError, UsageError
from util.output_dir import (LOCK_FILE, DirectoryLock, OutputDirError, check_output_dir, open_output_dir,
                             release_output_dirs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("shapes"), splits=(("train", 4),))


def log_epochs(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line)["epoch"] for line in f]


def temp_files(folder):
    return glob.glob(os.path.join(folder, "**", ".*.tmp"), recursive=True)


def training_args(folder, **flags):
    values = dict(output_dir=str(folder), overwrite=False, resume="", auto_resume=False, save_every=1, epochs=10)
    return argparse.Namespace(**{**values, **flags})


def start_script(script, argv, **env):
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, script), *map(str, argv)], cwd=REPO_ROOT,
                            env=script_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lock(folder, process, timeout=240):
    """Wait until `process` holds FOLDER/.lock (its pid is written in it)."""
    path = os.path.join(folder, LOCK_FILE)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(path) and f"pid {process.pid} " in open(path).read():
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never took the lock (exit status {process.poll()})")


# ----------------------------------------------------------------------------------------------------------
# fast checks of the pieces
# ----------------------------------------------------------------------------------------------------------

def test_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    first = DirectoryLock(str(tmp_path)).acquire()
    with pytest.raises(OutputDirError, match=rf"in use by another run \(pid {os.getpid()} on "):
        DirectoryLock(str(tmp_path)).acquire()  # another open file: flock refuses it as it would another process
    first.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)  # a run that ends leaves no lock file
    DirectoryLock(str(tmp_path)).acquire().release()


def test_a_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    check_output_dir(training_args(tmp_path))  # empty: fine
    save_checkpoint_atomic({"epoch": 59}, tmp_path / CHECKPOINT_LAST)
    with pytest.raises(OutputDirError, match="holds checkpoint-last.pth of an earlier run: pass --auto_resume"):
        check_output_dir(training_args(tmp_path))
    for flags in ({"auto_resume": True}, {"resume": str(tmp_path)}, {"overwrite": True}):
        check_output_dir(training_args(tmp_path, **flags))
    with pytest.raises(OutputDirError, match="--overwrite starts over"):
        check_output_dir(training_args(tmp_path, overwrite=True, auto_resume=True))


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(OutputDirError, match="is a file"):
            check_output_dir(training_args(folder))


def test_stale_temp_files_are_removed_at_start(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    stale = [tmp_path / ".checkpoint-last.pth.4242.0123abcd.tmp", tmp_path / "images" / ".00007.png.77.89abcdef.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "images" / "00007.png", tmp_path / "checkpoint-last.pth"]
    for path in stale + kept:
        path.write_bytes(b"x" * 1000)
    try:
        open_output_dir(argparse.Namespace(output_dir=""), folder=str(tmp_path), subfolders=("images",))
    finally:
        release_output_dirs()
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in kept)
    assert "removed 1 temporary files of interrupted saves" in capsys.readouterr().out


def test_no_script_runs_on_a_random_tokenizer_unless_asked(tmp_path, tokenizer_config):
    """Every script that builds the tokenizer needs its weights: --vqgan_ckpt, or a checkpoint it loads holding
    vqgan.* (--finetune, --ckpt); otherwise a usage error naming the flag before anything is written, unless
    --random_tokenizer (--random_init for generation) asks for random weights. main_pretrain.py: test_pretrain."""
    import edit_img
    import gen_img_cond
    import gen_img_uncond
    import main_cache_tokens
    import main_finetune
    import main_linprobe
    import models_mage
    data = write_image_folder(tmp_path / "data", splits=(("train", 1), ("val", 1)), size=32)
    image = glob.glob(os.path.join(data, "val", "*", "*.png"))[0]
    torch.manual_seed(0)
    weights = models_mage.mage_vit_tiny_patch16(vqgan_config=tokenizer_config).state_dict()
    full, bare = str(tmp_path / "mage.pth"), str(tmp_path / "mage_without_tokenizer.pth")
    torch.save({"model": weights}, full)
    torch.save({"model": {k: v for k, v in weights.items() if not k.startswith("vqgan.")}}, bare)
    out = tmp_path / "out"
    common = ["--vqgan_config", tokenizer_config, "--device", "cpu", "--output_dir", str(out)]
    classifier = ["--model", "vit_tiny_patch16", "--input_size", "32", "--data_path", data, "--nb_classes", "4"]
    generator = ["--model", "mage_vit_tiny_patch16"]
    cases = [  # module, its usage check, flags, (flags without a tokenizer, refused), (flags with one, accepted)
        (main_cache_tokens, "check_args", ["--data_path", data], [[]], [["--random_tokenizer"]]),
        (main_linprobe, "check_args", classifier, [[], ["--finetune", bare]],
         [["--finetune", full], ["--random_tokenizer"]]),
        (main_finetune, "check_args", classifier, [[], ["--finetune", bare]],
         [["--finetune", full], ["--random_tokenizer"]]),
        (gen_img_uncond, "check_args", generator, [["--ckpt", bare]], [["--ckpt", full], ["--random_init"]]),
        (gen_img_cond, "check_args", generator, [["--ckpt", bare]], [["--ckpt", full], ["--random_init"]]),
        (edit_img, "check_edit_args", [*generator, "--input", image, "--mode", "reconstruct"], [["--ckpt", bare]],
         [["--ckpt", full], ["--ckpt", bare, "--vqgan_ckpt", full]]),
    ]
    for module, check, flags, refused, accepted in cases:
        parser = module.get_args_parser()
        for extra in refused:
            with pytest.raises(UsageError, match="no tokenizer weights.*: pass --vqgan_ckpt with the released "
                                                 "vqgan_jax_strongaug.ckpt") as error:
                module.main(parser.parse_args([*flags, *common, *extra]))
            assert (bare in str(error.value)) == (bare in extra), module.__name__
            assert ("--random_tokenizer" in str(error.value)) == ("--random_tokenizer" in parser.format_help())
            assert not out.exists(), module.__name__
        for extra in accepted:
            getattr(module, check)(parser.parse_args([*flags, *common, *extra]))


def test_resume_repairs_a_missing_milestone_and_log_line(tmp_path):
    """A folder written by the old order (last first) and killed: checkpoint-last.pth is epoch 2, but
    checkpoint-2.pth and the log line of epoch 2 never got written, and a line of epoch 3 is there."""
    args = training_args(tmp_path, auto_resume=True, save_every=2)
    lines = [{"epoch": 0, "train_loss": 3.0}, {"epoch": 1, "train_loss": 2.0}, {"epoch": 3, "train_loss": 0.5}]
    (tmp_path / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 4, "tr')
    save_checkpoint_atomic({"model": {"w": torch.ones(3)}, "epoch": 2,
                            "log_stats": {"epoch": 2, "train_loss": 1.0}}, tmp_path / CHECKPOINT_LAST)
    repaired = repair_run_files(args, str(tmp_path / CHECKPOINT_LAST))
    assert len(repaired) == 3, repaired
    assert sha256(tmp_path / "checkpoint-2.pth") == sha256(tmp_path / CHECKPOINT_LAST)
    assert log_epochs(tmp_path) == [0, 1, 2]
    assert repair_run_files(args, str(tmp_path / CHECKPOINT_LAST)) == []  # nothing left to do


# ----------------------------------------------------------------------------------------------------------
# whole runs
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes, tokenizer_config):
    """3 epochs of tiny pre-training without interruption (checkpoint-N every epoch)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, out, tokenizer_config, *KILL_RUN)))
    return out


KILL_RUN = ("--batch_size", 8, "--epochs", 3, "--save_every", 1, "--warmup_epochs", 1, "--blr", 0.03)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["renamed:checkpoint-1.pth", "written:checkpoint-last.pth"])
def test_kill_between_saves_then_auto_resume_keeps_every_milestone_and_log_line(
        tmp_path, shapes, tokenizer_config, uninterrupted, kill_at):
    """kill -9 right after epoch 1's milestone is written (its log line and checkpoint-last not yet), or after
    epoch 0's checkpoint-last temporary file is written but before it is renamed; then --auto_resume."""
    out = tmp_path / "out"
    argv = pretrain_args(shapes, out, tokenizer_config, *KILL_RUN, "--auto_resume")
    process = start_script("main_pretrain.py", argv, **{KILL_HOOK: kill_at})
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    if kill_at.startswith("written"):
        assert temp_files(out) and not os.path.exists(out / CHECKPOINT_LAST)

    main_pretrain.main(parse(main_pretrain, argv))
    for epoch in range(3):
        assert load_checkpoint(out / f"checkpoint-{epoch}.pth")["epoch"] == epoch
    assert log_epochs(out) == [0, 1, 2]
    assert not temp_files(out)
    final = load_checkpoint(out / CHECKPOINT_LAST)
    assert final["epoch"] == 2
    assert max_abs_difference(final["model"], load_checkpoint(uninterrupted / CHECKPOINT_LAST)["model"]) == 0


@pytest.mark.slow
def test_second_run_is_refused_rerun_needs_auto_resume_or_overwrite(tmp_path, shapes, tokenizer_config):
    out = tmp_path / "out"
    first_argv = pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8, "--epochs", 2, "--seed", 1)
    first = start_script("main_pretrain.py", first_argv)
    wait_for_lock(out, first)
    first.send_signal(signal.SIGSTOP)  # hold the first run while it owns the folder
    try:
        second = run_script("main_pretrain.py", pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8,
                                                              "--epochs", 2, "--seed", 2), check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid} on " in second.stderr.splitlines()[-1]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    for name in ("checkpoint-1.pth", CHECKPOINT_LAST):
        checkpoint = load_checkpoint(out / name)
        assert checkpoint["args"].seed == 1 and checkpoint["epoch"] == 1
    assert log_epochs(out) == [0, 1] and not os.path.exists(out / LOCK_FILE)

    # the same command again, without --auto_resume: refused, nothing touched
    before = {name: sha256(out / name) for name in os.listdir(out)}
    with pytest.raises(OutputDirError, match="holds checkpoint-0.pth, checkpoint-1.pth, checkpoint-last.pth of an "
                                             "earlier run"):
        main_pretrain.main(parse(main_pretrain, first_argv))
    assert {name: sha256(out / name) for name in os.listdir(out)} == before

    # --overwrite starts over: the earlier run's milestones and log lines are gone
    main_pretrain.main(parse(main_pretrain, pretrain_args(shapes, out, tokenizer_config, "--batch_size", 8,
                                                          "--epochs", 1, "--seed", 3, "--overwrite")))
    assert sorted(os.listdir(out)) == ["checkpoint-0.pth", CHECKPOINT_LAST, "log.txt"]
    assert load_checkpoint(out / CHECKPOINT_LAST)["args"].seed == 3 and log_epochs(out) == [0]


def mount_tmpfs(folder, options):
    os.makedirs(folder, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")


def unmount(folder):
    subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:  # permissions stop everyone but root
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount_tmpfs(folder, "ro,size=1m")
    yield folder
    unmount(folder)


def test_read_only_output_dir_is_refused_before_training(tmp_path, tokenizer_config, read_only_dir):
    data = write_image_folder(tmp_path / "data", splits=(("train", 2),))
    with open(os.path.join(data, "train", "class_0_ellipse", "0000.png"), "wb") as f:
        f.write(b"not an image")  # training would stop on it with a TrainingError: it never starts
    for out in (read_only_dir, read_only_dir / "out"):
        with pytest.raises(OutputDirError, match=re.escape(f"--output_dir '{out}' is not writable")):
            main_pretrain.main(parse(main_pretrain, pretrain_args(data, out, tokenizer_config, "--batch_size", 8)))


@pytest.mark.slow
def test_full_disk_gives_one_line_and_the_previous_checkpoint_loads(tmp_path, shapes, tokenizer_config, capsys):
    argv = pretrain_args(shapes, tmp_path / "disk", tokenizer_config, "--batch_size", 8, "--epochs", 2,
                         "--save_every", 0)
    size = expected_checkpoint_size(main_pretrain.build_model(parse(main_pretrain, argv)))
    mount_tmpfs(tmp_path / "disk", f"size={size * 3 // 2}")  # room for checkpoint-last.pth, not for a second file
    try:
        with pytest.raises(DiskWriteError) as failure:
            main_pretrain.main(parse(main_pretrain, argv))
        message = str(failure.value)
        assert "\n" not in message and isinstance(failure.value, TrainingError)
        assert message.startswith(f"epoch 1 not saved: cannot write '{tmp_path / 'disk' / 'checkpoint-1.pth'}': "
                                  f"No space left on device (")
        assert " needed, " in message and " free)" in message and "checkpoint-last.pth of the previous epoch still " \
                                                                   "loads" in message
        assert "less than twice" in capsys.readouterr().out  # the warning at start
        assert load_checkpoint(tmp_path / "disk" / CHECKPOINT_LAST)["epoch"] == 0
        assert not temp_files(tmp_path / "disk")
    finally:
        unmount(tmp_path / "disk")
