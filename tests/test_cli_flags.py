"""The scripts' flags: one definition of the speed flags, one spelling for negative switches, no flag that does
nothing."""
import argparse
import glob
import importlib
import os

import pytest

from conftest import REPO_ROOT
from util.perf import PERF_FLAGS, REFERENCE_NUMERICS


def script_modules():
    """Names of the top-level scripts with a get_args_parser()."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "*.py"))):
        with open(path) as f:
            if "def get_args_parser(" in f.read():
                names.append(os.path.basename(path)[:-3])
    return names


SCRIPTS = script_modules()
SPEED_SCRIPTS = [name for name in SCRIPTS if name not in ("demo", "prepare_imgnet_val")]


def parser_of(name):
    return importlib.import_module(name).get_args_parser()


def option_strings(parser):
    return {option: action for action in parser._actions for option in action.option_strings}


def source_of(name):
    with open(os.path.join(REPO_ROOT, f"{name}.py")) as f:
        return f.read()


def test_the_scripts_are_found():
    assert {"main_pretrain", "main_linprobe", "main_finetune", "main_tokenizer", "main_cache_tokens",
            "gen_img_uncond", "edit_img", "benchmark", "demo"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_printable(name):
    """`python SCRIPT --help` formats every flag's help (a bare % in a help string breaks it)."""
    assert "--seed" in parser_of(name).format_help() or name == "prepare_imgnet_val"


@pytest.mark.parametrize("name", SCRIPTS)
def test_negative_switches_are_spelled_no_dash(name):
    for option, action in option_strings(parser_of(name)).items():
        assert not option.startswith("--no_"), f"{name}: {option} (use BooleanOptionalAction: --no-x)"
        if option.startswith("--no-"):
            assert isinstance(action, argparse.BooleanOptionalAction), f"{name}: {option}"


@pytest.mark.parametrize("name", SPEED_SCRIPTS)
def test_speed_flags_are_the_shared_ones(name):
    """Every speed flag a script has is util/perf.py's (spelling, help, choices); every script with speed flags
    takes --reference_numerics and --no-channels_last."""
    parser = parser_of(name)
    options = option_strings(parser)
    assert "--reference_numerics" in options and "--no-channels_last" in options
    for flag, (spellings, kwargs) in PERF_FLAGS.items():
        action = options.get(spellings[0])
        if action is None:
            continue
        assert action.help == kwargs["help"] and action.choices == kwargs.get("choices"), f"{name}: {flag}"
        assert type(action) is type(argparse.ArgumentParser().add_argument(*spellings, **kwargs)), f"{name}: {flag}"
    args = parser.parse_args(["--reference_numerics", "--no-channels_last"] + required_args(name))
    resolve = importlib.import_module("util.perf").resolve_perf_args
    resolved = resolve(args)
    for key, value in REFERENCE_NUMERICS.items():
        if hasattr(resolved, key):
            assert getattr(resolved, key) == value, f"{name}: --reference_numerics leaves {key}"


def required_args(name):
    return {"main_tokenizer": ["--data_path", "x"], "edit_img": ["--input", "x"]}.get(name, [])


@pytest.mark.parametrize("name", SCRIPTS)
def test_data_loading_flags_only_where_a_data_loader_runs(name):
    options = option_strings(parser_of(name))
    source = source_of(name)
    loads_data = "DataLoader(" in source or "build_loader(" in source
    assert ("--pin_mem" in options) == loads_data, name
    if "--num_workers" in options:
        assert loads_data or "args.num_workers" in source, name


@pytest.mark.parametrize("name", SPEED_SCRIPTS)
def test_world_size_is_not_a_flag(name):
    """The launcher sets the number of processes; a flag that is always overwritten would only mislead."""
    assert "--world_size" not in option_strings(parser_of(name))


def test_old_spellings_are_refused():
    import benchmark
    import main_linprobe
    with pytest.raises(SystemExit):
        benchmark.get_args_parser().parse_args(["--no_channels_last"])
    with pytest.raises(SystemExit):
        main_linprobe.get_args_parser().parse_args(["--no_train_aug"])
    args = main_linprobe.get_args_parser().parse_args(["--no-train_aug", "--no-pin_mem"])
    assert args.train_aug is False and args.pin_mem is False
