"""Reading the manifests `validate`, `render` and `run` are given: files or `-` (stdin), multi-document YAML.

One reader for the three commands (it lives here, below `cli/`, because `local.pipeline` reads `run`'s file with
it), so they agree on what is a loraplane object and on how bad input is reported:
a file that cannot be read or parsed, a document that is not a mapping, and an object of the loraplane.io API
group whose kind does not exist (a typo such as `Adaptor` would otherwise be skipped like a Secret and pass CI)
are each one error naming the file and document, never a traceback. A key written twice in one mapping is such
an error too (PyYAML would keep the last silently), and so is an object without metadata.name (parse_document).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraplane.api import GROUP, KINDS, Resource


@dataclass
class Document:
    """One YAML document: where it came from (`FILE#INDEX KIND/NAME`), its content, and the error that makes it
    unusable (None for a loraplane object to parse, or `skip` for another API's object)."""

    where: str
    doc: dict | None
    error: str | None = None
    skip: bool = False


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice. YAML 1.2 requires keys to be unique, but
    PyYAML keeps the last value silently: a second `baseModel:` would replace the first without a word, so a
    manifest would not say what it seems to."""

    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        first_line: dict = {}
        # The keys as written (a `<<` merge key brings defaults that explicit keys may override: not checked).
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first_line[key]}): remove one of them",
                        key_node.start_mark)
                first_line[key] = line
            except TypeError:   # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


def read_documents(paths: list[Path]) -> Iterator[Document]:
    """Every document of `paths` (`-` is stdin, read once). Documents of other API groups are yielded with
    skip=True; empty documents are dropped."""
    for path in paths:
        try:
            text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
        except OSError as exc:
            yield Document(f"{path}", None, f"cannot read the file: {exc.strerror or exc}")
            continue
        try:
            docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            yield Document(f"{path}", None, f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}")
            continue
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                yield Document(f"{path}#{i}", None, f"a document must be one object (a YAML mapping with apiVersion "
                                                    f"and kind), not a {type(doc).__name__}")
                continue
            kind, meta = doc.get("kind"), doc.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            where = f"{path}#{i} {kind}/{name}"
            group = str(doc.get("apiVersion") or "").split("/")[0]
            if kind in KINDS:
                yield Document(where, doc)
            elif group == GROUP:
                yield Document(where, doc, f"kind: {kind!r} is not a {GROUP} kind (expected one of "
                                           f"{', '.join(KINDS)})")
            else:
                yield Document(where, doc, skip=True)


def parse_document(doc: dict) -> tuple[Resource | None, str | None]:
    """Parse one loraplane object of a manifest as the operator does, for `validate` and `render`: (the object,
    None), or (None, the problems, one indented line each). Besides the schema and the rules (every problem
    pydantic's first pass hides too: api.validation.format_all_problems), `metadata.name` is required: the API
    server refuses an object without one, so a manifest without it must not pass."""
    from loraplane.api import parse
    from loraplane.api.validation import format_all_problems

    meta = doc.get("metadata")
    no_name = isinstance(meta, dict) and not meta.get("name") or meta is None
    lines = ["  metadata.name: required: every object needs a name (metadata: {name: NAME})"] if no_name else []
    try:
        obj = parse(doc)
    except ValidationError as exc:
        lines.append(format_all_problems(KINDS[doc["kind"]], doc, exc, "  "))
        return None, "\n".join(lines)
    except ValueError as exc:
        lines.append(f"  {exc}")
        return None, "\n".join(lines)
    return (None, "\n".join(lines)) if lines else (obj, None)
