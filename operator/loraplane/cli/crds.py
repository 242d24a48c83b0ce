"""`loraplane crds`: write (or --check) everything generated from the API models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from loraplane.cli import repo_root


def add_crds_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane crds`: the crds/, API reference and chart folders to write, and --check."""
    p.add_argument("--out", type=Path, default=repo_root() / "crds", help="CRD folder (default: crds/)")
    p.add_argument("--reference", type=Path, default=repo_root() / "docs" / "api-reference.md",
                   help="generated API reference (default: docs/api-reference.md)")
    p.add_argument("--chart", type=Path, default=repo_root() / "charts" / "loraplane",
                   help="Helm chart whose CRD templates are generated too (default: charts/loraplane)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files there are stale; write nothing")


def generated_files(args: argparse.Namespace) -> dict[Path, str]:
    """Every file generated from the API models, with its expected content."""
    from loraplane.codegen import chart as chartgen
    from loraplane.codegen import crds as crdgen, reference, troubleshooting

    files = {args.out / name: crdgen.render(crd) for name, crd in crdgen.all_crds().items()}
    files[args.reference] = reference.render()
    files.update(chartgen.crd_template_files(args.chart))
    files[args.reference.parent / "troubleshooting.md"] = troubleshooting.render()
    return files


def crds_main(args: argparse.Namespace) -> int:
    """Write every generated file (CRDs, chart CRD templates, API reference, troubleshooting page); with
    --check write nothing and return 1 when any is missing or stale, else 0."""
    files = generated_files(args)
    if args.check:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
        for path in stale:
            print(f"stale: {path} (run `loraplane crds`)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0
