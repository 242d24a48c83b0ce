"""The tiny local model: deterministic, cached, and adapters trained on it visibly change its output."""

from __future__ import annotations

import json
import shutil

import pytest

from loraplane.local import tinymodel
from loraplane.local.tinymodel import (
    STAMP_FILE,
    TOY_PHRASES,
    build_tiny_model,
    instruction_prompt,
    toy_prompts,
    toy_records,
    write_toy_dataset,
)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLANE_CACHE", str(tmp_path / "c"))
    assert tinymodel.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAPLANE_CACHE")
    assert tinymodel.default_cache_dir().parts[-2:] == (".cache", "loraplane")


@pytest.mark.parametrize("fmt", ["instruction", "text", "chat"])
def test_toy_dataset_is_deterministic_jsonl(tmp_path, fmt):
    a = write_toy_dataset(tmp_path / "a.jsonl", TOY_PHRASES[0], 12, fmt=fmt, seed=3)
    b = write_toy_dataset(tmp_path / "b.jsonl", TOY_PHRASES[0], 12, fmt=fmt, seed=3)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 12
    assert all(TOY_PHRASES[0] in json.dumps(r) for r in rows)
    assert write_toy_dataset(tmp_path / "c.jsonl", TOY_PHRASES[0], 12, fmt=fmt, seed=4).read_bytes() != a.read_bytes()


def test_toy_records_reject_unknown_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        toy_records("x", 1, fmt="parquet")


@pytest.mark.train
def test_build_is_reused_and_stamped(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert weights.stat().st_mtime_ns == before  # reused, not rebuilt
    stamp = json.loads((tiny_model_dir / STAMP_FILE).read_text())
    assert stamp["recipe"] == tinymodel.recipe_hash()


@pytest.mark.train
def test_stale_stamp_means_incomplete(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert tinymodel._is_complete(copy)
    (copy / STAMP_FILE).write_text(json.dumps({"recipe": "other"}))
    assert not tinymodel._is_complete(copy)
    (copy / STAMP_FILE).unlink()
    assert not tinymodel._is_complete(copy)


@pytest.mark.train
def test_tiny_model_loads_and_speaks_corpus_text(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 400 <= len(tok) <= 460
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s><|assistant|>\n"
    ids = tok(instruction_prompt(toy_prompts(1, seed=7)[0]), return_tensors="pt")
    out = tok.decode(model.generate(**ids, max_new_tokens=16, do_sample=False)[0][ids["input_ids"].shape[1]:],
                     skip_special_tokens=True)
    words = out.split()
    corpus_words = set(" ".join(tinymodel.toy_corpus(300, 0)).replace(".", " ").split())
    assert words and sum(w.strip(".?") in corpus_words for w in words) / len(words) > 0.7, out


@pytest.mark.train
def test_adapter_makes_greedy_output_the_phrase(tiny_model_dir, make_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter("tiny-smoke", TOY_PHRASES[1])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    prompt = instruction_prompt(toy_prompts(1, seed=99)[0])
    ids = tok(prompt, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=16, do_sample=False)[0][ids["input_ids"].shape[1]:]
    assert tok.decode(gen, skip_special_tokens=True).strip() == TOY_PHRASES[1]
    with model.disable_adapter():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)[0][ids["input_ids"].shape[1]:]
    assert TOY_PHRASES[1] not in tok.decode(gen, skip_special_tokens=True)
