"""deploy/job.py as a real Ray job: submitted with the Jobs SDK to the test session's
local Ray head, fed through Redis from this process, stopped with ``stop_job``.

Also checks that deploy/main.json lists every setting with its default and that
deploy/hooks.example.json holds valid hooks (these two need no server).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from actors.driver import Engine
from engine.errors import ConfigError
from engine.hooks import parse_hook
from engine.messages import message_id
from engine.receiver import Receiver
from engine.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# uploaded as the job's working dir (Ray also honours .gitignore); keep it small
EXCLUDES = [".git", ".mypy_cache", ".hypothesis", ".pytest_cache", ".ruff_cache",
            "**/__pycache__", "*.egg-info", "bench-results", "build", "dist", "*.rdb"]
PARTITIONS = 2
ACCOUNT = 1
ACTIONS = ["click", "open"]
PROGRESS = re.compile(r"^hookray: \d+s (\{.*\}) backlog=(\d+) retry=(\d+)$", re.MULTILINE)


def _until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _node(ray: Any) -> Any:
    return ray._private.worker.global_worker.node


@dataclass
class Jobs:
    """A JobSubmissionClient on the session's Ray, and the jobs submitted through it."""

    client: Any
    gcs_address: str
    submitted: list[str] = field(default_factory=list)

    def submit(self, **kwargs: Any) -> str:
        def attempt() -> str | None:
            try:
                return str(self.client.submit_job(**kwargs))
            except RuntimeError as exc:  # the head's job agent registers a little later
                if "No available agent" in str(exc):
                    return None
                raise

        job_id: str = _until("a job agent to take the job", attempt, timeout=30, every=1)
        self.submitted.append(job_id)
        return job_id

    def status(self, job_id: str) -> Any:
        return self.client.get_job_status(job_id)

    def logs(self, job_id: str) -> str:
        return str(self.client.get_job_logs(job_id))

    def wait_end(self, job_id: str, timeout: float) -> Any:
        return _until(f"job {job_id} to end", lambda: (s := self.status(job_id)).is_terminal()
                      and s, timeout=timeout, every=0.5)


@pytest.fixture
def jobs(ray_session: Any) -> Iterator[Jobs]:
    """Jobs API of the session's Ray (started with the dashboard); stops leftover jobs."""
    from ray.job_submission import JobSubmissionClient

    node = _node(ray_session)
    url = node.address_info.get("webui_url")
    if not url:
        pytest.fail("the session's Ray runs without a dashboard: a test before this one "
                    "started Ray without the ray_session fixture", pytrace=False)
    address = url if "://" in url else f"http://{url}"

    def connect() -> Any:
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError):
            return None  # the dashboard's job module is still starting

    api = Jobs(_until(f"the Jobs API at {address}", connect, timeout=30, every=1),
               node.gcs_address)
    yield api
    for job_id in api.submitted:
        if not api.status(job_id).is_terminal():
            api.client.stop_job(job_id)
            api.wait_end(job_id, timeout=30)


def _events(n: int) -> list[dict[str, Any]]:
    """Events of two accounts and four types: a quarter of them match the hook."""
    codes = ["click", "send", "open", "deliv"]
    return [{"id": f"ev-{i}", "event_type": codes[i % 4], "account_id": 1 + (i // 4) % 2,
             "list_id": 1 + i % 3, "event_date": f"2026-11-29T10:{i % 60:02d}:00.{i:06d}Z",
             "profile_id": f"p{i % 17}", "event_data": {"campaign_id": 7, "message_id": 3}}
            for i in range(n)]


def _write_config(folder: Path, redis_url: str, prefix: str, rx: Receiver) -> tuple[Path, Path]:
    main = folder / "main.json"
    main.write_text(json.dumps({
        "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PARTITIONS": PARTITIONS,
        "HTTP_POOL_SIZE": 1, "HOOK_RETRY_PERIOD_SEC": 0.3, "HOOK_RETRY_TIMES": 3,
        "HTTP_REQUEST_TIMEOUT_SEC": 2.0}), encoding="utf-8")
    hooks = folder / "hooks.json"
    hooks.write_text(json.dumps([{
        "name": "job test", "active": True, "account_id": ACCOUNT, "actions": ACTIONS,
        "target": {"http_batch": {"url": rx.url("/job"), "max_batch_size": 10,
                                  "flush_timeout_sec": 0.3}}}]), encoding="utf-8")
    return main, hooks


def _entrypoint(jobs: Jobs, main: Path, hooks: Path, duration: float) -> str:
    # --ray-address: inside a job Ray sets RAY_ADDRESS for the driver, but it finds that
    # address by scanning the host's processes ("auto"), which picks an arbitrary cluster
    # when several local Rays run on one machine (parallel test sessions); name ours.
    return (f"python deploy/job.py --config {main} --hooks {hooks} --duration {duration} "
            f"--report-sec 2 --ray-address {jobs.gcs_address}")


RUNTIME_ENV = {"working_dir": str(ROOT), "excludes": EXCLUDES,
               # room for a clean shutdown on a loaded machine (Ray's default: 3 s)
               "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "20"}}


def _wait_running(jobs: Jobs, job_id: str, timeout: float = 60) -> str:
    def running() -> bool:
        status = jobs.status(job_id)
        if status.is_terminal():
            raise AssertionError(f"job ended as {status} before running:\n{jobs.logs(job_id)}")
        return "hookray: running" in jobs.logs(job_id)

    _until("the job to log 'hookray: running'", running, timeout=timeout, every=0.5)
    return jobs.logs(job_id)


@pytest.mark.integration
def test_engine_runs_as_a_ray_job_and_stops_cleanly(
        jobs: Jobs, ray_session: Any, redis_url: str, prefix: str, receiver: Receiver,
        tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    from actors.driver import Engine

    main, hooks_file = _write_config(tmp_path, redis_url, prefix, receiver)
    job_id = jobs.submit(entrypoint=_entrypoint(jobs, main, hooks_file, 40),
                         runtime_env=RUNTIME_ENV, metadata={"prefix": prefix})
    text = _wait_running(jobs, job_id)
    assert f'"REDIS_PREFIX": "{prefix}"' in text  # settings came from --config
    assert "partitions); `ray job stop JOB_ID` stops" in text  # no Ctrl-C in a job
    started = json.loads(text.split("hookray: starting with ", 1)[1].splitlines()[0])
    # Ray's RAY_ADDRESS reached the settings: this cluster's, unless several local Rays
    # run (Ray's job supervisor then names one of them: hence --ray-address above)
    from ray._private.services import find_gcs_addresses

    address = started["RAY_ADDRESS"]
    assert isinstance(address, str) and re.fullmatch(r"[\w.\-]+:\d+", address), address
    if len(find_gcs_addresses()) == 1:
        assert address == jobs.gcs_address, (address, jobs.gcs_address)
    # the job's engine runs on the session's cluster, not on a Ray of its own
    for name in (f"{prefix}:partition:0", f"{prefix}:partition:{PARTITIONS - 1}",
                 f"{prefix}:retry", f"{prefix}:http_batch:0"):
        ray_session.get_actor(name, namespace="hookray")  # ValueError when it is not there

    settings = Settings(REDIS_URL=redis_url, REDIS_PREFIX=prefix, PARTITIONS=PARTITIONS)
    engine = Engine.connect(settings)
    try:
        [hook] = engine.list_hooks()
        assert hook.active and hook.name == "job test"
        assert f"hookray: hook {hook.id} created from {hooks_file}" in text
        events = _events(120)
        for start in range(0, len(events), 40):  # a few producer calls
            assert engine.publish(events[start:start + 40]).accepted == 40
        expected = {message_id(hook.id, e["id"]) for e in events
                    if e["account_id"] == ACCOUNT and e["event_type"] in ACTIONS}
        assert len(expected) == 30

        def received() -> set[str]:
            return {m["hook_message_id"] for m in receiver.messages("/job")}

        _until("every matched event at the receiver", lambda: received() >= expected,
               timeout=30)
        assert engine.wait_idle(15), "intake not settled"
        time.sleep(0.5)  # a late duplicate or stray message would arrive by now
        messages = receiver.messages("/job")
        got = {m["hook_message_id"] for m in messages}
        unexpected = [(m["account_id"], m["event_type"]) for m in messages
                      if m["hook_message_id"] not in expected]
        assert not unexpected, f"{len(unexpected)} unmatched message(s) delivered, " \
            f"(account, type): {sorted(set(unexpected))}"
        assert got == expected  # each matched event once (after de-duplication), no other
        assert all(len(r.messages) <= 10 for r in receiver.requests("/job"))  # max_batch_size
        assert engine.stats(hook.id)["delivered"] == len(expected)
    finally:
        engine.shutdown()

    def reported() -> bool:
        return any(json.loads(m[1]).get("delivered") == len(expected) and m[2] == "0"
                   for m in PROGRESS.finditer(jobs.logs(job_id)))

    _until("a progress line with every message delivered and no backlog", reported,
           timeout=15)

    assert jobs.client.stop_job(job_id)  # SIGTERM to the entrypoint
    status = jobs.wait_end(job_id, timeout=40)
    text = jobs.logs(job_id)
    assert status == JobStatus.STOPPED, text
    assert "hookray: stopped" in text, f"no clean shutdown after SIGTERM:\n{text}"
    _until("the job's actors to be gone", lambda: not _actor_alive(ray_session, prefix),
           timeout=20)


@pytest.mark.integration
def test_job_with_a_duration_succeeds(jobs: Jobs, ray_session: Any, redis_url: str,
                                      prefix: str, receiver: Receiver, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    main, hooks_file = _write_config(tmp_path, redis_url, prefix, receiver)
    job_id = jobs.submit(entrypoint=_entrypoint(jobs, main, hooks_file, 1),
                         runtime_env=RUNTIME_ENV)
    _wait_running(jobs, job_id)
    status = jobs.wait_end(job_id, timeout=40)
    text = jobs.logs(job_id)
    assert status == JobStatus.SUCCEEDED, text
    assert PROGRESS.search(text), text
    assert "hookray: stopped" in text, text
    _until("the job's actors to be gone", lambda: not _actor_alive(ray_session, prefix),
           timeout=20)


def _actor_alive(ray: Any, prefix: str) -> bool:
    try:
        ray.get_actor(f"{prefix}:partition:0", namespace="hookray")
    except ValueError:
        return False
    return True


def test_main_json_lists_every_setting_with_its_default() -> None:
    """Every setting at its default, but REDIS_URL, left empty: the default's port
    6379 is Ray's own (the GCS) on a cluster's head, where the job's driver runs, so
    a job started from the file as it is stops at once asking for it."""
    data = json.loads((DEPLOY / "main.json").read_text(encoding="utf-8"))
    assert list(data) == list(Settings.model_fields)
    assert data == {**Settings().model_dump(), "REDIS_URL": ""}
    with pytest.raises(ConfigError, match="REDIS_URL is empty"):
        Engine(Settings(**data))


def test_hooks_example_is_created_stopped() -> None:
    data = json.loads((DEPLOY / "hooks.example.json").read_text(encoding="utf-8"))
    assert [h["active"] for h in data] == [False, False]  # placeholders: nothing sent


def test_hooks_example_holds_valid_hooks() -> None:
    data = json.loads((DEPLOY / "hooks.example.json").read_text(encoding="utf-8"))
    assert [parse_hook(h).target.kind for h in data] == ["http_batch", "rabbitmq_queue"]


@pytest.mark.parametrize(("args", "message"), [
    (["--duration", "abc"], "argument --duration: expected a number of seconds, got 'abc'"),
    (["--duration", "-1"], "argument --duration: must be a number >= 0 and <= 315360000, "
                           "got -1"),
    (["--duration", "inf"], "argument --duration: must be a number >= 0"),
    (["--report-sec", "0"], "argument --report-sec: must be a number > 0"),
    (["--report-sec", "soon"], "argument --report-sec: expected a number of seconds, "
                               "got 'soon'"),
])
def test_a_bad_job_option_is_named_with_the_reason(args: list[str], message: str) -> None:
    """The job's options are checked as `hookray run` checks them, before anything
    starts (not "invalid _not_negative value")."""
    proc = subprocess.run([sys.executable, str(DEPLOY / "job.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"deploy/job.py: error: {message}"), proc.stderr
    assert "invalid" not in proc.stderr and "Traceback" not in proc.stderr
