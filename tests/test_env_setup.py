"""Every entry-point script limits GNU OpenMP's spin-wait before torch is imported (util/env_setup.py)."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Runs a script with --help and reports GOMP_SPINCOUNT at the moment torch is first imported; the import is
# then stopped, so the check costs no torch start-up.
PROBE = r"""
import importlib.abc, os, runpy, sys

class TorchImported(BaseException):
    pass

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("GOMP_SPINCOUNT at torch import:", os.environ.get("GOMP_SPINCOUNT"), flush=True)
            raise TorchImported

sys.meta_path.insert(0, Watch())
target = sys.argv[1]
sys.argv = [target, "--help"]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except TorchImported:
    pass
"""


def entry_points():
    """Every script with a __main__ block: top-level files and modules of util/ (python -m util.x)."""
    scripts = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "*.py")) + glob.glob(os.path.join(REPO_ROOT, "util", "*.py"))):
        with open(path) as f:
            if 'if __name__ == "__main__":' not in f.read():
                continue
        relative = os.path.relpath(path, REPO_ROOT)
        scripts.append(relative if os.path.dirname(relative) == "" else relative[:-3].replace(os.sep, "."))
    return scripts


def spin_count_at_torch_import(target, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", PROBE, target], cwd=REPO_ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stdout.splitlines() if line.startswith("GOMP_SPINCOUNT at torch import:")]
    assert lines, f"{target} never imported torch: {result.stderr[-2000:]}"
    return lines[0].split(":", 1)[1].strip()


def test_the_entry_points_are_found():
    found = entry_points()
    assert {"main_pretrain.py", "main_tokenizer.py", "gen_img_uncond.py", "demo.py", "benchmark.py",
            "util.synthetic_data"} <= set(found), found


@pytest.mark.slow
@pytest.mark.parametrize("target", entry_points())
def test_spin_count_is_set_before_torch_is_imported(target):
    assert spin_count_at_torch_import(target) == "10000"


@pytest.mark.slow
def test_a_value_the_user_chose_is_kept():
    assert spin_count_at_torch_import("main_pretrain.py", GOMP_SPINCOUNT="123") == "123"
    assert spin_count_at_torch_import("main_pretrain.py", OMP_WAIT_POLICY="PASSIVE") == "None"
