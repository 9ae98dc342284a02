"""Locust load test of the ingest API, reporting delivered messages/s as well.

Headless, against a running engine with its HTTP API (see README, "Load test"):

    mkdir -p bench-results
    hookray -c main.json run --api-port 8080 &
    until curl -sf http://127.0.0.1:8080/v1/health >/dev/null; do sleep 1; done
    export HOOKRAY_TOKEN=$(hookray -c main.json tokens create --account 1 --role master \\
                           | python -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    locust -f bench/locustfile.py --headless -u 20 -r 5 -t 60s \\
           --host http://127.0.0.1:8080 --csv bench-results/locust --only-summary

The file first waits for the API (``GET /v1/health``) for at most
``HOOKRAY_API_WAIT_SEC`` (default 120) seconds: an engine started just before takes
some seconds to serve it (the wait counts in Locust's ``-t``: the commands above wait
for it first).

Each user posts batches of ``HOOKRAY_BATCH`` (default 500) generated events of
account ``HOOKRAY_ACCOUNT`` (default 1) to ``POST /v1/events``. On test start the
file starts a counting sink (``python -m bench.sink``) and creates
``HOOKRAY_HOOKS`` (default 10) hooks of that account pointing at it; on test
stop it waits for the engine to drain, deletes the hooks, and reports the
messages delivered per second read from the sink, next to Locust's own
requests/s: printed, and written to ``<csv prefix>_delivered.json`` when
``--csv`` is given (else ``locust_delivered.json``).

Draining: the file counts, per event type, the events of the requests answered
202 (``events_posted`` = (requests - failures) x batch), so it knows how many
messages its hooks must get (``expected_messages``; the hooks have no filters).
Requests still in flight when the run time ends may be accepted by the engine
without Locust seeing their answer, so ``delivered_messages`` can exceed
``expected_messages`` by the messages of up to one batch per user.
It then polls the engine's stats API (``GET /v1/hooks/{id}/stats``) for its hooks
until ``accepted`` reaches the expected count and every accepted message is
delivered or dead-lettered, for at most ``HOOKRAY_DRAIN_SEC`` (default 120)
seconds. A drain that times out (the report says how many messages are still
undelivered) or ends with dead letters sets Locust's exit code to 1 and
``drained: false`` in the report. (With distributed Locust workers the master
does not see the workers' counts: it then waits only for delivered +
dead_lettered to reach accepted.)
"""

from __future__ import annotations

import atexit
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from locust import HttpUser, between, events, task

ACCOUNT = int(os.environ.get("HOOKRAY_ACCOUNT", "1"))
BATCH = int(os.environ.get("HOOKRAY_BATCH", "500"))
HOOKS = int(os.environ.get("HOOKRAY_HOOKS", "10"))
DRAIN_SEC = float(os.environ.get("HOOKRAY_DRAIN_SEC", "120"))
API_WAIT_SEC = float(os.environ.get("HOOKRAY_API_WAIT_SEC", "120"))
CODES = ["send", "deliv", "open", "uopen", "click", "uclick", "unsub", "hbounce", "sbounce",
         "import_api", "send_sms", "deliv_sms", "click_sms", "open_push", "pixel"]
_state: dict[str, Any] = {}
_posted: Counter[str] = Counter()  # event type -> events in requests answered 202


def _token() -> str:
    token = os.environ.get("HOOKRAY_TOKEN")
    if not token:
        sys.exit("locustfile: set HOOKRAY_TOKEN to a master token of account "
                 f"{ACCOUNT} (hookray tokens create --account {ACCOUNT} --role master)")
    return token


def _api(host: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(host.rstrip("/") + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {_token()}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _sink_stats() -> dict[str, Any]:
    with urllib.request.urlopen(f"{_state['sink']}/stats", timeout=30) as resp:
        return json.loads(resp.read())


def _start_sink() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _state["sink_proc"] = proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", str(port)], stdout=subprocess.DEVNULL)
    # however Locust ends (a setup that exits skips test_stop): never left running, its
    # stderr Locust's (a pipe from `locust ... | tail` would never end)
    atexit.register(lambda: proc.poll() is None and proc.terminate())
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return url
        time.sleep(0.05)
    raise RuntimeError("the sink did not start")


def _wait_for_api(host: str) -> None:
    """Until ``GET /v1/health`` answers: an engine started just before (``hookray run
    --api-port ... &``) takes some seconds to serve its API."""
    deadline = time.monotonic() + API_WAIT_SEC
    said = False
    while True:
        try:
            with urllib.request.urlopen(host.rstrip("/") + "/v1/health", timeout=5):
                return
        except urllib.error.HTTPError:  # it answers (503: Redis unreachable, say)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"locustfile: no HTTP API at {host} after {API_WAIT_SEC:g} s "
                         f"({exc}); is `hookray run --api-port ...` running?")
            if not said:
                print(f"locustfile: waiting for the HTTP API at {host}", flush=True)
                said = True
            time.sleep(0.5)


@events.test_start.add_listener
def _setup(environment: Any, **_: Any) -> None:
    host = environment.host
    _token()  # set, before anything starts
    _state["sink"] = _start_sink()  # first: the report reads it, even after a failed wait
    _wait_for_api(host)
    _posted.clear()
    hooks: dict[int, list[str]] = {}
    for i in range(HOOKS):
        actions = random.Random(i).sample(CODES, 5)
        try:
            hook = _create_hook(host, i, actions)
        except Exception as exc:  # a wrong token: not a run of refused requests
            for hook_id in hooks:
                _delete_hook(host, hook_id)
            hint = (f" (HOOKRAY_TOKEN must be a master token of account {ACCOUNT})"
                    if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403)
                    else "")
            sys.exit(f"locustfile: creating hook {i + 1} of {HOOKS} failed: "
                     f"{_why(exc)}{hint}")
        hooks[hook["id"]] = actions
    _state["hooks"] = hooks
    _state["started"] = time.time()


def _why(exc: Exception) -> str:
    """An API call's failure as one line: the status and the API's error, if any."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = exc.read().decode("utf-8", "replace")
        except OSError:
            body = ""
        return f"HTTP {exc.code}: {body[:300] or exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _delete_hook(host: str, hook_id: int) -> None:
    """Delete one of this file's hooks; a failure is said (left in the engine, its
    re-sends would go on), not raised: the others are deleted all the same."""
    try:
        _api(host, "DELETE", f"/v1/hooks/{hook_id}")
    except Exception as exc:
        print(f"locustfile: hook {hook_id} was not deleted ({_why(exc)}): delete it with "
              f"`hookray hooks delete {hook_id}`", flush=True)


def _create_hook(host: str, i: int, actions: list[str]) -> Any:
    return _api(host, "POST", "/v1/hooks", {
            "name": f"locust {i}", "active": True, "database": "all", "actions": actions,
            "custom_data": {"pairs": {"day": "{{event_date_ymd}}"}},
            "target": {"http_batch": {"url": f"{_state['sink']}/locust{i}",
                                      "max_batch_size": 200, "flush_timeout_sec": 0.5}}})


def _engine_totals(host: str) -> dict[str, int]:
    """accepted, delivered, retried, dead_lettered summed over this file's hooks."""
    totals = {"accepted": 0, "delivered": 0, "retried": 0, "dead_lettered": 0}
    for hook_id in _state.get("hooks", {}):
        stats = _api(host, "GET", f"/v1/hooks/{hook_id}/stats")
        for key in totals:
            totals[key] += int(stats.get(key, 0))
    return totals


def _drain(host: str, expected: int) -> tuple[bool, dict[str, int], str]:
    """Wait until the engine accepted ``expected`` messages for the hooks and settled
    each one (delivered or dead-lettered), at most DRAIN_SEC; (drained, totals, why not)."""
    deadline = time.monotonic() + DRAIN_SEC
    while True:
        totals = _engine_totals(host)
        settled = totals["delivered"] + totals["dead_lettered"]
        if totals["accepted"] >= expected and settled >= totals["accepted"]:
            if totals["dead_lettered"]:
                return False, totals, f"{totals['dead_lettered']:,} messages dead-lettered"
            return True, totals, ""
        if time.monotonic() >= deadline:
            return False, totals, (
                f"not drained after {DRAIN_SEC:g} s: accepted {totals['accepted']:,} of "
                f"{expected:,} expected messages, delivered {totals['delivered']:,} "
                f"({totals['accepted'] - totals['delivered']:,} undelivered), "
                f"dead_lettered {totals['dead_lettered']:,}")
        time.sleep(1)


@events.test_stop.add_listener
def _report(environment: Any, **_: Any) -> None:
    host = environment.host
    if "started" not in _state:  # the test ended before its hooks were made
        print("locustfile: no report: the test ended before its hooks were created",
              flush=True)
        environment.process_exit_code = 1
        if "sink_proc" in _state:
            _state["sink_proc"].terminate()
        return
    hooks: dict[int, list[str]] = _state.get("hooks", {})
    expected = sum(_posted[code] for actions in hooks.values() for code in actions)
    try:
        drained, totals, why = _drain(host, expected)
    except Exception as exc:  # the API went away: still clean up and report
        drained, totals, why = False, {}, f"reading the engine's stats: {exc}"
    try:  # the receivers gone: still delete the hooks, and report
        stats = _sink_stats()
    except Exception as exc:
        drained, why = False, f"{why + '; ' if why else ''}reading the receivers: {exc}"
        stats = {"unique": 0, "last": _state["started"], "p50_ms": None, "p99_ms": None}
    for hook_id in hooks:
        _delete_hook(host, hook_id)
    _state["sink_proc"].terminate()
    total = environment.stats.total
    elapsed = max(stats["last"] - _state["started"], 1e-9)
    report = {"requests": total.num_requests, "failures": total.num_failures,
              "requests_per_s": total.total_rps,
              "events_posted": (total.num_requests - total.num_failures) * BATCH,
              "expected_messages": expected, "engine": totals, "drained": drained,
              "delivered_messages": stats["unique"],
              "delivered_messages_per_s": stats["unique"] / elapsed,
              "latency_p50_ms": stats["p50_ms"], "latency_p99_ms": stats["p99_ms"]}
    if not drained:
        report["error"] = why
        environment.process_exit_code = 1
    prefix = environment.parsed_options.csv_prefix if environment.parsed_options else None
    path = f"{prefix}_delivered.json" if prefix else "locust_delivered.json"
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"hookray: delivered {report['delivered_messages']:,} messages "
          f"({report['delivered_messages_per_s']:,.0f}/s) for {report['requests']:,} requests "
          f"({report['requests_per_s']:,.1f}/s); report in {path}", flush=True)
    if not drained:
        print(f"hookray: FAILED: {why}", flush=True)


def _events(n: int) -> tuple[bytes, Counter[str]]:
    """A request body of ``n`` events, and how many there are of each event type."""
    now = time.time_ns()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9))
    date = f"{stamp}.{now % 10**9:09d}Z"
    rng = random.Random()
    types = [CODES[rng.randrange(len(CODES))] for _ in range(n)]
    return json.dumps([{
        "event_type": code, "event_date": date,
        "account_id": ACCOUNT, "list_id": rng.randrange(1, 51),
        "profile_id": f"p{rng.randrange(100_000)}",
        "event_data": {"campaign_id": rng.randrange(1, 21), "message_id": rng.randrange(1, 31),
                       "segment_id": 0}} for code in types]).encode(), Counter(types)


class IngestUser(HttpUser):
    wait_time = between(0.0, 0.2)

    @task
    def post_events(self) -> None:
        body, types = _events(BATCH)
        with self.client.post("/v1/events", data=body, catch_response=True,
                              headers={"Authorization": f"Bearer {_token()}",
                                       "Content-Type": "application/json"}) as resp:
            if resp.status_code != 202:
                # no answer (status 0): the error, not an empty text
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200] or resp.error}")
            else:
                _posted.update(types)
