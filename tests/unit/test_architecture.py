"""The import-layer contract of docs/architecture.md holds, and it is not vacuous: breaking a rule fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from support.paths import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """Run import-linter on `project` (a folder with pyproject.toml and operator/loraplane)."""
    env = {**os.environ, "PYTHONPATH": str(project / "operator")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contract_holds():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout, run.stdout[-2000:]


def copy_project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "operator" / "loraplane", tmp_path / "operator" / "loraplane",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_contract_fails_when_a_builder_imports_the_data_plane(tmp_path):
    project = copy_project(tmp_path)
    common = project / "operator" / "loraplane" / "builders" / "common.py"
    common.write_text(common.read_text() + "\nfrom loraplane.loader import reconciler  # noqa: E402,F401\n")
    run = lint_imports(project)
    assert run.returncode != 0
    assert "loraplane.builders.common -> loraplane.loader.reconciler" in run.stdout, run.stdout[-3000:]


def test_contract_fails_when_one_program_imports_another(tmp_path):
    project = copy_project(tmp_path)
    main = project / "operator" / "loraplane" / "router" / "metrics.py"
    main.write_text(main.read_text() + "\nfrom loraplane.trainer import errors  # noqa: E402,F401\n")
    run = lint_imports(project)
    assert run.returncode != 0
    assert "loraplane.router.metrics -> loraplane.trainer.errors" in run.stdout, run.stdout[-3000:]
