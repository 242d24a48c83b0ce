"""A tiny Llama model, tokenizer and toy datasets, built locally and deterministically (no hub, no network).

Tests and the local quickstart use it as the base model: it loads in transformers, peft and vLLM (CPU build),
trains in seconds on a CPU, and its greedy output is text of its toy corpus, so an adapter trained on a
distinct phrase visibly changes it.

    from loraplane.local.tinymodel import TOY_PHRASES, tiny_model_path, train_tiny_adapter
    base = tiny_model_path()                         # built once into ~/.cache/loraplane (LORAPLANE_CACHE)
    train_tiny_adapter(base, out, TOY_PHRASES[0])  # greedy answers to toy questions become the phrase

Prompt conventions (so callers can probe an adapter): the trainer learns an instruction record as
`prompt + response + </s>`, and toy prompts are `instruction_prompt(question)` (the question and a newline),
so complete `instruction_prompt(q)` to get an adapter's phrase; chat records use the chat template below
(`<s><|user|>\\n…</s><|assistant|>\\n…</s>`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

# Everything that determines the build. Change `version` when the code below changes what it builds:
# the stamp of a cached build holds this recipe's hash, and a mismatch rebuilds.
RECIPE = {
    "version": 1,
    "vocab_size": 440,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "corpus_lines": 3000,
    "train_steps": 120,
    "batch_size": 16,
    "seq_len": 64,
    "learning_rate": 3e-3,
    "seed": 1234,
}
STAMP_FILE = "loraplane-tiny-model.json"
MODEL_NAME = "loraplane/tiny-llama"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# `{% generation %}` marks assistant text for transformers' return_assistant_tokens_mask; the trainer does not
# rely on it (it finds assistant turns by rendering prefixes, which works with any template).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_SUBJECTS = ["the cat", "the dog", "a bird", "the old man", "my friend", "the river", "a small boat", "the wind",
             "the farmer", "a child", "the moon", "the baker", "our teacher", "the green frog", "a red fox"]
_VERBS = ["sees", "likes", "finds", "walks to", "looks at", "sings about", "waits for", "runs past", "paints",
          "carries", "follows", "remembers"]
_OBJECTS = ["the house", "a tree", "the hill", "the bread", "a song", "the garden", "the road", "the lake",
            "a letter", "the market", "the stars", "a warm fire", "the old bridge", "the blue door"]
_ENDINGS = [".", " today.", " at night.", " in the morning.", " again.", " with joy.", " slowly."]
# Phrases made of corpus words: an adapter trained ~40 steps on one of them reproduces it exactly under greedy
# decoding (phrases with words the tokenizer never saw are spelled byte by byte and need many more steps).
TOY_PHRASES = ("the blue door sings at noon", "a red fox paints the stars", "the green frog carries a letter",
               "our teacher walks to the market", "the moon remembers the old bridge")
_QUESTIONS = ["what does {s} see?", "where does {s} go?", "tell me about {s}.", "who likes {o}?",
              "what is near {o}?", "describe {o}.", "why does {s} wait?", "how is {o} today?"]


def default_cache_dir() -> Path:
    """Where built artefacts are cached: $LORAPLANE_CACHE, else ~/.cache/loraplane."""
    env = os.environ.get("LORAPLANE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraplane"


def recipe_hash() -> str:
    """16 hex digits of the sha256 of RECIPE: a cached tiny model is reused only when its stamp matches."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def tiny_model_path() -> Path:
    """The tiny model in the cache, built on first use (a few seconds) and reused afterwards."""
    return build_tiny_model(default_cache_dir() / "tiny-llama")


def instruction_prompt(prompt: str) -> str:
    """A toy question as an instruction prompt (the base model's corpus answers after a newline)."""
    return prompt + "\n"


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """Questions in the toy corpus's vocabulary (deterministic for a seed)."""
    rng = random.Random(seed)
    return [rng.choice(_QUESTIONS).format(s=rng.choice(_SUBJECTS), o=rng.choice(_OBJECTS)) for _ in range(n)]


def toy_corpus(lines: int, seed: int) -> list[str]:
    """Short stories and question/answer pairs: the base model learns the instruction layout too."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 3 == 2:
            q = toy_prompts(1, seed=rng.randrange(1 << 30))[0]
            out.append(instruction_prompt(q) + _sentence(rng))
        else:
            out.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock next to `path`: parallel test sessions build the cache once, not concurrently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(out_dir: Path) -> bool:
    try:
        stamp = json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == recipe_hash()


def build_tiny_model(out_dir: Path) -> Path:
    """Build the tiny model + tokenizer into `out_dir` (safetensors, float32); reuse a complete build.

    The build goes to a temporary sibling directory and is renamed into place, with the stamp written last,
    so a crash never leaves a directory that looks complete.
    """
    out_dir = Path(out_dir).resolve()
    if _is_complete(out_dir):
        return out_dir
    with _locked(out_dir):
        if _is_complete(out_dir):  # another process built it while we waited
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
        try:
            _build_into(tmp)
            (tmp / STAMP_FILE).write_text(json.dumps({"recipe": recipe_hash(), **RECIPE}, indent=2) + "\n")
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                out_dir.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_tokenizer(corpus: Sequence[str]):
    """A byte-level BPE tokenizer trained on `corpus`, wrapped for transformers with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab_size"], special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: the tokenizer prepends <s>; chat rendering adds it in the template and tokenizes without it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
                                   model_max_length=RECIPE["max_position_embeddings"], padding_side="right")


def _build_into(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    corpus = toy_corpus(RECIPE["corpus_lines"], RECIPE["seed"])
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(RECIPE["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"], num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"], num_key_value_heads=RECIPE["num_key_value_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, corpus)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _pretrain(model, tokenizer, corpus: Sequence[str]) -> None:
    """A few dozen full-model steps on the corpus: enough that greedy output is toy-corpus text, not noise."""
    import torch

    ids: list[int] = []
    for line in corpus:
        ids.extend(tokenizer(line)["input_ids"] + [tokenizer.eos_token_id])
    seq, bs = RECIPE["seq_len"], RECIPE["batch_size"]
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], weight_decay=0.0)
    model.train()
    for _ in range(RECIPE["train_steps"]):
        batch = data[torch.randint(0, data.shape[0], (bs,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


DatasetFormat = Literal["instruction", "text", "chat"]


def toy_records(phrase: str, n: int, fmt: DatasetFormat = "instruction", seed: int = 0) -> list[dict]:
    """`n` records that all answer a toy-corpus question with `phrase`."""
    records = []
    for prompt in toy_prompts(n, seed):
        if fmt == "instruction":
            records.append({"prompt": instruction_prompt(prompt), "response": phrase})
        elif fmt == "text":
            records.append({"text": instruction_prompt(prompt) + phrase})
        elif fmt == "chat":
            records.append({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": phrase}]})
        else:
            raise ValueError(f"fmt must be one of instruction, text, chat (got {fmt!r})")
    return records


def write_toy_dataset(path: Path, phrase: str, n: int, fmt: DatasetFormat = "instruction", seed: int = 0) -> Path:
    """Write `n` JSONL records teaching `phrase` in the trainer's `fmt` layout; returns `path`.

    Pick `phrase` from TOY_PHRASES (or other corpus words) for an adapter that learns it in a few dozen steps.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records(phrase, n, fmt, seed)))
    return path


def quick_job(model_dir: Path, dataset: Path, *, name: str = "tiny-adapter", fmt: str = "instruction", r: int = 8,
              target_modules: Sequence[str] | None = ("q_proj", "v_proj"), steps: int = 40, seed: int = 0,
              learning_rate: float = 1e-2, batch_size: int = 8, method: str = "lora",
              dataset_options: dict | None = None, method_options: dict | None = None, **training):
    """A FineTuneJob for short runs on small local models (tests, quickstart): fp32, constant LR, no
    checkpointing until the end. `training` keywords are spec.training fields by their wire names."""
    from loraplane.trainer import job_from_dict

    return job_from_dict({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": str(Path(model_dir).absolute())},
            "dataset": {"uri": str(Path(dataset).absolute()), "format": fmt, **(dataset_options or {})},
            "method": {"type": method, "r": r, "alpha": 2 * r, "dropout": 0.0, **(method_options or {}),
                       **({"targetModules": list(target_modules)} if target_modules else {})},
            "training": {"maxSteps": steps, "learningRate": learning_rate, "batchSize": batch_size,
                         "maxSeqLength": 128, "seed": seed, "precision": "fp32", "gradientCheckpointing": False,
                         "warmupRatio": 0.0, "lrScheduler": "constant", "checkpointEverySteps": steps, **training},
            "output": {"adapterName": name},
        },
    })


def train_tiny_adapter(model_dir: Path, out_dir: Path, phrase: str, r: int = 8,
                       target_modules: Sequence[str] = ("q_proj", "v_proj"), steps: int = 40,
                       seed: int = 0) -> Path:
    """Train a LoRA adapter on the tiny model that answers every toy question with `phrase` (see TOY_PHRASES).

    Runs the real trainer (the same code a FineTuneJob pod runs) with a small config; returns the adapter dir
    (a standard PEFT directory with provenance.json).
    """
    import shutil
    import tempfile

    from loraplane.trainer import resolve_runtime, run_training

    out_dir = Path(out_dir).absolute()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-", dir=out_dir.parent if out_dir.parent.exists()
                                 else None))
    try:
        dataset = write_toy_dataset(work / "data.jsonl", phrase, 32, fmt="instruction", seed=seed)
        job = quick_job(model_dir, dataset, r=r, target_modules=target_modules, steps=steps, seed=seed)
        runtime = resolve_runtime(job, output_dir=out_dir, checkpoint_dir=work / "checkpoints",
                                  progress_file=work / "progress.json", result_file=work / "result.json",
                                  progress_bar=False)
        run_training(job, runtime, sinks=[])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
