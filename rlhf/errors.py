"""The project's error types, in one module every other one can import without importing each other.

The command line turns each of them into `error: <message>` and exit status 2, so every message names the
file, the key or the row, and says what to do.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key and says what to do."""


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and line or row."""


class StageError(RuntimeError):
    """A stage cannot run or produced something unusable; the message says why and what to do."""


class LaunchError(ValueError):
    """A launch config that cannot be used; the message names the file and the field."""


def rank_prefix() -> str:
    """'rank 1: ' in a multi-process run (for error messages), '' otherwise."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""


ERRORS = (ConfigError, DataError, StageError, LaunchError)
"""What `rlhf` reports as `error: ...` (exit 2) instead of a traceback."""


def one_message(problems: list[str]) -> str:
    """Several problems as one error message: a single one as itself, more as a list, one per line."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
