"""Content routing, the pure part (issue 15; no I/O): what the router reads from a request to decide and the rules
compiled once per table.

- `decision_text(obj, chat)`: the last `user` message of a chat request (a string, or the text parts of a
  content list) or the `prompt` of a completions request (a string, or the first of a list), cut to
  `api.orchestration.MAX_DECISION_TEXT_CHARS`, as UTF-8 bytes (what the RE2 programs search; lone surrogates,
  which JSON can spell and UTF-8 cannot, become U+FFFD).
- `CompiledContentModel.compile(model)`: a `ContentModel` of the serving table with its rules compiled: the
  pattern and one alternation of the keywords per destination as RE2 programs (linear-time matching, program
  memory bounded like the loader's gate patterns: `RE2_MAX_MEM`), the headers as exact (lower-cased name, value)
  byte pairs. A destination whose pattern RE2 refuses keeps no rules (its `problems` say why); the table's other
  entries are unaffected.

The reading of a classifier's answer (`parse_label`) is in api.orchestration: the trainer's `accuracy` reads
answers with it too.

orchestrate.py runs the decision (sub-requests, budgets, fallbacks); dispatch.py calls it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

import re2   # google-re2: linear-time matching, bounded memory (as loader/gate.py)

from loraplane.api import patterns
from loraplane.api.orchestration import MAX_DECISION_TEXT_CHARS, ContentModel, WireDestination

# Program memory of one compiled RE2 (bytes): the shared bound (api.patterns), as loader/gate.py and
# trainer/evaluate.py. 256 keywords of 200 characters each, case-insensitive, compile in ~1 MiB with the
# boundaries factored out (see _keyword_program).
RE2_MAX_MEM = patterns.RE2_MAX_MEM
# A "word" character for keyword boundaries: letters, digits (any script) and `_`; RE2's \b is ASCII-only.
_WORD = r"[\pL\pN_]"
_NON_WORD = r"[^\pL\pN_]"
_IS_WORD = re.compile(r"\w")
_SPACES = re.compile(r"\s+")


# The C++ RE2::Match under google-re2's `search`: called directly by the rules (`_matcher`), it skips the
# wrapper's generator and Match object (~0.5 us of each search, twice per content-routed request). Absent in a
# google-re2 whose internals differ: the rules then call `search`.
_UNANCHORED = getattr(getattr(getattr(getattr(re2, "_re2", None), "RE2", None), "Anchor", None), "UNANCHORED", None)


def _matcher(program) -> Callable[[bytes], bool]:
    """Whether `program` (compile_re2's) matches somewhere in a UTF-8 text: the same answer as
    `program.search(text) is not None`, without the wrapper's per-call objects where google-re2 exposes its
    compiled RE2."""
    raw = getattr(getattr(program, "_regexp", None), "Match", None)
    if raw is None or _UNANCHORED is None:
        return lambda text: program.search(text) is not None
    return lambda text: raw(_UNANCHORED, text, 0, len(text))[0][0] >= 0


def compile_re2(pattern: str, what: str):
    """An RE2 program for `pattern` over UTF-8 bytes (linear time, program memory at most RE2_MAX_MEM; the
    shared api.patterns.compile_re2). Raises ValueError naming `what` and why RE2 refuses it (backreferences,
    lookaround, too large)."""
    try:
        return patterns.compile_re2(pattern.encode("utf-8"), RE2_MAX_MEM)
    except UnicodeEncodeError:   # a lone surrogate: JSON can spell one, UTF-8 cannot
        raise ValueError(f"{what}: it holds a lone surrogate (\\ud800-\\udfff), not a character") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}; RE2 syntax has no backreferences or lookaround") from None


def _keyword_program(keywords: list[str], what: str):
    """One RE2 program matching any of `keywords`, case-insensitive, at word boundaries: a keyword that starts
    (ends) with a word character must not be preceded (followed) by one, so `sql` matches `SQL?` and `(sql)` but
    not `mysql`; a keyword's inner whitespace matches any run of whitespace. The four boundary kinds are factored
    out of the alternation (RE2's Unicode classes are large: per keyword they would not fit RE2_MAX_MEM for the
    API's 256 keywords of 200 characters). None without keywords."""
    groups: dict[tuple[bool, bool], list[str]] = {}
    for kw in keywords:
        kw = kw.strip()
        if not kw:
            continue
        body = r"\s+".join(re2.escape(part) for part in _SPACES.split(kw))
        groups.setdefault((bool(_IS_WORD.match(kw[0])), bool(_IS_WORD.match(kw[-1]))), []).append(body)
    if not groups:
        return None
    alternatives = []
    for (word_start, word_end), bodies in sorted(groups.items()):
        alternatives.append((f"(?:^|{_NON_WORD})" if word_start else "") + "(?:" + "|".join(bodies) + ")"
                            + (f"(?:{_NON_WORD}|$)" if word_end else ""))
    return compile_re2("(?i)(?:" + "|".join(alternatives) + ")", what)


def decision_text(obj: object, chat: bool, limit: int = MAX_DECISION_TEXT_CHARS) -> bytes:
    """What content routing reads from a parsed request body (`obj`, from json.loads): for a chat request
    (`chat`), the last message whose role is `user`: its string content, or the `text` of its content parts of
    type `text` joined by newlines; for a completions request, `prompt` when a string, or its first element when
    a list of strings. Anything else (token ids, images only, a malformed body) is the empty text. At most
    `limit` characters (the first ones), returned as UTF-8 (lone surrogates replaced). Work is bounded by the
    limit and the body's size, whatever the body holds."""
    text = ""
    if isinstance(obj, dict):
        if chat:
            messages = obj.get("messages")
            if isinstance(messages, list):
                for msg in reversed(messages):
                    if isinstance(msg, dict) and msg.get("role") == "user":
                        text = _content_text(msg.get("content"), limit)
                        break
        else:
            prompt = obj.get("prompt")
            if isinstance(prompt, list) and prompt:
                prompt = prompt[0]
            if isinstance(prompt, str):
                text = prompt
    return text[:limit].encode("utf-8", "replace")


def _content_text(content: object, limit: int) -> str:
    if isinstance(content, str):
        return content[:limit]
    if not isinstance(content, list):
        return ""
    parts, size = [], 0
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            t = part.get("text")
            if isinstance(t, str):
                parts.append(t[:limit - size])
                size += len(parts[-1]) + 1
                if size >= limit:
                    break
    return "\n".join(parts)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRules:
    """One destination's RuleMatch, compiled: every condition set must hold (AND); with none set it never
    matches. `headers`: (lower-cased name, exact value) as bytes, as the client's connection reads them."""

    destination: str
    pattern: object | None = None
    keywords: object | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    min_tokens: int | None = None
    max_tokens: int | None = None
    # The pattern's and the keywords' matchers (`_matcher`), in that order: built once, called per request.
    matchers: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "matchers", tuple(_matcher(p) for p in (self.pattern, self.keywords)
                                                   if p is not None))

    @property
    def empty(self) -> bool:
        """No condition set: the destination is never chosen by rules."""
        return (self.pattern is None and self.keywords is None and not self.headers and self.min_tokens is None
                and self.max_tokens is None)

    @property
    def needs_tokens(self) -> bool:
        """Token bounds are set: the text's token count is needed (one /tokenize round trip)."""
        return self.min_tokens is not None or self.max_tokens is not None

    def match_text(self, text: bytes, headers: dict[bytes, bytes] | None) -> bool:
        """Whether the conditions other than token bounds hold for the decision text and request headers."""
        for name, value in self.headers:
            if headers is None or headers.get(name) != value:
                return False
        for matches in self.matchers:
            if not matches(text):
                return False
        return True

    def match_tokens(self, count: int) -> bool:
        """Whether `count` tokens are within the bounds (inclusive)."""
        return ((self.min_tokens is None or count >= self.min_tokens)
                and (self.max_tokens is None or count <= self.max_tokens))


def compile_rules(dest: WireDestination, what: str) -> CompiledRules | None:
    """`dest.rules` compiled (None when it has none). Raises ValueError naming `what` for a pattern or keyword
    set RE2 refuses."""
    rules = dest.rules
    if rules is None:
        return None
    pattern = compile_re2(rules.pattern, f"{what}.rules.pattern") if rules.pattern else None
    keywords = _keyword_program(rules.keywords, f"{what}.rules.keywords") if rules.keywords else None
    headers = tuple(sorted((k.lower().encode("latin-1"), v.encode("utf-8")) for k, v in rules.headers.items()))
    compiled = CompiledRules(dest.model, pattern, keywords, headers, rules.min_prompt_tokens, rules.max_prompt_tokens)
    return None if compiled.empty else compiled


@dataclass(eq=False)
class CompiledContentModel:
    """A ContentModel ready for per-request decisions: its rules compiled (destinations in order), its labels
    mapped to destinations, and the response-header lines of each possible decision rendered once."""

    source: ContentModel
    rules: tuple[CompiledRules, ...]
    labels: dict[str, str]                       # classifier label -> destination model
    header_names: frozenset[bytes]               # lower-cased names the rules read
    needs_tokens: bool
    problems: list[str] = field(default_factory=list)
    # What a semantic index depends on (embedding model, destinations' examples): a new table that keeps them
    # keeps the index (orchestrate.py caches indexes by this key).
    semantic_key: str = ""
    # (destination, method, fallback) -> what orchestrate.Orchestrator renders for such a decision once (its
    # response header lines, the destination as rewrite_model takes it, its metrics counter), then reuses.
    decided: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The content-routed public name (e.g. `auto`)."""
        return self.source.name

    @classmethod
    def compile(cls, model: ContentModel, where: str = "content_models") -> "CompiledContentModel":
        """Compile a content model; a destination whose rules RE2 refuses keeps no rules, and `problems` names
        it (`where[i].destinations[j] 'model': ...`) with RE2's reason."""
        rules, problems = [], []
        for j, dest in enumerate(model.destinations):
            what = f"{where} {model.name!r} destinations[{j}] {dest.model!r}"
            try:
                compiled = compile_rules(dest, what)
            except ValueError as exc:
                problems.append(f"{exc}: this destination is not chosen by rules")
                continue
            if compiled is not None:
                rules.append(compiled)
        labels: dict[str, str] = {}
        for dest in model.destinations:
            if dest.label:
                labels.setdefault(dest.label.lower(), dest.model)
        names = frozenset(n for r in rules for n, _ in r.headers)
        key = json.dumps([model.semantic.embedding_model if model.semantic else None,
                          [[d.model, d.examples] for d in model.destinations]], ensure_ascii=False)
        return cls(model, tuple(rules), labels, names, any(r.needs_tokens for r in rules), problems, key)

    @property
    def max_label_chars(self) -> int:
        """The longest label, in characters (bounds the classifier's max_tokens)."""
        return max((len(label) for label in self.labels), default=0)
