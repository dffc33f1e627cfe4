"""Training checkpoints that a kill at any instant cannot corrupt.

A checkpoint is a directory of several files (weights, optimizer, RNG, counters) written one after
another. Written in place, a process killed half-way leaves the weights of step N beside the optimizer
and step counter of an earlier step, or a truncated file: the rerun crashes, or worse, trains on from a
state that never existed. So every checkpoint is written aside and switched into place by one rename:

    <root>/step-00000020/       the newest complete checkpoint (holds COMPLETE, written last)
    <root>/partial-00000030/    being written; a kill leaves it behind, the next save removes it
    <root>/discard-.../         an old checkpoint being deleted (renamed first: a half-deleted
                                checkpoint must not look complete)

`CheckpointDir.latest()` is the checkpoint to resume from; a directory that is not complete is never
returned. The previous checkpoint is deleted only after the new one is in place, so there is always
one to resume from. `write_atomic` and `write_aside` do the same for a single file or directory.

The same layout works when several processes of a launch write one checkpoint into a shared directory
(each its own shard or RNG state): give `CheckpointDir` the launch's barrier and main-process flag, and
only the main process clears, marks and renames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf")

COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def _fsync(path: Path) -> None:
    """Flush one file or directory entry list to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path`, and the directories, to disk: a completion mark must not reach the
    disk before the data it vouches for (a SIGKILL loses nothing written; a power cut can)."""
    for p in [*path.rglob("*"), path]:
        _fsync(p)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: ranks may write the same file
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def write_aside(dest: Path) -> Iterator[Path]:
    """A fresh directory beside `dest` to fill; renamed to `dest` when the block ends without error.

    A kill inside the block leaves `dest` as it was (absent), so `dest.exists()` means complete. If
    another process put `dest` in place first, its copy is kept and this one dropped.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CheckpointDir:
    """Numbered checkpoints under `root`, each written aside and renamed into place whole.

    `save(step, write)` calls `write(directory)` to fill a fresh directory (every process of a launch
    calls it), marks it complete, renames it to `step-<step>` and deletes all but the `keep` newest.
    `latest()` is the newest complete checkpoint or None.
    """

    def __init__(self, root: Path, keep: int = 1, is_main_process: bool = True,
                 barrier: Callable[[], Any] = lambda: None):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.root = Path(root)
        self.keep = keep
        self.is_main_process = is_main_process
        self.barrier = barrier

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        found = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                match = _STEP.match(path.name)
                if match and (path / COMPLETE).is_file():
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none to resume from."""
        found = self.complete()
        return found[-1][1] if found else None

    def save(self, step: int, write: Callable[[Path], Any]) -> Path:
        """Write the checkpoint of `step` with `write(directory)` and switch it into place; returns its path."""
        partial = self.root / f"partial-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if self.is_main_process:
            self.remove_leftovers()
            partial.mkdir(parents=True)
        self.barrier()  # the directory exists and holds nothing stale before any process writes
        write(partial)
        self.barrier()  # every process has written its part
        if self.is_main_process:
            _fsync_tree(partial)
            write_atomic(partial / COMPLETE, json.dumps({"step": step}))
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                self._discard(final)
            os.rename(partial, final)
            _fsync(self.root)
            for _, old in self.complete()[: -self.keep]:
                self._discard(old)
        self.barrier()  # nobody reads or writes the next checkpoint before this one is in place
        return final

    def remove_leftovers(self) -> None:
        """Delete everything under `root` but the complete checkpoints: what killed writes and deletions left."""
        keep = {path for _, path in self.complete()}
        for path in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if path not in keep:
                log.info("removing %s, left by a checkpoint write or deletion that did not finish", path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _discard(self, path: Path) -> None:
        """Delete a checkpoint, first renaming it so that no kill during the deletion leaves it looking complete."""
        doomed = self.root / f"discard-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
