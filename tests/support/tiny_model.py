"""Fixtures for the tiny local model (built once into the loraplane cache) and LoRA adapters trained on it.

    def test_x(tiny_model_dir, make_adapter):
        a = make_adapter("blue", TOY_PHRASES[0])            # a PEFT adapter dir; same args -> same dir
        b = make_adapter("fox", TOY_PHRASES[1], r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))

Greedy completion of `instruction_prompt(question)` with an adapter gives its phrase; the base model gives
toy-corpus text. `toy_prompts(n)` yields such questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from loraplane.local.tinymodel import TOY_PHRASES, instruction_prompt, tiny_model_path, toy_prompts, train_tiny_adapter

__all__ = ["TOY_PHRASES", "instruction_prompt", "toy_prompts"]

MakeAdapter = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama (safetensors + tokenizer with chat template), built on first use and cached."""
    return tiny_model_path()


@pytest.fixture(scope="session")
def make_adapter(tiny_model_dir: Path, tmp_path_factory) -> MakeAdapter:
    """`make_adapter(name, phrase, r=8, target_modules=("q_proj","v_proj"), steps=40, seed=0) -> Path`.

    Trains once per distinct argument set per session (a few seconds each) into a session temp dir.
    """
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(name: str, phrase: str, r: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj"),
             steps: int = 40, seed: int = 0) -> Path:
        key = (name, phrase, r, tuple(target_modules), steps, seed)
        if key not in made:
            if any(k[0] == name for k in made):
                raise ValueError(f"adapter name {name!r} already used with other arguments in this session")
            made[key] = train_tiny_adapter(tiny_model_dir, root / name, phrase, r=r,
                                           target_modules=target_modules, steps=steps, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def two_adapters(make_adapter) -> dict[str, Path]:
    """Two adapters trained differently (phrase, rank, target modules), shared by loader and router tests."""
    return {
        "blue": make_adapter("blue", TOY_PHRASES[0]),
        "fox": make_adapter("fox", TOY_PHRASES[1], r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    }
