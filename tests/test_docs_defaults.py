"""Every default that a docs/ flag table states (tables after a `<!-- defaults: SCRIPT -->` line) is the
parser's default: the docs cannot drift from `--help`."""
import glob
import importlib
import os
import re

import pytest

from conftest import REPO_ROOT

MARKER = re.compile(r"<!-- defaults: (\w+)\.py -->")
LITERAL = re.compile(r"^(`[^`]*`|on|off|—|-?[0-9][0-9.e+-]*)$")


def documented_defaults():
    """(page, script, flag, documented value) for each literal default of a marked flag table."""
    rows = []
    for page in sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))):
        script = None
        for line in open(page):
            marker = MARKER.search(line)
            if marker:
                script = marker.group(1)
                continue
            if not line.startswith("|"):
                script = None if not line.strip() else script
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            flags = re.findall(r"`(--\w+)", cells[0])
            if script is None or len(cells) < 2 or not flags:
                continue
            values = [value.strip() for value in cells[1].split(", ")]
            if len(values) == len(flags) and all(LITERAL.match(value) for value in values):
                rows += [(os.path.basename(page), script, flag, value) for flag, value in zip(flags, values)]
    return rows


def matches(value, default):
    """Whether the docs' `value` states the parser's `default` (on/off for switches, — for none)."""
    if isinstance(default, bool):
        return value == ("on" if default else "off")
    if default is None or default == "":
        return value == "—"
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value.strip("`") == str(default)


ROWS = documented_defaults()


def test_the_tables_are_found():
    assert {script for _, script, _, _ in ROWS} >= {"demo", "main_tokenizer", "gen_img_uncond", "gen_img_cond"}


@pytest.mark.parametrize("page,script,flag,value", ROWS, ids=[f"{r[1]}{r[2]}" for r in ROWS])
def test_documented_default_is_the_parsers(page, script, flag, value):
    parser = importlib.import_module(script).get_args_parser()
    actions = {option: action for action in parser._actions for option in action.option_strings}
    assert flag in actions, f"docs/{page} documents {flag}, which {script}.py does not have"
    assert matches(value, actions[flag].default), \
        f"docs/{page} says {flag} defaults to {value}; {script}.py --help says {actions[flag].default!r}"
