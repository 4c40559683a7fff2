"""Containers and manifests checked offline: hadolint, yamllint, `kubectl kustomize`, kubernetes-validate,
and the facts that tie them to the server (probe path, drain budget, metric names) read from the real code.

Each external checker skips its test when it is not installed; the cross-checks run everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def tool(name: str) -> str:
    """The executable `name` from PATH or beside this interpreter (the venv's bin), else skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def kustomize(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def served_metric_names() -> set[str]:
    """Every series name Minerva's /metrics exposes after one generation (histograms, counters, gauges)."""
    from engine.reports import EngineStats, SpecDecodeCounters
    from server.observability.metrics import Metrics

    spec = SpecDecodeCounters(num_drafts=1, num_draft_tokens=2, num_accepted_tokens=1, accepted_per_position=[1, 0],
                              acceptance_rate=0.5, mean_acceptance_length=2.0, propose_seconds=0.1)
    stats = EngineStats(num_running=1, num_waiting=1, kv_blocks_total=2, kv_blocks_used=1, kv_blocks_free=1,
                        kv_cache_tokens=32, kv_cache_bytes=64, prefix_cache_hit_rate=0.5, num_preemptions=1,
                        prompt_tokens_total=1, generation_tokens_total=1, steps_total=1, model_load_seconds=1.0,
                        tensor_parallel_size=1, step_prefill_budget=None, kernels=None, spec_decode=spec)
    metrics = Metrics(lambda: {"m": stats})
    metrics.observe_generation("m", longest_sample=3, ttft=0.1, e2e=0.3)
    metrics.requests.labels("/v1/completions", "200").inc()
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bminerva_[a-z_]+", expr))


# --- containers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_lint_clean(dockerfile):
    out = subprocess.run([tool("hadolint"), str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The clean result above means something: the same call rejects a root, unpinned, cached install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD minerva serve\n")
    out = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3006" in out.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_the_server_as_a_non_root_pid_behind_tini(dockerfile):
    text = (ROOT / dockerfile).read_text()
    instructions = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith((" ", "#"))}
    assert instructions["USER"].split()[1] not in ("root", "0")
    entrypoint = json.loads(instructions["ENTRYPOINT"].removeprefix("ENTRYPOINT"))
    assert entrypoint[:4] == ["tini", "--", "minerva", "serve"]  # exec form: SIGTERM reaches the server
    port = entrypoint[entrypoint.index("--port") + 1]
    assert instructions["EXPOSE"].split()[1] == port
    healthcheck = text[text.index("HEALTHCHECK"):].split("\n", 2)
    assert f"http://127.0.0.1:{port}/health" in "".join(healthcheck)
    assert '"/models"' in instructions["VOLUME"]
    from server.info_routes import public_router  # the probe path is a real route

    assert "/health" in {route.path for route in public_router.routes}


# --- compose, Prometheus, Grafana ------------------------------------------------------------------------


def test_yaml_lints_clean():
    out = subprocess.run([tool("yamllint"), "-s", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_builds_the_images_and_prometheus_scrapes_its_services():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("minerva", "minerva-gpu"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        assert services[name]["stop_grace_period"] == "45s"  # > the default --shutdown-timeout 30 s
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = job["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} <= set(services)
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        assert (DEPLOY / volume.split(":")[0]).exists(), volume


def test_grafana_dashboard_queries_only_metrics_minerva_serves():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "minerva.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set().union(*(promql_metrics(e) for e in exprs))
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Time to first token", "Time per output token", "Queue and running", "KV cache use"} <= titles
    assert used and used <= served_metric_names(), used - served_metric_names()


# --- Kubernetes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_and_validate_against_the_kubernetes_schemas(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = kustomize(overlay)
    version = kubernetes_validate.latest_version()
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service below
        kubernetes_validate.validate(doc, version, strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor"} <= kinds


def test_schema_validation_rejects_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = by_kind(kustomize("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_drains_probes_health_and_reads_keys_from_a_secret(overlay):
    from server.cli import build_parser

    docs = kustomize(overlay)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(["serve", *container["args"]])  # every flag is one `minerva serve` knows
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_timeout
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (300 if overlay == "cpu" else 900)
    keys_dir = str(Path(args.api_keys_file).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == keys_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "minerva-api-keys"
    assert pod["securityContext"]["runAsNonRoot"] is True
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == 1) == (overlay == "gpu")
    if overlay == "gpu":
        assert args.device == "cuda" and args.models == ["/models/gpt-oss-20b"]


def test_service_monitor_and_hpa_point_at_what_exists():
    docs = kustomize("gpu")
    service, monitor = by_kind(docs, "Service"), by_kind(docs, "ServiceMonitor")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind(docs, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name
    assert promql_metrics(rule["seriesQuery"]) == {name} and name in served_metric_names()
    pdb = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain never blocks forever
