"""The README's commands are real: every `rlhf ...` line parses, every `make` target exists, and the
cheap ones run here against the default experiment (the expensive ones run in `make pipeline` and in the
stage tests named below)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from rlhf.cli import build_parser, main as rlhf_main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Indented code lines and inline code that start with a command, comments stripped.
COMMANDS = sorted({
    line.split("  #")[0].strip().removeprefix(".venv/bin/")
    for line in re.findall(r"^ {4}(.+)$", README, re.M) + re.findall(r"`([^`]+)`", README)
    if re.match(r"(\.venv/bin/)?rlhf |make ", line.strip())
})
RLHF = [c for c in COMMANDS if c.startswith("rlhf ")]
MAKE = [c for c in COMMANDS if c.startswith("make ")]

# Where each subcommand the README shows is run for real.
EXERCISED_BY = {
    "run": "tests/test_pretrain.py", "plan": "tests/test_pretrain.py", "status": "tests/test_pretrain.py",
    "report": "tests/test_user_view.py", "chat": "tests/test_user_view.py", "generate": "tests/test_user_view.py",
    "label": "tests/test_user_view.py",
}


def test_readme_lists_commands():
    # The extraction itself must find the README's commands, or every test below would pass vacuously.
    assert {"rlhf plan configs/tiny.yaml", "rlhf status configs/tiny.yaml", "make pipeline", "make test"} <= set(COMMANDS)


@pytest.mark.parametrize("command", RLHF)
def test_rlhf_command_parses(command):
    argv = shlex.split(command)[1:]
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0
        return
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in x for x in extra), f"README command {command!r}: unknown arguments {extra}"
    assert args.command in EXERCISED_BY, f"README shows `rlhf {args.command}` but no test runs it"
    assert f'"{args.command}"' in (ROOT / EXERCISED_BY[args.command]).read_text()
    # Each option the README shows is passed by some test as a command-line argument.
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme.py")
    for option in (a for a in argv if a.startswith("--")):
        assert f'"{option}"' in tests, f"README command {command!r}: no test passes {option}"


@pytest.mark.parametrize("command", MAKE)
def test_make_target_exists(command):
    argv = shlex.split(command)[1:]
    targets = [a for a in argv if "=" not in a] or ["help"]
    variables = [a for a in argv if "=" in a]
    # -n: print what would run without running it; fails on an unknown target.
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *variables, *targets], capture_output=True, text=True)
    assert out.returncode == 0, f"README command {command!r}: {out.stderr}"


def test_plan_and_status_of_the_default_experiment(tmp_path, capsys):
    store = f"store={tmp_path / 'store'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the experiment names its data relative to the repository
        assert rlhf_main(["plan", "configs/tiny.yaml", store]) == 0
        out = capsys.readouterr().out
        assert all(stage in out for stage in ("pretrain", "sft", "reward", "ppo")) and "never built" in out
        assert rlhf_main(["status", "configs/tiny.yaml", store]) == 0
