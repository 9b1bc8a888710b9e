"""The deployment files are valid and safe by default.

Docker cannot run here, so the files are checked as documents: the Kubernetes manifests against
the schemas bundled with kubernetes-validate (strict: an unknown field is an error), the compose
file against the compose-spec schema vendored in check-jsonschema (both offline), and each
against the promises docs/operations.md makes: only the webhook receiver published, Redis and
PostgreSQL reachable only inside the stack, the sandbox on loopback unless asked, non-root
containers, exactly one beat, configuration from a Secret.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def k8s_documents() -> list[dict]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_name(kind: str, name: str) -> dict:
    return next(d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_offline_and_strictly(path):
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validation_catches_a_mistake():
    import kubernetes_validate

    broken = copy.deepcopy(by_name("Deployment", "dispatcher-worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_exactly_one_beat_that_is_stopped_before_its_successor_starts():
    beat = by_name("Deployment", "dispatcher-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"][0] == "beat"


def test_workers_scale_and_everything_runs_unprivileged_with_config_from_the_secret():
    hpa = by_name("HorizontalPodAutoscaler", "dispatcher-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dispatcher-worker" and hpa["spec"]["maxReplicas"] > 1
    service = by_name("Service", "dispatcher-webhooks")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "webhooks"
    pods = [d["spec"]["template"]["spec"] for d in k8s_documents() if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 4
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert {"secretRef": {"name": "dispatcher"}} in c["envFrom"]
        assert any(v.get("secret", {}).get("secretName") == "dispatcher" for v in pod["volumes"])


def test_compose_file_validates_against_the_compose_spec():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_only_the_webhook_receiver_and_keeps_the_stores_inside():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {name for name, s in services.items() if s.get("ports")} == {"webhooks"}
    assert compose["networks"]["backend"]["internal"] is True
    for store in ("redis", "postgres"):
        assert services[store]["networks"] == ["backend"]
        assert services[store].get("restart") == "unless-stopped" and "healthcheck" in services[store]
    assert "POSTGRES_HOST_AUTH_METHOD" not in services["postgres"]["environment"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for role in ("worker", "beat", "webhooks", "api"):
        assert "healthcheck" in services[role] and services[role]["restart"] == "unless-stopped"
        assert services[role]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["sandbox"]["profiles"] == ["sandbox"] and services["sandbox"]["networks"] == ["backend"]


def test_the_sandbox_binds_to_loopback_unless_asked():
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert "--host 127.0.0.1" in procfile["sandbox"] and "0.0.0.0" not in procfile["sandbox"]
    from dispatcher.cli import _build_parser

    assert _build_parser().parse_args(["sandbox"]).host == "127.0.0.1"


def test_one_slim_image_running_as_a_user():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M)[-1].endswith("-slim")
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["dispatcher"]' in dockerfile


def test_the_dashboard_only_asks_for_metrics_the_dispatcher_serves(dispatcher_env):
    from dispatcher import metrics

    served = set()
    for family in metrics.registry().collect():  # what a scrape shows now (the gauges read at scrape time)
        served.update(s.name for s in family.samples)
    for name in ("dispatcher_sends", "dispatcher_throttled_seconds", "dispatcher_throttled_deferred",
                 "dispatcher_status_polls", "dispatcher_webhook_reports"):
        served.add(f"{name}_total")  # counters with no sample yet still have these names
    served.update(f"dispatcher_send_latency_seconds_{s}" for s in ("bucket", "sum", "count"))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dispatcher-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    asked = {m for e in exprs for m in re.findall(r"\bdispatcher_[a-z_]+", e)}
    assert asked and asked <= served, asked - served
