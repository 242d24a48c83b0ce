"""`loraplane run -f FILE`: the customization pipeline of a file's objects, locally, on the cluster's code.

What runs is what the operator would run, built by the same builders: the FineTuneJob's trainer container
(command, args, env from `builders.finetunejob.job`), the Adapter it produces (`produced_adapter`), the
ModelRoute's serving table (`builders.resolution.resolve`), its vLLM container, loader sidecar and router
(`builders.engine_pod`, `builders.modelroute`). Only the pod's paths are mapped to a local work folder, and a
CPU box gets the vLLM settings it needs (`local/cpu.py`). A second run reuses what the first built; a changed
spec, dataset or model is a new run with its own output location and the Adapter's next version
(`LocalRun.train`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.api import Adapter, FineTuneJob, ModelRoute
from loraplane.api.modelroute import ENGINE_TASK_EMBED
from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
from loraplane.builders import BuildSettings, finetunejob as ftj_builders, modelroute as route_builders
from loraplane.api.paths import ADAPTER_CACHE_PATH, PVC_ROOT
from loraplane.builders.engine_pod import loader_container, model_fetch_container
from loraplane.builders.engine_pod import engine_command, engine_env
from loraplane.builders.resolution import resolve
from loraplane.local import cpu, hfcache
from loraplane.local.manifests import parse_document, read_documents
from loraplane.local.podspec import LocalPod, container_argv, container_env
from loraplane.local.processes import ManagedProcess, ProcessFailed, free_port, http_ok
from loraplane.api.wire.serving import AdapterState, ReplicaReport
from loraplane.api.wire.trainer import TerminationMessage

NAMESPACE = "default"


class RunError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


@dataclass
class Plan:
    """The objects of a file to run locally, by kind, plus the ConfigMaps (name -> data) it carries."""

    jobs: list[FineTuneJob] = field(default_factory=list)
    adapters: list[Adapter] = field(default_factory=list)
    routes: list[ModelRoute] = field(default_factory=list)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)


def load_plan(path: Path) -> Plan:
    """Validate every object of the file exactly as the operator does, all problems at once, read as
    `loraplane validate` reads it (local.manifests: a YAML error, a document that is not a mapping, a key written
    twice, an object without metadata.name are each an error naming the document, never a traceback). Raises
    RunError listing them; objects of other API groups than loraplane.io and core ConfigMaps are refused too (a
    local run has nothing to do with them)."""
    plan, problems = Plan(), []
    for d in read_documents([Path(path)]):
        doc = d.doc
        if d.error is not None:
            problems.append(f"{d.where}\n  {d.error}")
            continue
        if d.skip:
            if doc.get("kind") == "ConfigMap" and doc.get("apiVersion") == "v1":
                meta = doc.get("metadata")
                data = doc.get("data")
                if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
                    problems.append(f"{d.where}\n  metadata.name: required: every object needs a name "
                                    "(metadata: {name: NAME})")
                elif data is not None and not (isinstance(data, dict) and all(
                        isinstance(k, str) and isinstance(v, str) for k, v in data.items())):
                    problems.append(f"{d.where}\n  data: a ConfigMap's data maps keys to strings (write each "
                                    "value as a YAML block: `train.jsonl: |`)")
                else:
                    plan.configmaps[meta["name"]] = dict(data or {})
            else:
                problems.append(f"{d.where}\n  a local run takes FineTuneJobs, Adapters, ModelRoutes and the "
                                "ConfigMaps (apiVersion: v1) they name; remove this object from the file")
            continue
        obj, detail = parse_document(doc)
        if obj is None:
            problems.append(f"{d.where}\n{detail}")
            continue
        obj.metadata.namespace = obj.metadata.namespace or NAMESPACE
        {FineTuneJob: plan.jobs, Adapter: plan.adapters, ModelRoute: plan.routes}[type(obj)].append(obj)
    if problems:
        raise RunError("invalid objects (nothing was run):\n" + "\n".join(problems))
    if not (plan.jobs or plan.routes):
        raise RunError(f"{path} has no FineTuneJob or ModelRoute to run")
    return plan


# What `run` sends when no --prompt is given and the file carries no instruction data: questions in the format the
# embedded tiny model's own corpus and toy datasets use (tinymodel.instruction_prompt: the question, a newline).
DEFAULT_QUESTIONS = ("what does the cat see?", "describe the lake.")


def demo_prompts(plan: Plan, count: int = 2) -> list[str]:
    """The prompts a local run sends through each router when none is given: the first `count` distinct prompts
    of the file's own instruction data (a FineTuneJob's evaluation set, else its training set, from a ConfigMap
    of the file), verbatim, so that the adapter is asked in exactly the format it was trained on (a trailing
    newline the data does not have makes a small adapter answer something else). Without such data, the tiny
    model's questions (DEFAULT_QUESTIONS as tinymodel.instruction_prompt writes them)."""
    for ftj in plan.jobs:
        evaluation = ftj.spec.evaluation.dataset if ftj.spec.evaluation else None
        for ds in (evaluation, ftj.spec.dataset):
            ref = ds.config_map_ref if ds is not None else None
            if ref is None or ds.format != "instruction":
                continue
            prompts: list[str] = []
            for line in (plan.configmaps.get(ref.name) or {}).get(ref.key, "").splitlines():
                try:
                    prompt = json.loads(line).get(ds.prompt_field)
                except (ValueError, AttributeError):
                    continue   # the trainer reports bad records; a demo prompt is only picked here
                if isinstance(prompt, str) and prompt and prompt not in prompts:
                    prompts.append(prompt)
                if len(prompts) == count:
                    return prompts
            if prompts:
                return prompts
    from loraplane.local import tinymodel

    return [tinymodel.instruction_prompt(q) for q in DEFAULT_QUESTIONS[:count]]


def trainer_line_shown_later(line: bytes) -> bool:
    """The trainer's lines `train` prints itself, shown once, not two or three times (the trainer's log keeps
    them): its evaluation lines (its log line and its summary on stdout; `train` prints the evaluation with each
    model's scores, also when it reuses an earlier run's adapter), and a failure's reason and message, which the
    trainer logs and prints as JSON and `train`'s error then says in words (its ERROR log line stays)."""
    return (line.startswith(b"evaluation: ") or b" INFO loraplane.trainer: evaluation (" in line
            or line.startswith(b'{"reason": '))


def trainer_failure(termination: str, exit_code: int) -> str:
    """A failed trainer's termination message (`{"reason", "message"}` JSON, api.wire.trainer) in words:
    `InvalidDataset (exit 65): <message>`; text that is no such message (a crash before it was written) is shown
    as it is."""
    message = TerminationMessage.parse(termination)
    if message is None or not message.message:
        return f"(exit {exit_code}): {termination.strip()}"
    return f"{message.reason} (exit {exit_code}): {message.message}"


class LocalRun:
    """One `loraplane run`: prepares base models, trains, serves and stops its processes, with the pod
    paths mapped under `workdir`; progress goes to `out`."""

    def __init__(self, plan: Plan, workdir: Path, model_dir: Path | None = None, out=sys.stdout):
        self.plan, self.workdir, self.model_dir, self.out = plan, Path(workdir), model_dir, out
        # Local sources are loopback http servers and paths: the quickstart opts in to plain http explicitly.
        self.settings = BuildSettings(allow_insecure_http=True)
        self.hf_home = self.workdir / "hf"
        self.pvc_root = self.workdir / "pvc"
        self.processes: list[ManagedProcess] = []
        self.timings: dict[str, float] = {}

    def say(self, text: str = "") -> None:
        """Print one line of progress to `out`, flushed."""
        print(text, file=self.out, flush=True)

    # ---- base models -------------------------------------------------------------------------------------

    def prepare_models(self) -> None:
        """Make every base model the file names loadable by its id, offline."""
        refs = {(r.identity, r.revision): r for r in [*(j.spec.base_model for j in self.plan.jobs),
                                                        *(r.spec.base_model for r in self.plan.routes)]}
        for _, ref in sorted(refs.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            if ref.uri:
                continue  # a local path or a URI the components resolve themselves
            source = self.model_dir
            if source is None:
                from loraplane.local import tinymodel

                if ref.name != tinymodel.MODEL_NAME:
                    raise RunError(f"baseModel.name {ref.name!r} is not available offline here: pass --model DIR "
                                   "(a local Hugging Face model directory), or use "
                                   f"{tinymodel.MODEL_NAME!r}, the embedded tiny default")
                started = time.monotonic()
                self.say(f"• base model {ref.name}: building or reusing the tiny local model")
                source = tinymodel.tiny_model_path()
                self.timings["base model"] = time.monotonic() - started
            hfcache.install(ref.name, Path(source), self.hf_home, ref.revision or "main")
            self.say(f"  {ref.name} -> {source}")
        for route in self.plan.routes:
            if fetch := model_fetch_container(route, self.settings.image, self.settings.allow_insecure_http):
                self.fetch_base_model(route, fetch)

    def fetch_base_model(self, route: ModelRoute, container: dict) -> None:
        """Run the engine pod's init container here: the s3:// / https:// model lands on the local model
        volume, where the engine command (paths mapped) finds it."""
        import subprocess

        pod = self.pod(f"{route_builders.engine_name(route)}-local-0")
        self.say(f"• base model {route.spec.base_model.uri}: fetching (the engine pod's init container)")
        started = time.monotonic()
        done = subprocess.run(container_argv(container, pod), env=container_env(container, pod),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RunError(f"fetching the base model of ModelRoute {route.metadata.name} failed:\n"
                           f"{done.stderr.strip()[-2000:]}")
        self.timings["base model fetch"] = time.monotonic() - started

    def pod(self, name: str) -> LocalPod:
        """The LocalPod `name` of this run: pod paths (PVC root, trainer config and output, model and adapter
        caches) under the work folder, offline Hugging Face settings, one OpenMP thread."""
        return LocalPod(name=name, namespace=NAMESPACE,
                        paths={PVC_ROOT: str(self.pvc_root), ftj_builders.CONFIG_DIR: str(self.workdir / "config"),
                               ftj_builders.OUTPUT_SCRATCH: str(self.workdir / "output"),
                               ftj_builders.MODEL_CACHE_PATH: str(self.workdir / "models"),
                               ADAPTER_CACHE_PATH: str(self.workdir / "adapter-cache")},
                        env_overrides={"HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1",
                                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

    # ---- training ----------------------------------------------------------------------------------------

    def run_key(self, ftj: FineTuneJob) -> str:
        """The identity of a local run of `ftj` (64 hex digits): a hash of what decides its weights, the trainer
        config (spec with defaults resolved, before any run identity), the content of the ConfigMaps its
        datasets name (missing ones: left to train(), which refuses them), and the base model source
        (--model). The same key means the same training: its checkpoints may be resumed and its result reused;
        any other spec, data or model is a new run."""
        config = ftj_builders.trainer_config(ftj.model_copy(update={"metadata": ftj.metadata.model_copy(
            update={"uid": None})}), self.settings)
        evaluation = ftj.spec.evaluation.dataset if ftj.spec.evaluation else None
        data = {f"{ref.name}/{ref.key}": self.plan.configmaps.get(ref.name, {}).get(ref.key)
                for ref in (ftj.spec.dataset.config_map_ref, evaluation.config_map_ref if evaluation else None)
                if ref is not None}
        model = str(Path(self.model_dir).resolve()) if self.model_dir is not None else None
        return hashlib.sha256(json.dumps({"config": config, "data": data, "model": model},
                                         sort_keys=True).encode()).hexdigest()

    def adapter_record(self, namespace: str, name: str) -> Path:
        """Where this work folder keeps the Adapter a local run last produced (`<workdir>/adapters/NS/NAME.json`:
        its manifest and status), standing in for the cluster's Adapter object across runs."""
        return self.workdir / "adapters" / namespace / f"{name}.json"

    def train(self, ftj: FineTuneJob) -> Adapter:
        """Run the FineTuneJob's trainer container here (or reuse the adapter the same run key trained before)
        and return the Adapter the operator would create. Like a cluster run (run-<uid8> output, checkpoints
        beside it), each run writes under its own `run-<key8>` location, keyed by `run_key`: a changed spec
        never resumes another spec's checkpoints. New weights bump the Adapter's version over the one this
        work folder holds (version 1 first; the same run again keeps its version), and spec.evaluation's
        comparePrevious scores that previous version. Raises RunError when training fails or needs more than
        one process."""
        key = self.run_key(ftj)
        # The run's identity where the operator has the FineTuneJob's uid: output_uri's run-<uid8>, the
        # Adapter's produced-by annotation (same run: same version), provenance.
        uid = str(uuid.UUID(hex=key[:32]))
        ftj = ftj.model_copy(update={"metadata": ftj.metadata.model_copy(update={"uid": uid})})
        record_path = self.adapter_record(ftj.metadata.namespace or NAMESPACE, ftj.spec.output.adapter_name)
        record, existing = None, None
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
                existing = Adapter.model_validate(record["manifest"])
            except (OSError, ValueError, KeyError, TypeError) as exc:   # ValidationError is a ValueError
                self.say(f"  ! {record_path} is unreadable ({type(exc).__name__}); starting the Adapter at "
                         "version 1 again")
                record, existing = None, None
        previous = ftj_builders.previous_version(ftj, {**record["manifest"], "status": record.get("status") or {}}
                                                 if record else None)
        config = ftj_builders.trainer_config(ftj, self.settings, previous=previous)
        key = key[:16]
        job = ftj_builders.job(ftj, self.settings)
        container = job["spec"]["template"]["spec"]["containers"][0]
        if container["command"][0] == "torchrun":
            raise RunError(f"FineTuneJob {ftj.metadata.name}: a local run trains in one process; set "
                           "spec.resources.gpus <= 1 and nodes: 1 for the local trial")
        pod = self.pod(f"{job['metadata']['name']}-local")
        # The FineTuneJob's dataset ConfigMap, where the pod would have it mounted.
        data_root = self.workdir / "configmaps"
        evaluation = ftj.spec.evaluation.dataset if ftj.spec.evaluation else None
        for where, ref in (("spec.dataset.configMapRef", ftj.spec.dataset.config_map_ref),
                           ("spec.evaluation.dataset.configMapRef", evaluation.config_map_ref if evaluation else None)):
            if ref is None:
                continue
            if ref.name not in self.plan.configmaps or ref.key not in self.plan.configmaps[ref.name]:
                raise RunError(f"FineTuneJob {ftj.metadata.name}: {where} names ConfigMap "
                               f"{ref.name} key {ref.key}, which is not in the file; add it (kind: ConfigMap)")
            (data_root / ref.name).mkdir(parents=True, exist_ok=True)
            (data_root / ref.name / ref.key).write_text(self.plan.configmaps[ref.name][ref.key])
        config_path = self.workdir / "config" / ftj_builders.CONFIG_KEY
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state_dir = self.workdir / "runs" / (ftj.metadata.name or "job")
        result_file = state_dir / f"result-{key}.json"
        pod.env_overrides.update({
            # In-cluster only: the status sink would patch a FineTuneJob that does not exist here.
            "LORAPLANE_JOB_NAME": None, "LORAPLANE_JOB_NAMESPACE": None,
            "LORAPLANE_CONFIGMAP_ROOT": str(data_root),
            "LORAPLANE_TERMINATION_LOG": str(state_dir / "termination-log"),
            "LORAPLANE_RESULT_FILE": str(result_file),
            "LORAPLANE_PROGRESS_FILE": str(state_dir / "progress.json"),
        })
        if result_file.is_file():
            self.say(f"• FineTuneJob {ftj.metadata.name}: reusing the adapter trained by an earlier run of the "
                     "same spec")
            result = json.loads(result_file.read_text())
        else:
            self.say(f"• FineTuneJob {ftj.metadata.name}: training (the trainer container of Job "
                     f"{job['metadata']['name']}, locally)")
            state_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            proc = ManagedProcess("trainer", container_argv(container, pod), container_env(container, pod),
                                  state_dir / "trainer.log")
            self.processes.append(proc)
            code = proc.run_foreground(hide=trainer_line_shown_later)  # the trainer draws its own progress bar
            self.timings[f"training {ftj.metadata.name}"] = time.monotonic() - started
            if code != 0:
                term = state_dir / "termination-log"
                detail = term.read_text() if term.is_file() else proc.log_tail()
                raise RunError(f"FineTuneJob {ftj.metadata.name} failed, {trainer_failure(detail, code)}\n"
                               f"log: {proc.log_path}")
            result = json.loads(result_file.read_text())
        artifact = result.get("artifact") or {}
        manifest = ftj_builders.produced_adapter(ftj, artifact.get("uri") or "", artifact.get("sha256"), existing)
        adapter = Adapter.model_validate(manifest)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"manifest": manifest, "status": {
            "version": adapter.spec.version, "artifact": {k: v for k, v in artifact.items()
                                                          if k in ("uri", "sha256")}}}, indent=2, sort_keys=True))
        self.say(f"  Adapter {adapter.metadata.name} version {adapter.spec.version}: {artifact.get('uri')} "
                 f"(sha256 {str(artifact.get('sha256'))[:12]}…)")
        metrics = result.get("metrics") or {}
        if metrics:
            self.say("  metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in sorted(metrics.items())))
        message = TerminationMessage.parse(json.dumps(result))
        if message is not None and message.evaluation is not None:
            ev = message.evaluation
            self.say(f"  evaluation ({ev.candidate.examples} examples) {ev.summary()}")
            for name, scores in (("adapter", ev.candidate), ("base", ev.base), ("previous", ev.previous)):
                if scores is not None:
                    self.say(f"    {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(scores.metrics.items())))
            if ev.message:
                self.say(f"    note: {ev.message}")
        return adapter

    # ---- serving -----------------------------------------------------------------------------------------

    def serve(self, route: ModelRoute, adapters: list[Adapter]) -> "ServingRoute":
        """Start the route's vLLM, loader and router as local processes on free loopback ports, wait until
        every adapter has settled, and return where they are."""
        resolution = resolve(route, [a for a in adapters if a.metadata.namespace == route.metadata.namespace],
                             local_paths=True)   # a local run reads local adapter paths (the loader: --table)
        for name, verdict in sorted(resolution.selected.items()):
            if not verdict.compatible:
                self.say(f"  ! Adapter {name} not served: {verdict.reason}: {verdict.message}")
        if resolution.content.missing:
            # Each route runs alone here (no other route's router to forward to): say what content routing lost.
            self.say(f"  ! spec.contentRouting, left out of this local run: {resolution.content.missing_message()} "
                     "(a local run serves each ModelRoute on its own: another route's names are not reachable)")
        table = resolution.table
        rdir = self.workdir / "routes" / (route.metadata.name or "route")
        rdir.mkdir(parents=True, exist_ok=True)
        table_path = rdir / "serving.json"
        table_path.write_text(table.to_json())
        ports = [free_port() for _ in range(3)]
        engine_port, loader_port, router_port = ports
        pod = self.pod(f"{route_builders.engine_name(route)}-local-0")

        started = time.monotonic()
        engine_argv, env = cpu.engine_process([pod.map_path(a) for a in engine_command(route)], engine_env(route),
                                              engine_port, self.hf_home)
        engine = ManagedProcess("vllm", engine_argv, {**env, **{k: v for k, v in pod.env_overrides.items() if v}},
                                rdir / "vllm.log").start()
        self.processes.append(engine)
        self.say(f"• ModelRoute {route.metadata.name}: starting vLLM (CPU build) on :{engine_port} "
                 f"(1–3 minutes, mostly imports)")
        with _spinner("  vLLM starting") as tick:
            engine.wait_until(lambda: http_ok(f"http://127.0.0.1:{engine_port}/health"), 600, tick,
                              "healthy")
        self.timings["vLLM startup"] = time.monotonic() - started

        # Adapter activation counts from here: the loader starts loading once vLLM is up, while the router starts
        # beside it (timed from after the router was up, a load that ended meanwhile read 0.0s).
        activation_started = time.monotonic()
        loader_c = loader_container(route, NAMESPACE, self.settings.image,
                                    allow_insecure_http=self.settings.allow_insecure_http)
        argv = container_argv(loader_c, pod)
        argv = _replace_flag(argv, "--configmap", ["--table", str(table_path)])
        argv = _set_flag(argv, "--vllm-url", f"http://127.0.0.1:{engine_port}")
        argv = _set_flag(argv, "--credentials-root", "none")   # no Secrets here: the environment's credentials
        argv = _set_flag(argv, "--port", str(loader_port)) + ["--host", "127.0.0.1", "--pvc-root",
                                                              str(self.pvc_root)]
        if table.model_path:  # the table names the pod's path of the base model: give the loader this one
            argv += ["--model-dir", pod.map_path(table.model_path)]
        loader = ManagedProcess("loader", argv, container_env(loader_c, pod), rdir / "loader.log").start()
        self.processes.append(loader)

        router_c = route_builders.router_deployment(route, self.settings)["spec"]["template"]["spec"][
            "containers"][0]
        argv = container_argv(router_c, pod)
        argv = _replace_flag(_replace_flag(argv, "--configmap", ["--table", str(table_path)]), "--namespace", [])
        argv = _replace_flag(argv, "--replicas-dns", ["--replica", f"http://127.0.0.1:{engine_port},"
                                                                   f"http://127.0.0.1:{loader_port}/status"])
        argv = _set_flag(_set_flag(argv, "--port", str(router_port)), "--host", "127.0.0.1")
        router = ManagedProcess("router", argv, container_env(router_c, pod), rdir / "router.log").start()
        self.processes.append(router)
        router.wait_until(lambda: http_ok(f"http://127.0.0.1:{router_port}/healthz"), 60, None, "listening")

        wanted = {a.served_name for a in table.adapters}
        report: dict[str, Any] = {}

        def settled() -> bool:
            nonlocal report
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{loader_port}/status", timeout=2) as r:
                    report = ReplicaReport.model_validate_json(r.read()).model_dump(mode="json")
            except (OSError, ValueError):
                return False
            states = {n: a["state"] for n, a in report.get("adapters", {}).items()}
            return all(states.get(n) in (AdapterState.Ready, AdapterState.Incompatible, AdapterState.Failed) for n in wanted)

        if wanted:
            with _spinner("  loading adapters") as tick:
                loader.wait_until(settled, 300, tick, "done loading")
        self.timings["adapter activation"] = time.monotonic() - activation_started
        for name, a in sorted(report.get("adapters", {}).items()):
            mark = "✓" if a["state"] == AdapterState.Ready else "✗"
            self.say(f"  {mark} {name}: {a['state']} ({a['reason']}) {a.get('message', '')}".rstrip())
        return ServingRoute(route=route, table_path=table_path, router_url=f"http://127.0.0.1:{router_port}",
                            engine_url=f"http://127.0.0.1:{engine_port}",
                            loader_url=f"http://127.0.0.1:{loader_port}", logs=rdir,
                            public_models=[m.name for m in table.models],
                            content_models=[c.name for c in table.content_models])

    def stop(self) -> None:
        """Stop every process this run started, the last started first."""
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()


@dataclass
class ServingRoute:
    """A route served locally: its serving table file, the router, vLLM and loader URLs, the log folder
    and its public model names."""

    route: ModelRoute
    table_path: Path
    router_url: str
    engine_url: str
    loader_url: str
    logs: Path
    public_models: list[str]
    # spec.contentRouting names (e.g. `auto`): asked like the others, with where the router sent each request.
    content_models: list[str] = field(default_factory=list)


def complete(router_url: str, model: str, prompt: str, max_tokens: int = 16,
             patience: float = 15, headers: dict[str, str] | None = None) -> tuple[int, str, float]:
    """One greedy completion through the router: (HTTP status, text or error, seconds).

    A 503 with Retry-After (the router has not yet seen a replica report the adapter) is retried as a
    well-behaved client would, for up to `patience` seconds. `headers`, when given, is filled with the
    answer's response headers (e.g. content routing's X-Loraplane-Destination)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    status, answer, seconds = _post(f"{router_url}/v1/completions", body, patience, headers)
    return status, answer["choices"][0]["text"] if status == 200 else answer, seconds


def embed(router_url: str, model: str, text: str, patience: float = 15) -> tuple[int, str, float]:
    """One /v1/embeddings request through the router of an embedding route (spec.engine.task embed): (HTTP
    status, the vector's size and first numbers or the error, seconds); 503s retried as `complete` does."""
    status, answer, seconds = _post(f"{router_url}/v1/embeddings", {"model": model, "input": text}, patience)
    if status != 200:
        return status, answer, seconds
    vector = answer["data"][0]["embedding"]
    return status, f"{len(vector)} numbers [{', '.join(f'{x:.3f}' for x in vector[:4])}, …]", seconds


def routing_note(headers: dict[str, str]) -> str:
    """What content routing did for one answer, from its response headers: `  [via sql, rules]`, with the
    fallback reason when the default served (`  [via general, default: no-match]`); "" without a decision."""
    low = {k.lower(): v for k, v in headers.items()}
    destination = low.get(DESTINATION_HEADER.lower())
    if destination is None:
        return ""
    method = low.get(METHOD_HEADER.lower(), "?")
    fallback = low.get(FALLBACK_HEADER.lower())
    return f"  [via {destination}, {method}{f': {fallback}' if fallback else ''}]"


def _post(url: str, body: dict, patience: float,
          headers: dict[str, str] | None = None) -> tuple[int, Any, float]:
    """POST `body` as JSON: (status, the answer's JSON on 200 else its text, seconds). A 503 with Retry-After is
    retried for up to `patience` seconds. `headers`, when given, receives the final answer's headers."""
    data = json.dumps(body).encode()
    deadline = time.monotonic() + patience
    while True:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                if headers is not None:
                    headers.update(r.headers.items())
                return r.status, json.loads(r.read()), time.monotonic() - started
        except urllib.error.HTTPError as exc:
            if headers is not None:
                headers.update(exc.headers.items())
            retry_after = exc.headers.get("Retry-After")
            if exc.code == 503 and retry_after and time.monotonic() < deadline:
                time.sleep(min(float(retry_after), 2.0))
                continue
            return exc.code, exc.read().decode(errors="replace")[:300], time.monotonic() - started


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def _replace_flag(argv: list[str], flag: str, replacement: list[str]) -> list[str]:
    """Drop `flag VALUE` and append `replacement` (e.g. a ConfigMap watch becomes a local file)."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i:i + 2]
    return out + replacement


class _spinner:
    """A progress line for waits of unknown length (tqdm, elapsed seconds)."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc=self.label, bar_format="{desc}: {elapsed}", file=sys.stderr,
                        leave=False, disable=None)  # None: no bar when not on a terminal
        return lambda _elapsed: self.bar.refresh()

    def __exit__(self, *exc):
        self.bar.close()
        return False


def run(path: Path, workdir: Path, model_dir: Path | None = None, prompts: list[str] | None = None,
        keep_serving: bool = False, out=sys.stdout) -> int:
    """`loraplane run`: validate the file, prepare base models, train each FineTuneJob, serve each ModelRoute,
    send the prompts through each router and stop everything; returns 0, or 130 on Ctrl-C. Raises RunError."""
    plan = load_plan(path)
    workdir.mkdir(parents=True, exist_ok=True)
    lr = LocalRun(plan, workdir, model_dir, out)
    say = lr.say
    say(f"loraplane run {path}  (work folder {workdir})")
    try:
        lr.prepare_models()
        adapters = list(plan.adapters)
        for ftj in plan.jobs:
            produced = lr.train(ftj)
            adapters = [a for a in adapters if a.metadata.name != produced.metadata.name] + [produced]
        served = [lr.serve(route, adapters) for route in plan.routes]
        prompts = prompts or demo_prompts(plan)
        for s in served:
            say(f"\n• Requests through the router of ModelRoute {s.route.metadata.name} ({s.router_url}/v1):")
            for prompt in prompts:
                say(f"  prompt: {prompt!r}")   # repr: a trailing newline or space is part of the prompt
                for model in s.public_models:
                    ask = embed if s.route.spec.engine.task == ENGINE_TASK_EMBED else complete
                    status, text, seconds = ask(s.router_url, model, prompt)
                    shown = repr(text) if status == 200 else f"HTTP {status}: {text}"
                    say(f"    {model:>12} → {shown}   ({seconds * 1000:.0f} ms)")
                for model in s.content_models:   # content-routed: where the router sent it, and why
                    answer_headers: dict[str, str] = {}
                    status, text, seconds = complete(s.router_url, model, prompt, headers=answer_headers)
                    shown = repr(text) if status == 200 else f"HTTP {status}: {text}"
                    say(f"    {model:>12} → {shown}   ({seconds * 1000:.0f} ms){routing_note(answer_headers)}")
        say("\n• Timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in lr.timings.items()))
        say("• Where things are:")
        say(f"    work folder      {workdir}")
        say(f"    adapters         {lr.pvc_root}")
        for s in served:
            say(f"    serving table    {s.table_path}")
            say(f"    logs             {s.logs}/{{vllm,loader,router}}.log")
            # Without --keep-serving these processes stop when this function returns: say so where their URLs
            # are, or a user curls a port nothing listens on any more.
            say(f"    router (OpenAI)  {s.router_url}/v1   loader status {s.loader_url}/status   "
                f"vLLM {s.engine_url}" + ("" if keep_serving else "   (stopped now)"))
        if served and not keep_serving:
            say("\nThe run is over and its processes are stopped. To send your own requests, run it again with "
                "--keep-serving (the trained adapter is reused), or try your own job: loraplane run -f my-job.yaml "
                "[--model DIR]; on a cluster: kubectl apply -f (docs/quickstart.md).")
        if keep_serving and served:
            say("\nServing; Ctrl-C stops every process this run started.")
            while lr.processes and all(p.running for p in lr.processes):
                time.sleep(1)
            raise ProcessFailed("a serving process exited: " + ", ".join(
                f"{p.name} (log {p.log_path})" for p in lr.processes if not p.running))
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: stopping")
        return 130
    finally:
        lr.stop()
