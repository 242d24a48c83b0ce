"""Datasets: fetch (local path, https, s3, Hugging Face hub; loraplane.storage does the transfer), validate, tokenise with loss masks, split.

Formats (spec.dataset.format), one JSON object per line:
- text:        {"text": "..."}                       loss on every token; longer records are truncated
- instruction: {"prompt": "...", "response": "..."}  trained as prompt + response + EOS, loss on the response
- chat:        {"messages": [{"role", "content"}]}   rendered with the tokenizer's chat template; loss on
                                                     assistant turns only
- classification: {"text": "...", "label": "..."}    the content router's classifier: trained as the instruction
                                                     record {classifier_prompt(text), classifier_completion(label)}
                                                     (api.orchestration), so the router asks exactly what was
                                                     trained; loss on the label (and EOS) only
Field names are configurable (textField, promptField, responseField, messagesField, labelField). Records of the
instruction, chat and classification formats longer than maxSeqLength are rejected with their line numbers
(truncating them would train on answers cut mid-way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.api.finetunejob import DatasetSpec
from loraplane.api.orchestration import LABEL, MAX_DECISION_TEXT_CHARS, classifier_completion, classifier_prompt
from loraplane.api.redaction import redacted
from loraplane.storage.digest import sha256_file
from loraplane.storage.errors import (
    AccessDenied,
    MissingDependency,
    NoCredentials,
    Refused,
    NotFound,
    OfflineMiss,
    StorageError,
)
from loraplane.storage.fetchers import FetchPolicy, fetcher_for
from loraplane.storage.fetchers.hf import load_hub_dataset
from loraplane.storage.uri import ArtifactUri, Scheme
from loraplane.trainer.config import spec_uri
from loraplane.trainer.errors import (
    DatasetAccessDenied,
    DatasetNotFound,
    DatasetUnavailable,
    InvalidConfig,
    InvalidDataset,
    TrainerError,
)

log = logging.getLogger("loraplane.trainer")
IGNORE_INDEX = -100  # label of tokens that carry no loss (the value transformers' loss ignores)
CHAT_ROLES = ("system", "user", "assistant", "tool")
_LABEL = re.compile(LABEL)
MAX_LABEL_CHARS = 63  # ContentDestination.label's limit: a label no destination can carry could never route
_MAX_LISTED = 5  # line numbers quoted in an error message


@dataclass
class Source:
    """Records read from one location, with the digest that provenance records."""

    uri: str
    records: list[tuple[int, Any]]  # (line number, parsed JSON value)
    sha256: str


@dataclass
class Examples:
    """Tokenised records: input_ids and labels (IGNORE_INDEX where no loss), with their source lines."""

    rows: list[dict[str, list[int]]]
    lines: list[int]

    @property
    def tokens(self) -> int:
        """Total tokens over all rows (input_ids lengths)."""
        return sum(len(r["input_ids"]) for r in self.rows)


# ---- fetching -----------------------------------------------------------------------------------------

def fetch(uri: str, dest_dir: Path, pvc_root: Path, what: str = "spec.dataset.uri") -> Source:
    """Read the records at `uri` (a local path, file://, pvc://, https://, s3:// or hf://).

    Remote files are downloaded into `dest_dir` with the storage layer's fetchers; their failures become
    DatasetNotFound / DatasetAccessDenied / DatasetUnavailable naming `what` and the fix."""
    parsed = spec_uri(uri, what)
    if parsed.scheme == Scheme.HF:
        return _fetch_hub(parsed, what)
    path = parsed.local_path(pvc_root)
    if path is None:
        if parsed.scheme == Scheme.S3 and not parsed.key:
            raise InvalidConfig(f"{what}: {redacted(uri)!r} must be s3://BUCKET/KEY")
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / f"dataset-{hashlib.sha256(uri.encode()).hexdigest()[:12]}{_suffix(parsed)}"
        try:
            # The dataset's credentials Secret is the user's own: its HF_TOKEN may go to huggingface.co (gated data).
            fetcher_for(parsed, send_hub_token=True, policy=FetchPolicy.from_env()).fetch_file(parsed, path)
        except StorageError as exc:
            raise _dataset_error(exc, parsed, what) from exc
    return read_file(path, what, uri)


def _suffix(uri: ArtifactUri) -> str:
    return ".json" if uri.name.endswith(".json") else ".jsonl"


def _dataset_error(exc: StorageError, uri: ArtifactUri, what: str) -> TrainerError:
    """A storage failure as the trainer's dataset reason, with the fix for the URI's scheme."""
    s3 = uri.scheme == Scheme.S3
    if isinstance(exc, (MissingDependency, Refused)):   # retrying cannot help either
        return InvalidConfig(f"{what}: {exc}")
    if isinstance(exc, NoCredentials):
        return DatasetAccessDenied(f"{what}: no AWS credentials to read {uri}; set spec.dataset.credentialsSecretRef "
                                   "to a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or give the pod "
                                   "an IAM role)")
    if isinstance(exc, NotFound):
        return DatasetNotFound(f"{what}: {uri} does not exist ({exc.detail}); check the "
                               + ("bucket and key" if s3 else "URL"))
    if isinstance(exc, AccessDenied):
        return DatasetAccessDenied(f"{what}: access to {uri} denied ({exc.detail}); check the credentials in "
                                   "spec.dataset.credentialsSecretRef " + ("and the bucket policy" if s3 else
                                                                           "or use a pre-signed URL"))
    return DatasetUnavailable(f"{what}: fetching {uri} failed: {exc.detail}; retry later, or check "
                              + ("AWS_ENDPOINT_URL" if s3 else "the URL") + " and the pod's network access")


def _fetch_hub(uri: ArtifactUri, what: str) -> Source:
    """hf://ORG/DATASET[@revision]: the `train` split, through `datasets` (offline mode honoured)."""
    name, revision = uri.repo, uri.revision
    try:
        ds = load_hub_dataset(uri, split="train")
    except OfflineMiss as exc:
        raise DatasetNotFound(f"{what}: hub dataset {name!r} is not in the local cache and offline mode is on "
                              f"(HF_HUB_OFFLINE=1); pre-fetch it or allow network access ({exc.detail})") from exc
    except MissingDependency as exc:
        raise InvalidConfig(f"{what}: {exc}") from exc
    except AccessDenied as exc:
        raise DatasetAccessDenied(f"{what}: hub dataset {name!r} needs a token: set HF_TOKEN through "
                                  f"spec.dataset.credentialsSecretRef ({exc.detail})") from exc
    except NotFound as exc:
        raise DatasetNotFound(f"{what}: hub dataset {name!r} (revision {revision or 'main'}) not found; "
                              f"check the id ({exc.detail})") from exc
    except StorageError as exc:
        raise DatasetUnavailable(f"{what}: loading hub dataset {name!r} failed: {exc.detail}") from exc
    records = [(i + 1, dict(row)) for i, row in enumerate(ds)]
    digest = hashlib.sha256()
    for _, row in records:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
    return Source(uri=uri.text, records=records, sha256=digest.hexdigest())


def read_configmap_key(root: Path, name: str, key: str, what: str) -> Source:
    """The records of ConfigMap `name`'s key `key`, mounted under `root` (`<root>/<name>/<key>`, as the trainer
    Job mounts it). Raises DatasetNotFound naming `what` (the configMapRef field) and, since only the trainer pod
    has it mounted, how to train outside one: `loraplane train` on a manifest found no file at /data/... and said
    only to check the path."""
    path = Path(root) / name / key
    if not path.exists():
        raise DatasetNotFound(
            f"{what}: ConfigMap {name} key {key} is not mounted here (no file at {path}): in the trainer pod the "
            f"operator mounts it, so the ConfigMap has no such key. Outside a pod, pass the file (--dataset-path FILE, or --evaluation-path FILE for "
            f"spec.evaluation) or set LORAPLANE_CONFIGMAP_ROOT to a folder holding {name}/{key}; `loraplane run -f "
            "FILE` reads the ConfigMaps of its file itself")
    return read_file(path, what, f"configmap://{name}/{key}")


def read_file(path: Path, what: str, uri: str | None = None) -> Source:
    """Parse a JSONL file (or a .json array) into numbered records."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json"))
        if len(candidates) != 1:
            raise InvalidConfig(f"{what}: {path} is a directory with {len(candidates)} .jsonl/.json files; "
                                "point the URI at one file")
        path = candidates[0]
    if not path.is_file():
        raise DatasetNotFound(f"{what}: no file at {path}; check the path (and that its volume is mounted)")
    text = path.read_text(encoding="utf-8", errors="replace")
    records: list[tuple[int, Any]] = []
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except ValueError as exc:
            raise InvalidDataset(f"{what}: {path} is not valid JSON: {exc}") from exc
    else:
        bad = []
        # Lines end at "\n" only (a "\r" before it is JSON whitespace): str.splitlines() would also split at
        # U+2028/U+2029, U+0085 and \x1c-\x1e, which JSON strings may hold unescaped (json.dumps with
        # ensure_ascii=False writes them), breaking valid records and shifting every line number after them.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except ValueError as exc:
                bad.append(f"line {number}: {exc.msg}")
        if bad:
            raise InvalidDataset(f"{what}: {path} has {len(bad)} line(s) that are not JSON ("
                                 f"{'; '.join(bad[:_MAX_LISTED])}); the file must hold one JSON object per line")
    if not records:
        raise InvalidDataset(f"{what}: {path} is empty (no records); it must hold one JSON object per line")
    return Source(uri=uri or str(path), records=records, sha256=sha256_file(path))


# ---- validation and tokenisation ----------------------------------------------------------------------

def field_error(problems: list[str], total: int, hint: str) -> InvalidDataset:
    """InvalidDataset listing the first problems (record lines and what is wrong), how many records of `total`
    are bad, and `hint` (what to change)."""
    listed = "; ".join(problems[:_MAX_LISTED]) + (f"; … {len(problems) - _MAX_LISTED} more"
                                                  if len(problems) > _MAX_LISTED else "")
    return InvalidDataset(f"{len(problems)} of {total} records are invalid: {listed}. {hint}")


def check_records(source: Source, spec: DatasetSpec, where: str = "spec.dataset") -> None:
    """Each record has the fields its format needs, with the right types; errors name lines and the settings
    under `where` (spec.dataset, or spec.evaluation.dataset whose spec has the same field names)."""
    fmt = spec.format
    needed = {"text": [("textField", getattr(spec, "text_field", "text"))],
              "instruction": [("promptField", spec.prompt_field), ("responseField", spec.response_field)],
              "chat": [("messagesField", spec.messages_field)],
              "classification": [("textField", getattr(spec, "text_field", "text")),
                                 ("labelField", getattr(spec, "label_field", "label"))]}[fmt]
    problems: list[str] = []
    seen_fields: set[str] = set()
    for number, rec in source.records:
        if not isinstance(rec, dict):
            problems.append(f"line {number} is a {type(rec).__name__}, not a JSON object")
            continue
        seen_fields.update(rec)
        for setting, name in needed:
            if name not in rec:
                problems.append(f"line {number} has no field {name!r} ({where}.{setting})")
            elif fmt == "chat":
                problems.extend(f"line {number}: {p}" for p in _chat_problems(rec[name], name))
            elif not isinstance(rec[name], str):
                problems.append(f"line {number}: field {name!r} must be a string, got {type(rec[name]).__name__}")
            elif fmt == "classification":
                problems.extend(f"line {number}: {p}" for p in _classification_problems(rec[name], name, setting))
    if problems:
        names = ", ".join(f"{where}.{s}={n!r}" for s, n in needed)
        found = ", ".join(sorted(seen_fields)[:12]) or "none"
        raise field_error(problems, len(source.records),
                           f"The {fmt!r} format reads {names}; the records have fields: {found}. Set the "
                           f"field names in {where} (or {where}.format) to match the data.")


def _classification_problems(value: str, name: str, setting: str) -> list[str]:
    """A classification record's text (non-empty, at most MAX_DECISION_TEXT_CHARS: the router reads no more of a
    request) or label (api.orchestration.LABEL, at most 63 characters: what a contentRouting destination's
    `label` may be)."""
    if setting == "textField":
        if not value.strip():
            return [f"field {name!r} is empty (a request text to classify is needed)"]
        if len(value) > MAX_DECISION_TEXT_CHARS:
            return [f"field {name!r} has {len(value)} characters, more than the {MAX_DECISION_TEXT_CHARS} the "
                    "content router reads of a request; cut it to that length"]
        return []
    if len(value) > MAX_LABEL_CHARS or not _LABEL.fullmatch(value):  # fullmatch: `$` allows a final \n
        shown = value if len(value) <= 40 else value[:40] + "…"
        return [f"field {name!r} is {shown!r}, not a label (lower-case letters, digits, '-' and '_', starting and "
                f"ending with a letter or digit, at most {MAX_LABEL_CHARS} characters, as contentRouting "
                "destinations' `label`)"]
    return []


def label_counts(source: Source, spec: DatasetSpec) -> dict[str, int]:
    """Records per label of a checked `classification` source (provenance: what the classifier can answer)."""
    counts = Counter(rec[spec.label_field] for _, rec in source.records)
    return dict(sorted(counts.items()))


def _chat_problems(messages: Any, name: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"field {name!r} must be a non-empty list of {{role, content}} messages"]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            out.append(f"{name}[{i}] must be an object with string 'role' and 'content'")
        elif m["role"] not in CHAT_ROLES:
            out.append(f"{name}[{i}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
    if not out and not any(m["role"] == "assistant" for m in messages):
        out.append(f"field {name!r} has no assistant message (nothing to learn)")
    return out


def tokenize(source: Source, spec: DatasetSpec, tokenizer, max_len: int, packing: bool = False) -> Examples:
    """Tokenise checked records into input_ids + labels. Raises InvalidDataset for over-long records."""
    check_records(source, spec)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows: list[dict[str, list[int]]] = []
    lines: list[int] = []
    too_long: list[tuple[int, int]] = []
    refused: list[str] = []   # "line N: the chat template's message"
    if spec.format == "chat" and not tokenizer.chat_template:
        raise InvalidConfig("spec.dataset.format is 'chat' but the base model's tokenizer has no chat template; "
                            "use the instruction or text format, or a model with a chat template")
    for number, rec in source.records:
        if spec.format == "text":
            ids = tokenizer(rec[spec.text_field], add_special_tokens=True, verbose=False)["input_ids"] + eos
            if not packing:
                ids = ids[:max_len]  # text is truncated, as documented for the format
            labels = list(ids)
        elif spec.format in ("instruction", "classification"):
            if spec.format == "instruction":
                prompt_text, answer_text = rec[spec.prompt_field], rec[spec.response_field]
            else:  # the router asks with classifier_prompt and reads the first word of the answer
                prompt_text = classifier_prompt(rec[spec.text_field])
                answer_text = classifier_completion(rec[spec.label_field])
            prompt = tokenizer(prompt_text, add_special_tokens=True, verbose=False)["input_ids"]
            answer = tokenizer(answer_text, add_special_tokens=False, verbose=False)["input_ids"] + eos
            ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
        else:
            try:
                ids, labels = _tokenize_chat(rec[spec.messages_field], tokenizer, number)
            except _TemplateRefused as exc:
                refused.append(f"line {number}: {exc}")
                continue
        if len(ids) > max_len and not (spec.format == "text"):
            too_long.append((number, len(ids)))
            continue
        rows.append({"input_ids": ids, "labels": labels})
        lines.append(number)
    if refused:
        raise field_error(refused, len(source.records),
                           "The base model's chat template refuses these conversations (its own message is "
                           "quoted); fix them as it asks (e.g. alternate user and assistant turns, fold a system "
                           "message into the first user turn), or use the instruction format")
    if too_long:
        worst = max(too_long, key=lambda t: t[1])
        listed = ", ".join(str(n) for n, _ in too_long[:_MAX_LISTED]) + (", …" if len(too_long) > _MAX_LISTED else "")
        raise InvalidDataset(
            f"{len(too_long)} of {len(source.records)} records are longer than spec.training.maxSeqLength="
            f"{max_len} tokens (lines {listed}; the longest, line {worst[0]}, has {worst[1]} tokens); raise "
            "spec.training.maxSeqLength (up to the model's context length) or shorten or split those records")
    if not any(any(label != IGNORE_INDEX for label in r["labels"]) for r in rows):
        raise InvalidDataset("no record has any token to learn from (every response/assistant turn is empty)")
    if packing:
        if spec.format != "text":
            raise InvalidConfig("spec.training.packing works with the text format only (instruction, chat and "
                                "classification records keep their boundaries so their loss masks stay right); "
                                "set packing: false")
        rows, lines = _pack(rows, lines, max_len)
    return Examples(rows=rows, lines=lines)


class _TemplateRefused(Exception):
    """The chat template raised on one record's conversation (its message is the exception's text)."""


def _tokenize_chat(messages: list[dict], tokenizer, number: int) -> tuple[list[int], list[int]]:
    """Render with the chat template; label only the characters each assistant turn adds.

    The assistant spans are found by rendering prefixes of the conversation: the text a turn adds is what
    `render(messages[:i+1])` has beyond `render(messages[:i], add_generation_prompt=True)`. This works with any
    template that renders conversations incrementally (nearly all do) and needs no `{% generation %}` markers.

    Raises `_TemplateRefused` when the template refuses the conversation: templates call `raise_exception(...)`
    (a jinja2 TemplateError) for roles that do not alternate, a system role they do not support, and the like,
    which is the record's fault, not the trainer's. A template that is not valid Jinja is InvalidConfig.
    """
    from jinja2 import TemplateError, TemplateSyntaxError

    def render(msgs, gen_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        except TemplateSyntaxError as exc:
            raise InvalidConfig(f"the base model's chat template is not valid Jinja ({exc}); fix the tokenizer's "
                                "chat_template or use the instruction format") from exc
        except TemplateError as exc:
            raise _TemplateRefused(str(exc) or type(exc).__name__) from exc

    full = render(messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise InvalidDataset(
                f"line {number}: the tokenizer's chat template does not render this conversation incrementally "
                "(a prefix of the conversation renders differently), so assistant turns cannot be located for "
                "the loss mask; use the instruction format for this model")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tok, (start, _end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _pack(rows: list[dict], lines: list[int], max_len: int) -> tuple[list[dict], list[int]]:
    """Concatenate text records (each ends with EOS) and cut them into max_len blocks: no padding wasted."""
    ids = [t for r in rows for t in r["input_ids"]]
    blocks = [ids[i:i + max_len] for i in range(0, len(ids), max_len)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks], list(range(1, len(blocks) + 1))


def split(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out `fraction` of the examples (at least one), chosen by a seeded shuffle."""
    n = len(examples.rows)
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise InvalidDataset(f"spec.dataset.validationSplit={fraction} leaves no training records out of {n}; "
                             "add records or remove validationSplit")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    pick = lambda idx: Examples([examples.rows[i] for i in idx], [examples.lines[i] for i in idx])  # noqa: E731
    return pick(train), pick(val)


class PaddingCollator:
    """Pads a batch to its longest row: pad id in input_ids, IGNORE_INDEX in labels, 0 in attention_mask."""

    def __init__(self, pad_token_id: int, multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict:
        import torch

        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        if self.multiple_of:
            width = -(-width // self.multiple_of) * self.multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
