"""The artifact store: content-keyed outputs (Hugging Face checkpoints, datasets) that stages hand to each other.

Layout under the root (a local path or any fsspec URL):

    artifacts/<key>/          a stage's files (a loadable HF checkpoint, a dataset) + manifest.json (written last)
    aliases/<experiment>/<stage>   a text file holding the key the experiment last produced
    tmp/                      artifacts being built (local roots only; renamed into artifacts/ when done)
    work/<key>/               resumable training state of a stage that has not finished yet
    evaluations/<key>.json    the held-out evaluation of a starting policy, shared by the policy stages
                              that start from it (`rlhf.evaluation.reference_results`)

An artifact without a manifest does not exist: readers check for manifest.json, writers put it last.
On a local root the whole directory appears at once by rename, so a crash never leaves a half artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"


def content_key(payload: dict[str, Any]) -> str:
    """A stable 16-hex-digit key for the JSON-serialisable description of a piece of work."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digest(text: str | None) -> str | None:
    """Short sha256 of a string (tokenizer files, chat templates), for manifests and compatibility checks."""
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides what an artifact contains."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "rlhf-pipeline"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def code_version() -> str:
    """The git commit of the project checkout (with '+dirty' for local changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cache_root(cache_dir: str | None = None) -> Path:
    """The local cache: `cache_dir` (the experiment's), else $RLHF_CACHE, else ~/.cache/rlhf-pipeline."""
    return Path(cache_dir or os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf-pipeline")


class ArtifactStore:
    """Content-keyed artifacts under a local path or fsspec URL, with atomic writes and aliases."""

    def __init__(self, root: str, cache_dir: str | None = None):
        self.url = str(root)
        self.fs, path = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = path.rstrip("/") if not self.is_local else str(Path(path).resolve())
        # Remote artifacts are copied here before from_pretrained reads them.
        self.cache = cache_root(cache_dir) / content_key({"root": self.url})

    @classmethod
    def for_experiment(cls, config: Any, root: str | None = None) -> ArtifactStore:
        """The store an experiment's settings name (`rlhf.schema.ExperimentConfig`: `store`, with its
        `cache_dir`); `root` replaces the store root (`rlhf status --store`). Every command opens the
        experiment's store through here, so none of them drops a setting."""
        return cls(root or config.store, config.cache_dir)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def unusable_reason(self) -> str | None:
        """Why a local root cannot hold the store (a file, a file inside it where a directory belongs, no
        permission to create or write it), or None. Creates nothing. Remote roots are not checked here."""
        if not self.is_local:
            return None
        root = Path(self.root)
        if root.exists():
            if not root.is_dir():
                return f"{self.url} is a file, not a directory"
            for sub in ("artifacts", "aliases", "work", "tmp", "evaluations"):
                if (root / sub).exists() and not (root / sub).is_dir():
                    return f"{root / sub} is a file where the store keeps a directory"
            if not os.access(root, os.W_OK | os.X_OK):
                return f"{self.url} is not writable"
            return None
        parent = root.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{self.url} cannot be created: {parent} is a file"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{self.url} cannot be created: {parent} is not writable"
        return None

    # ---- reading -------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True when the artifact is complete (its manifest is there)."""
        return self.fs.exists(self._path("artifacts", key, MANIFEST))

    def manifest(self, key: str) -> dict[str, Any]:
        """The manifest of a complete artifact; KeyError when there is none."""
        try:
            with self.fs.open(self._path("artifacts", key, MANIFEST), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            raise KeyError(f"no artifact {key} in {self.url}") from None

    def keys(self) -> list[str]:
        """Keys of all complete artifacts."""
        found = self.fs.glob(self._path("artifacts", "*", MANIFEST))
        return sorted(p.rstrip("/").split("/")[-2] for p in found)

    def local_dir(self, key: str) -> Path:
        """A local directory holding the artifact, ready for `from_pretrained` or a dataset reader (remote roots
        are cached)."""
        if not self.exists(key):
            raise KeyError(f"no artifact {key} in {self.url}")
        if self.is_local:
            return Path(self._path("artifacts", key))
        dest = self.cache / "artifacts" / key
        if (dest / MANIFEST).exists() and json.loads((dest / MANIFEST).read_text()) != self.manifest(key):
            shutil.rmtree(dest, ignore_errors=True)  # a forced rerun replaced it since it was cached
        if not (dest / MANIFEST).exists():
            tmp = self.cache / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(self._path("artifacts", key) + "/", str(tmp), recursive=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError:  # another process cached it first
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh local directory to build an artifact in; removed afterwards unless published."""
        base = Path(self._path("tmp")) if self.is_local else self.cache / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: Path, key: str, manifest: dict[str, Any], replace: bool = False) -> None:
        """Write the manifest last and make the staged directory the artifact `key`, atomically.

        An existing artifact with the same key is kept (same key = same work: someone finished it
        first) unless `replace` (a forced rerun), which swaps it out whole: a reader sees the old
        artifact, then briefly none, then the new one, never a mixture.
        """
        manifest = {**manifest, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(staged / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
        if self.is_local:
            dest = Path(self._path("artifacts", key))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if (dest / MANIFEST).exists() and not replace:
                return
            if dest.exists():  # a forced rerun's predecessor, or a directory without a manifest
                old = staged.parent / f"replaced-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
                shutil.rmtree(old)
            os.rename(staged, dest)
            return
        # Remote roots have no rename: upload everything, the manifest last, so readers that check
        # for the manifest never see a partial artifact.
        dest = self._path("artifacts", key)
        if self.exists(key) and not replace:
            return
        if self.fs.exists(dest):  # a forced rerun's predecessor, or an upload that died before its manifest
            self.fs.rm(dest, recursive=True)
        for path in sorted(staged.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                self.fs.makedirs(self._path("artifacts", key, *path.relative_to(staged).parts[:-1]), exist_ok=True)
                self.fs.put_file(str(path), dest + "/" + path.relative_to(staged).as_posix())
        self.fs.put_file(str(staged / MANIFEST), dest + "/" + MANIFEST)

    def work_dir(self, key: str) -> Path:
        """Local directory for the resumable training state of the work that will produce `key`."""
        base = Path(self._path("work")) if self.is_local else self.cache / "work"
        path = base / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_work(self, key: str) -> None:
        """Drop the training state of finished work."""
        base = Path(self._path("work")) if self.is_local else self.cache / "work"
        shutil.rmtree(base / key, ignore_errors=True)

    def clear_work_if_empty(self, key: str) -> None:
        """Remove the work directory of `key` (and `work/` itself) when a stage failed before saving anything."""
        base = Path(self._path("work")) if self.is_local else self.cache / "work"
        for path in (base / key, base):
            with contextlib.suppress(OSError):  # not empty, or already gone
                path.rmdir()

    # ---- aliases -------------------------------------------------------------------------------

    def read_evaluation(self, key: str) -> dict[str, Any] | None:
        """The evaluation kept under `key` (`write_evaluation`), or None."""
        try:
            with self.fs.open(self._path("evaluations", f"{key}.json"), "r") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):  # none yet, or unreadable: measured again
            return None

    def write_evaluation(self, key: str, results: dict[str, Any]) -> None:
        """Keep an evaluation's results under `key`, whole or not at all."""
        self._write_text(json.dumps(results), "evaluations", f"{key}.json")

    def set_alias(self, experiment: str, stage: str, key: str) -> None:
        """Point `<experiment>/<stage>` at `key`."""
        self._write_text(key + "\n", "aliases", experiment, stage)

    def _write_text(self, text: str, *parts: str) -> None:
        """Write the file at `parts` under the root whole (a local file by rename), its directory created."""
        path = self._path(*parts)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}"
            Path(tmp).write_text(text)
            os.replace(tmp, path)
        else:
            self.fs.makedirs(self._path(*parts[:-1]), exist_ok=True)
            self.fs.pipe_file(path, text.encode())

    def alias(self, experiment: str, stage: str) -> str | None:
        """The key `<experiment>/<stage>` points at, or None."""
        path = self._path("aliases", experiment, stage)
        try:
            with self.fs.open(path, "r") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def resolve(self, ref: str) -> str:
        """A key from a key, a unique key prefix, or an alias `<experiment>/<stage>`."""
        if "/" in ref:
            experiment, stage = ref.split("/", 1)
            key = self.alias(experiment, stage)
            if key is None:
                raise KeyError(f"no alias {ref} in {self.url}")
            return key
        matches = [k for k in self.keys() if k.startswith(ref)]
        if len(matches) != 1:
            raise KeyError(f"{ref!r} matches {len(matches)} artifacts in {self.url}")
        return matches[0]
