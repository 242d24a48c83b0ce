"""Evaluation after training (spec.evaluation): the new adapter, the base model alone and the version the Adapter
serves now, scored on the same data in the trainer pod.

Two kinds of scores (api.evaluation.EvaluationMetric):
- eval_loss / perplexity on the validation split (spec.dataset.validationSplit or validationUri): the mean token
  cross-entropy (nats) of the response/assistant tokens, weighted by token, and its exponential;
- generation metrics on an evaluation set (spec.evaluation.dataset): each prompt is completed greedily (at most
  maxNewTokens new tokens) and the completion scored against the record's reference: exact_match, contains,
  regex (the record's RE2 pattern; linear time, bounded memory) and rouge_l (ROUGE-L F1 from Google's
  `rouge-score`), each averaged over the examples;
- accuracy of a `classification` job (the content router's classifier), asked exactly as the router asks it:
  `classifier_prompt(text)` completed greedily with the router's token budget (`classifier_max_tokens` of the
  longest label), the answer read by the router's `parse_label` and compared with the record's label. The
  examples are spec.evaluation.dataset's {text, label} records when set, else the validation set's records; the
  new adapter's accuracy per true label is reported too (at most MAX_LABEL_SCORES labels).

One PEFT model serves the three: the adapter trained here (`default`), the base model (peft's `disable_adapter`)
and the previous version loaded as a second adapter (`previous`, removed again before the artifact is saved).
They are interleaved per batch/example, so when the time budget (timeoutSeconds) runs out every model has been
scored on the same examples. Untrusted data: a bad evaluation set fails the run before training starts
(InvalidDataset naming spec.evaluation.dataset and the lines), never in the middle of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from loraplane.api.common import now_rfc3339
from loraplane.api.evaluation import MAX_LABEL_SCORES, EvaluationMetric, EvaluationResult, EvaluationScores
from loraplane.api.finetunejob import EvaluationSpec
from loraplane.api.orchestration import classifier_max_tokens, classifier_prompt, parse_label
from loraplane.api.patterns import compile_re2
from loraplane.api.redaction import redacted
from loraplane.api.wire.trainer import PreviousVersion
from loraplane.trainer import data
from loraplane.trainer.errors import InvalidDataset

log = logging.getLogger("loraplane.trainer")

WHERE = "spec.evaluation.dataset"
MAX_PATTERN_CHARS = 1024        # longest regex pattern of a record
MAX_REFERENCE_CHARS = 65536     # longest reference answer of a record
MESSAGE_LIMIT = 1000            # EvaluationResult.message is at most 1024 characters
DIGITS = 4                      # scores are rounded to this many decimals (they travel in a 4 KiB message)
CANDIDATE, BASE, PREVIOUS = "candidate", "base", "previous"
PREVIOUS_ADAPTER = "previous"   # peft adapter name of the version being replaced while it is scored


# ---- metrics (pure) ------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Whitespace runs as one space, ends stripped: how exact_match and contains compare texts."""
    return " ".join(text.split())


def exact_match(completion: str, reference: str) -> float:
    """1.0 when the completion equals the reference after whitespace normalisation (case-sensitive), else 0.0."""
    return float(normalise(completion) == normalise(reference))


def contains(completion: str, reference: str) -> float:
    """1.0 when the (normalised) reference occurs in the (normalised) completion, else 0.0."""
    return float(normalise(reference) in normalise(completion))


def compile_pattern(pattern: str):
    """An RE2 program for a record's pattern (linear-time matching, program memory bounded at 8 MiB, as the
    loader's target_modules patterns). Raises ValueError saying why RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"it is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    return compile_re2(pattern)


def regex_match(completion: str, pattern) -> float:
    """1.0 when the compiled RE2 `pattern` matches anywhere in the completion (search), else 0.0."""
    return float(pattern.search(completion) is not None)


class _UnicodeWords:
    """rouge-score's tokenizer protocol: lower-cased Unicode word runs. The library's default keeps [a-z0-9]
    only, which scores every non-Latin text 0; for ASCII text both give the same tokens."""

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


_scorer = None


def rouge_l(completion: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words; Lin 2004) of the completion against the reference,
    computed by Google's reference implementation (`rouge-score`), no stemming, Unicode word tokens."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeWords())
    return float(_scorer.score(reference, completion)["rougeL"].fmeasure)


def accuracy(completion: str, label: str | None) -> float:
    """1.0 when the content router would read `label` from the classifier's `completion`
    (api.orchestration.parse_label: the first word, lower-cased), else 0.0."""
    return float(label is not None and parse_label(completion) == label)


def score(metric: str, completion: str, example: "Example") -> float:
    """One example's value of a generation `metric` (api.finetunejob.GenerationMetric)."""
    if metric == EvaluationMetric.accuracy:
        return accuracy(completion, example.label)
    if metric == EvaluationMetric.exact_match:
        return exact_match(completion, example.reference)
    if metric == EvaluationMetric.contains:
        return contains(completion, example.reference)
    if metric == EvaluationMetric.rouge_l:
        return rouge_l(completion, example.reference)
    if metric == EvaluationMetric.regex:
        return regex_match(completion, example.pattern) if example.pattern is not None else 0.0
    raise ValueError(f"unknown generation metric {metric!r}")


# ---- the evaluation set ----------------------------------------------------------------------------------------

@dataclass
class Example:
    """One scored record: its line, the tokenised prompt, the reference answer and the compiled regex (or None);
    a classification record has its expected `label` (and no reference)."""

    line: int
    prompt_ids: list[int]
    reference: str
    pattern: Any = None
    label: str | None = None


@dataclass
class EvalSet:
    """The evaluation set as read and checked: where it came from, its digest and the examples to score.
    A classification set (`classification`) is scored by accuracy with `max_new_tokens` (the router's budget);
    `notes` go to the result's message."""

    uri: str
    sha256: str
    records: int
    examples: list[Example]
    classification: bool = False
    max_new_tokens: int | None = None
    notes: list[str] = field(default_factory=list)


def read_source(spec: EvaluationSpec, scratch: Path, pvc_root: Path, override: Path | None,
                configmap_root: Path) -> data.Source:
    """The evaluation set's records: `override` (--evaluation-path), the mounted ConfigMap key, or the URI fetched
    with the storage fetchers. Raises the Dataset* errors naming spec.evaluation.dataset."""
    ds = spec.dataset
    assert ds is not None
    if override:
        return data.read_file(Path(override), "evaluation path", ds.uri or str(override))
    if ds.config_map_ref:
        ref = ds.config_map_ref
        return data.read_configmap_key(configmap_root, ref.name, ref.key, f"{WHERE}.configMapRef")
    return data.fetch(ds.uri or "", scratch, pvc_root, f"{WHERE}.uri")


def prepare(spec: EvaluationSpec, source: data.Source, tokenizer, context: int | None,
            train_labels: Iterable[str] = ()) -> EvalSet:
    """Check the records (the layout of spec.evaluation.dataset.format, a non-empty reference, a pattern RE2
    accepts when `regex` is scored, a prompt that leaves room for maxNewTokens in the model's `context`) and
    tokenise the prompts of the first maxExamples as in training. A `classification` set is checked as training
    records are (a non-empty text of at most MAX_DECISION_TEXT_CHARS, a label of the LABEL grammar) and asked as
    the router asks (`classification_examples`); `train_labels` are the labels the classifier was trained on
    (labels outside them are noted: they can only count as wrong). Raises InvalidDataset listing the bad lines."""
    ds = spec.dataset
    assert ds is not None
    data.check_records(source, ds, where=WHERE)
    if ds.format == "classification":
        examples = classification_examples(source, [n for n, _ in source.records[: spec.max_examples]],
                                           ds.text_field, ds.label_field, tokenizer, context, WHERE)
        return classification_set(source, examples, train_labels)
    if ds.format == "chat" and not tokenizer.chat_template:
        raise InvalidDataset(f"{WHERE}.format is 'chat' but the base model's tokenizer has no chat template; "
                             "use the instruction format")
    want_regex = EvaluationMetric.regex in spec.metrics
    problems: list[str] = []
    examples: list[Example] = []
    for number, rec in source.records[: spec.max_examples]:
        if ds.format == "instruction":
            prompt_ids = tokenizer(rec[ds.prompt_field], add_special_tokens=True, verbose=False)["input_ids"]
            reference = rec[ds.response_field]
        else:
            messages = rec[ds.messages_field]
            if messages[-1]["role"] != "assistant":
                problems.append(f"line {number}: the last message of {ds.messages_field!r} must be the assistant's "
                                "reference answer")
                continue
            reference = messages[-1]["content"]
            try:
                prompt_ids = list(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                                tokenize=True, return_dict=False))
            except Exception as exc:  # the template's own refusal (jinja2 TemplateError or raise_exception)
                problems.append(f"line {number}: the chat template refuses the prompt messages ({exc})")
                continue
        if not reference.strip():
            problems.append(f"line {number}: the reference answer is empty")
        elif len(reference) > MAX_REFERENCE_CHARS:
            problems.append(f"line {number}: the reference answer has {len(reference)} characters (at most "
                            f"{MAX_REFERENCE_CHARS})")
        if context is not None and len(prompt_ids) + spec.max_new_tokens > context:
            problems.append(f"line {number}: the prompt has {len(prompt_ids)} tokens, which leaves no room for "
                            f"maxNewTokens={spec.max_new_tokens} in the model's context of {context} tokens")
        pattern = None
        if want_regex:
            raw = rec.get(ds.pattern_field)
            if not isinstance(raw, str):
                problems.append(f"line {number} has no string field {ds.pattern_field!r} ({WHERE}.patternField), "
                                "which the regex metric needs")
            else:
                try:
                    pattern = compile_pattern(raw)
                except ValueError as exc:
                    problems.append(f"line {number}: the pattern in {ds.pattern_field!r} is refused: {exc}")
        examples.append(Example(number, prompt_ids, reference, pattern))
    if problems:
        raise data.field_error(problems, min(len(source.records), spec.max_examples),
                               f"Fix the records of the evaluation set ({WHERE}).")
    return EvalSet(source.uri, source.sha256, len(source.records), examples)


def classification_examples(source: data.Source, lines: Iterable[int], text_field: str, label_field: str,
                            tokenizer, context: int | None, where: str) -> list[Example]:
    """The records of `source` at `lines` (checked classification records) as examples asked the way the content
    router asks: the prompt `classifier_prompt(text)` tokenised as vLLM's completions endpoint and the trainer
    tokenise it (with the tokenizer's special tokens), the record's label expected. Raises InvalidDataset (naming
    `where` and the lines) for a prompt that leaves no room for the answer in the model's `context`."""
    by_line = dict(source.records)
    examples: list[Example] = []
    problems: list[str] = []
    for number in lines:
        rec = by_line[number]
        prompt_ids = tokenizer(classifier_prompt(rec[text_field]), add_special_tokens=True,
                               verbose=False)["input_ids"]
        label = rec[label_field]
        if context is not None and len(prompt_ids) + classifier_max_tokens(len(label)) > context:
            problems.append(f"line {number}: the classifier prompt has {len(prompt_ids)} tokens, which leaves no "
                            f"room for the label in the model's context of {context} tokens")
            continue
        examples.append(Example(number, prompt_ids, "", label=label))
    if problems:
        raise data.field_error(problems, len(examples) + len(problems),
                               f"Shorten the texts of these records ({where}).")
    return examples


def classification_set(source: data.Source, examples: list[Example], train_labels: Iterable[str],
                       uri: str | None = None) -> EvalSet:
    """A classification EvalSet of `examples`, answered with the router's token budget for the longest label of
    the examples and of `train_labels` (what the classifier may answer). Labels of the examples the training data
    does not have are noted (they count as wrong: the classifier never learnt to answer them)."""
    known = set(train_labels)
    labels = {e.label for e in examples if e.label is not None}
    longest = max((len(label) for label in labels | known), default=0)
    notes = []
    if known and (unknown := sorted(labels - known)):
        shown = ", ".join(unknown[:5]) + (", …" if len(unknown) > 5 else "")
        notes.append(f"{len(unknown)} label(s) of the evaluated records are not in the training data ({shown}): "
                     "they count as wrong")
    return EvalSet(uri or source.uri, source.sha256, len(source.records), examples, classification=True,
                   max_new_tokens=classifier_max_tokens(longest), notes=notes)


# ---- the previous version ------------------------------------------------------------------------------------

def fetch_previous(previous: PreviousVersion, scratch: Path, pvc_root: Path) -> Path:
    """The local directory of the version being replaced: its local or PVC path as mounted, else fetched and
    verified (sha256 when known) with the storage layer's artifact cache. Raises ValueError saying why not."""
    from loraplane.storage.cache import ArtifactCache, FetchError, adapter_root
    from loraplane.storage.fetchers import FetchPolicy
    from loraplane.storage.uri import try_parse_uri

    parsed = try_parse_uri(previous.uri)
    if parsed is None:
        raise ValueError(f"its URI {redacted(previous.uri)!r} is not one loraplane reads")
    local = parsed.local_path(pvc_root) if parsed.is_local else None
    if parsed.is_local:
        if local is None or not local.is_dir():
            raise ValueError(f"{redacted(previous.uri)} is not mounted in this pod")
        return adapter_root(local)
    cache = ArtifactCache(scratch / "previous-adapter", max_bytes=8 << 30, pvc_root=str(pvc_root),
                          policy=FetchPolicy.from_env())
    try:
        return asyncio.run(cache.fetch(previous.uri, previous.sha256, version=previous.version)).path
    except FetchError as exc:
        raise ValueError(f"fetching {redacted(previous.uri)} failed: {exc}") from exc


# The previous version's adapter_config.json is untrusted (whoever may set the Adapter's source wrote it) and PEFT
# reads several of its fields as Python regular expressions, run with the backtracking engine against every
# module name while holding the GIL: target_modules and exclude_modules (a string is full-matched), the keys of
# rank_pattern and alpha_pattern, and names it pastes into patterns unescaped (modules_to_save, layers_pattern).
# One such pattern (`(.|.)*x`) held the trainer for hours after training, before the new adapter was saved.
MAX_PREVIOUS_CONFIG_BYTES = 1 << 20     # as the loader's gate (PEFT writes about 1 KB)
MAX_PATTERN_KEYS = 1024                  # rank_pattern / alpha_pattern keys, as the loader's gate
# A name PEFT may paste into a regex: module-name characters only ('.' matches itself among others; no
# quantifier, group or alternation, so matching stays polynomial and short).
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
# Fields PEFT reads as lists of names pasted into patterns or matched as suffixes.
_NAME_LIST_FIELDS = ("modules_to_save", "layers_pattern", "target_parameters")
# init_lora_weights values that only set initial weights (the loader's gate: loader/gate.py _PLAIN_INITS); the
# others (pissa, olora, corda, loftq) rewrite the base model's weights when the adapter is added, which would
# change the base and candidate scores of this run.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


def _module_pattern(pattern: str, what: str):
    try:
        return compile_pattern(pattern)
    except ValueError as exc:
        raise ValueError(f"its {what} {pattern[:80]!r} cannot be matched safely: {exc}") from exc


def safe_previous_config(config: Any, module_names: list[str]) -> dict[str, Any]:
    """The previous version's adapter_config.json as PEFT may load it without running an untrusted regular
    expression: string target_modules / exclude_modules become the list of `module_names` (the full names of the
    model it is loaded into) RE2 full-matches, as PEFT would with `re.fullmatch`; rank_pattern / alpha_pattern
    keys become the escaped full names of the modules whose first RE2-matching key (PEFT's order, `(.*\\.)?(KEY)$`)
    they were. Raises ValueError saying why it cannot be scored: not a LoRA config, a pattern RE2 refuses, a
    name list field with regex syntax, layer_replication or Megatron settings (they change or import into the
    model) or an init_lora_weights that rewrites the base weights."""
    if not isinstance(config, dict):
        raise ValueError("its adapter_config.json is not a JSON object")
    out = dict(config)
    if str(out.get("peft_type") or "LORA").upper() != "LORA":
        raise ValueError(f"its peft_type is {out.get('peft_type')!r}, not LORA")
    for key in ("layer_replication", "megatron_config"):   # megatron_core (PEFT writes a default) is read only with megatron_config
        if out.get(key):
            raise ValueError(f"its adapter_config.json sets {key}, which changes the model it is loaded into")
    init = out.get("init_lora_weights", True)
    if not isinstance(init, bool) and not (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        raise ValueError(f"its init_lora_weights {str(init)[:40]!r} rewrites the base model's weights")
    for key in ("target_modules", "exclude_modules"):
        value = out.get(key)
        if isinstance(value, str) and value != "all-linear":
            program = _module_pattern(value, key)
            out[key] = [n for n in module_names if program.fullmatch(n)]
            if key == "target_modules" and not out[key]:
                raise ValueError(f"its target_modules {value[:80]!r} matches no module of this model")
        elif isinstance(value, list):
            if len(value) > 10_000 or not all(isinstance(v, str) for v in value):
                raise ValueError(f"its {key} is not a list of at most 10000 module names")
        elif value is not None and value != "all-linear":
            raise ValueError(f"its {key} is neither a list of module names nor a regular expression")
    for key in _NAME_LIST_FIELDS:
        value = out.get(key)
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None \
            else None
        if names is None or len(names) > 10_000 or not all(isinstance(n, str) and _PLAIN_NAME.match(n)
                                                           for n in names):
            raise ValueError(f"its {key} must list plain module names (letters, digits, '_', '.', '-')")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = out.get(key) or {}
        if not isinstance(pattern, dict) or len(pattern) > MAX_PATTERN_KEYS \
                or not all(isinstance(k, str) for k in pattern):
            raise ValueError(f"its {key} is not a map of at most {MAX_PATTERN_KEYS} module name patterns")
        programs = [(k, _module_pattern(rf"(.*\.)?({k})$", f"{key} key")) for k in pattern]
        resolved: dict[str, Any] = {}
        for name in module_names:
            hit = next((k for k, program in programs if program.match(name)), None)
            if hit is not None:
                resolved[re.escape(name)] = pattern[hit]
        out[key] = resolved
    return out


def load_previous(peft_model, previous: PreviousVersion, scratch: Path, pvc_root: Path, identity: str) -> None:
    """Load the previous version into `peft_model` as adapter PREVIOUS_ADAPTER. Its adapter_config.json (at most
    MAX_PREVIOUS_CONFIG_BYTES) is made safe to load first (`safe_previous_config`, written with links to its
    weights under `scratch`). Raises ValueError saying why it cannot be scored (not fetchable, another base
    model, a config PEFT would run untrusted patterns from, an adapter peft cannot load onto this model)."""
    import json
    import shutil

    path = Path(fetch_previous(previous, scratch, pvc_root))
    try:
        with open(path / "adapter_config.json", "rb") as fh:
            raw = fh.read(MAX_PREVIOUS_CONFIG_BYTES + 1)
        if len(raw) > MAX_PREVIOUS_CONFIG_BYTES:
            raise ValueError(f"it is more than {MAX_PREVIOUS_CONFIG_BYTES} bytes")
        config = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ValueError(f"its adapter_config.json cannot be read ({exc})") from exc
    trained_on = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if trained_on and trained_on != identity:
        raise ValueError(f"it was trained on base model {trained_on!r}, this run on {identity!r}")
    names = [n for n, _ in peft_model.base_model.model.named_modules()]
    safe = safe_previous_config(config, names)
    weights = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).is_file()][:1]
    if not weights:
        raise ValueError("it has no adapter_model.safetensors")
    staged = scratch / "previous-adapter-config"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    (staged / "adapter_config.json").write_text(json.dumps(safe))
    (staged / weights[0]).symlink_to((path / weights[0]).resolve())
    try:
        peft_model.load_adapter(str(staged), adapter_name=PREVIOUS_ADAPTER, is_trainable=False)
    except Exception as exc:  # peft/torch refuse shapes or modules of another architecture
        raise ValueError(f"peft cannot load it onto this model ({type(exc).__name__}: {str(exc)[:200]})") from exc


# ---- scoring ---------------------------------------------------------------------------------------------------

@dataclass
class _Tally:
    sums: dict[str, float] = field(default_factory=dict)
    loss_sum: float = 0.0
    loss_tokens: int = 0
    loss_examples: int = 0
    examples: int = 0
    # classification: true label -> [examples, answered right]
    labels: dict[str, list[int]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.sums[metric] = self.sums.get(metric, 0.0) + value

    def add_label(self, label: str, right: bool) -> None:
        counts = self.labels.setdefault(label, [0, 0])
        counts[0] += 1
        counts[1] += int(right)


def _modes(peft_model, with_previous: bool) -> dict[str, Callable[[], Any]]:
    """Context managers that make `peft_model` act as each model scored."""

    @contextmanager
    def adapter(name: str) -> Iterator[None]:
        peft_model.set_adapter(name)
        try:
            yield
        finally:
            peft_model.set_adapter("default")

    modes: dict[str, Callable[[], Any]] = {CANDIDATE: nullcontext, BASE: peft_model.disable_adapter}
    if with_previous:
        modes[PREVIOUS] = lambda: adapter(PREVIOUS_ADAPTER)
    return modes


def _batch_loss(model, batch: dict) -> tuple[float, int]:
    """(summed token cross-entropy in nats, tokens) of a collated batch; labels IGNORE_INDEX carry no loss."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=data.IGNORE_INDEX, reduction="sum")
    return float(loss), int((labels != data.IGNORE_INDEX).sum())


def _complete(model, tokenizer, example: Example, max_new_tokens: int, device) -> str:
    import torch

    ids = torch.tensor([example.prompt_ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate(peft_model, tokenizer, spec: EvaluationSpec, eval_set: EvalSet | None,
             validation_rows: list[dict] | None, batch_size: int, previous: PreviousVersion | None = None,
             scratch: Path | None = None, pvc_root: Path | None = None, identity: str = "",
             clock: Callable[[], float] = time.monotonic, classification: bool = False) -> EvaluationResult:
    """Score the candidate adapter, the base model and (when `previous` is given and loads) the previous version
    on the same data, within spec.timeoutSeconds (at least one batch and one example are scored). Returns the
    api.evaluation result; what could not be scored is said in its `message`. The previous adapter is removed
    from `peft_model` before returning, so the saved artifact holds the new adapter only.

    `classification`: the job trains the content router's classifier; `eval_set` is then a classification set
    (evaluation.dataset, or the validation records: `classification_set`), scored by accuracy, the default
    primary metric."""
    import torch

    deadline = clock() + spec.timeout_seconds
    notes: list[str] = list(eval_set.notes) if eval_set is not None else []
    metrics = [EvaluationMetric.accuracy.value] if eval_set is not None and eval_set.classification \
        else spec.generation_metrics(classification)
    max_new_tokens = (eval_set.max_new_tokens if eval_set is not None else None) or spec.max_new_tokens
    with_previous = False
    if previous is not None and spec.compare_previous:
        try:
            load_previous(peft_model, previous, scratch or Path("."), pvc_root or Path("."), identity)
            with_previous = True
        except ValueError as exc:
            version = f" {previous.version}" if previous.version else ""
            notes.append(f"previous version{version} not scored: {exc}")
            log.warning("%s", notes[-1])
    modes = _modes(peft_model, with_previous)
    tallies = {name: _Tally() for name in modes}
    device = next(peft_model.parameters()).device
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            if validation_rows:
                rows = validation_rows[: spec.max_examples]
                collate = data.PaddingCollator(tokenizer.pad_token_id)
                done = 0
                for start in range(0, len(rows), batch_size):
                    if start and clock() >= deadline:
                        notes.append(f"time budget ({spec.timeout_seconds} s) reached: eval_loss covers {done} of "
                                     f"{len(rows)} validation examples")
                        break
                    batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
                    for name, mode in modes.items():
                        with mode():
                            loss, tokens = _batch_loss(peft_model, batch)
                        tallies[name].loss_sum += loss
                        tallies[name].loss_tokens += tokens
                        tallies[name].loss_examples += len(batch["input_ids"])
                    done += len(batch["input_ids"])
            if eval_set is not None:
                for i, example in enumerate(eval_set.examples):
                    if i and clock() >= deadline:
                        notes.append(f"time budget ({spec.timeout_seconds} s) reached: generation metrics cover {i} "
                                     f"of {len(eval_set.examples)} examples")
                        break
                    for name, mode in modes.items():
                        with mode():
                            completion = _complete(peft_model, tokenizer, example, max_new_tokens, device)
                        for metric in metrics:
                            tallies[name].add(metric, score(metric, completion, example))
                        if example.label is not None:
                            tallies[name].add_label(example.label, bool(accuracy(completion, example.label)))
                        tallies[name].examples += 1
    finally:
        if with_previous:
            peft_model.set_adapter("default")
            peft_model.delete_adapter(PREVIOUS_ADAPTER)
        peft_model.train(was_training)
    scores = {name: _scores(t, per_label=name == CANDIDATE) for name, t in tallies.items()}
    if len(tallies[CANDIDATE].labels) > MAX_LABEL_SCORES:
        notes.append(f"per-label accuracy left out: the examples have {len(tallies[CANDIDATE].labels)} labels (at "
                     f"most {MAX_LABEL_SCORES} are reported)")
    primary = spec.primary(classification)
    if primary not in scores[CANDIDATE].metrics:
        notes.append(f"the primary metric {primary} was not computed")
    message = "; ".join(notes)
    return EvaluationResult(
        primary_metric=primary, candidate=scores[CANDIDATE], base=scores[BASE], previous=scores.get(PREVIOUS),
        previous_version=previous.version if with_previous and previous else None, evaluated_at=now_rfc3339(),
        score=scores[CANDIDATE].metrics.get(primary), base_score=scores[BASE].metrics.get(primary),
        message=(message[: MESSAGE_LIMIT - 2] + " …" if len(message) > MESSAGE_LIMIT else message) or None)


def _scores(t: _Tally, per_label: bool = False) -> EvaluationScores:
    """A model's tally as scores; `per_label`: with each true label's accuracy (classification, at most
    MAX_LABEL_SCORES labels)."""
    metrics: dict[str, float] = {}
    if t.loss_tokens:
        loss = t.loss_sum / t.loss_tokens
        metrics[EvaluationMetric.eval_loss] = round(loss, DIGITS)
        metrics[EvaluationMetric.perplexity] = round(math.exp(min(loss, 50.0)), DIGITS)
    if t.examples:
        metrics.update({m: round(v / t.examples, DIGITS) for m, v in t.sums.items()})
    # examples: the generation examples scored, else (loss metrics only) the validation examples.
    labels = ({label: round(right / n, DIGITS) for label, (n, right) in sorted(t.labels.items())}
              if per_label and 0 < len(t.labels) <= MAX_LABEL_SCORES else None)
    return EvaluationScores(metrics={str(k): v for k, v in metrics.items()}, examples=t.examples or t.loss_examples,
                            labels=labels)
