"""Where things are in the checkout, for tests and benchmarks wherever their folder sits."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the checkout root (pyproject.toml, crds/, docs/)
PKG = ROOT / "operator" / "loraplane"         # the package's source
