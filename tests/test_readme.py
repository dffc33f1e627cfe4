"""The commands the README and the docs/ pages show are real: every `rlhf ...` line parses, its subcommand
is invoked by the test named below, every `make` target exists, and the cheap ones run here against the
default experiment (the expensive ones run in `make pipeline` and in the stage tests named below)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from rlhf.cli import build_parser, main as rlhf_main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(text: str) -> set[str]:
    """The `rlhf ...` and `make ...` commands of a markdown page: indented code lines and inline code,
    comments stripped. Fenced blocks (YAML, Python) are dropped first: their backticks would otherwise
    pair with the inline code after them and hide it."""
    text = re.sub(r"^```[^\n]*\n.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    return {
        " ".join(line.split("  #")[0].split()).removeprefix(".venv/bin/")
        for line in re.findall(r"^ {4}(.+)$", text, re.M) + re.findall(r"`([^`]+)`", text)
        if re.match(r"(\.venv/bin/)?rlhf |make ", line.strip())
    }


# command -> the pages that show it
SHOWN: dict[str, list[str]] = {}
for page in PAGES:
    for command in shown_commands(page.read_text()):
        SHOWN.setdefault(command, []).append(str(page.relative_to(ROOT)))
COMMANDS = sorted(SHOWN)
RLHF = [c for c in COMMANDS if c.startswith("rlhf ")]
MAKE = [c for c in COMMANDS if c.startswith("make ")]

# Where each subcommand the pages show is run for real.
EXERCISED_BY = {
    "run": "tests/test_pretrain.py", "plan": "tests/test_pretrain.py", "status": "tests/test_pretrain.py",
    "report": "tests/test_user_view.py", "chat": "tests/test_user_view.py", "generate": "tests/test_user_view.py",
    "label": "tests/test_user_view.py",
}


def invokes(source: str, subcommand: str) -> bool:
    """Whether test code calls the CLI with `subcommand` as its first argument, the ways the tests do:
    `main(["run", ...])` or `rlhf_main(["run", ...])` in process, and `[rlhf, "chat", ...]`,
    `[.../ "rlhf"), "run", ...]` or `["-m", "rlhf.cli", "run", ...]` as a subprocess argv. The bare string
    elsewhere (`c in ("run", "plan")`) does not count."""
    cli = r"""(?:\b(?:rlhf_)?main\(\s*\[|\brlhf(?:\.cli)?["')]*\s*,)"""
    return re.search(rf'{cli}\s*"{re.escape(subcommand)}"', source) is not None


def test_invocation_check_tells_a_call_from_a_string():
    assert invokes('assert rlhf_main(["run", str(path)]) == 2', "run")
    assert invokes('assert main(["plan", str(path), "--memory"]) == 0', "plan")
    assert invokes('subprocess.run([rlhf, "label", str(cands)], input="1")', "label")
    assert invokes('cmd = [str(Path(sys.executable).parent / "rlhf"), "run", str(path)]', "run")
    assert invokes('cmd = [sys.executable, "-m", "rlhf.cli", "run", str(path)]', "run")
    # the strings alone, or the subcommand as a later argument, are not an invocation
    assert not invokes('assert all(c in out.stdout for c in ("run", "plan", "status"))', "run")
    assert not invokes('assert rlhf_main(["plan", str(path), "run"]) == 0', "run")
    assert not invokes('assert rlhf_main(["plan", str(path)]) == 0', "status")
    # a test file that never calls `rlhf label` fails the check
    assert not invokes((ROOT / "tests" / "test_pretrain.py").read_text(), "label")


def test_pages_list_commands():
    # The extraction itself must find the pages' commands, or every test below would pass vacuously.
    readme = {c for c, pages in SHOWN.items() if "README.md" in pages}
    assert {"rlhf plan configs/tiny.yaml", "rlhf status configs/tiny.yaml", "make pipeline", "make test"} <= readme
    assert "docs/distributed.md" in SHOWN.get("make plan LAUNCH=configs/accelerate/zero3.yaml", [])
    # inline code after a fenced block is still found
    assert shown_commands("```yaml\na: 1\n```\n\nthen `rlhf status x.yaml`.") == {"rlhf status x.yaml"}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("command", RLHF)
def test_rlhf_command_parses(command, capsys):
    argv = shlex.split(command)[1:]
    where = f"{', '.join(SHOWN[command])}: {command!r}"
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 0
        return
    try:
        args, extra = build_parser().parse_known_args(argv)
        name = args.command
    except SystemExit:
        # A name in prose ("`rlhf plan --memory` shows them") rather than a line to type: the subcommand
        # and its options must exist; only the arguments it leaves out go unchecked.
        assert "the following arguments are required" in capsys.readouterr().err, f"{where}: does not parse"
        name, extra = argv[0], []
        known = subcommand_parsers()[name]._option_string_actions
        unknown = [a for a in argv if a.startswith("-") and a not in known]
        assert not unknown, f"{where}: `rlhf {name}` has no option {unknown}"
    assert all("=" in x for x in extra), f"{where}: unknown arguments {extra}"
    assert name in EXERCISED_BY, f"{where}: no test runs `rlhf {name}`"
    test = EXERCISED_BY[name]
    assert invokes((ROOT / test).read_text(), name), f"{where}: {test} never invokes `rlhf {name}`"
    # Each option the pages show is passed by some test as a command-line argument.
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme.py")
    for option in (a for a in argv if a.startswith("--")):
        assert f'"{option}"' in tests, f"{where}: no test passes {option}"


@pytest.mark.parametrize("command", MAKE)
def test_make_target_exists(command):
    argv = shlex.split(command)[1:]
    targets = [a for a in argv if "=" not in a] or ["help"]
    variables = [a for a in argv if "=" in a]
    # -n: print what would run without running it; fails on an unknown target.
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *variables, *targets], capture_output=True, text=True)
    assert out.returncode == 0, f"{', '.join(SHOWN[command])}: {command!r}: {out.stderr}"


def test_plan_and_status_of_the_default_experiment(tmp_path, capsys):
    store = f"store={tmp_path / 'store'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the experiment names its data relative to the repository
        assert rlhf_main(["plan", "configs/tiny.yaml", store]) == 0
        out = capsys.readouterr().out
        assert all(stage in out for stage in ("pretrain", "sft", "reward", "ppo")) and "never built" in out
        assert rlhf_main(["status", "configs/tiny.yaml", store]) == 0
