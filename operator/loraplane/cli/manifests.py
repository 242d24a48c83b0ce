"""Reading the manifests `validate` and `render` are given: files or `-` (stdin), multi-document YAML.

One reader for both commands, so they agree on what is a loraplane object and on how bad input is reported:
a file that cannot be read or parsed, a document that is not a mapping, and an object of the loraplane.io API
group whose kind does not exist (a typo such as `Adaptor` would otherwise be skipped like a Secret and pass CI)
are each one error naming the file and document, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraplane.api import GROUP, KINDS


@dataclass
class Document:
    """One YAML document: where it came from (`FILE#INDEX KIND/NAME`), its content, and the error that makes it
    unusable (None for a loraplane object to parse, or `skip` for another API's object)."""

    where: str
    doc: dict | None
    error: str | None = None
    skip: bool = False


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
            docs = list(yaml.safe_load_all(text))
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
