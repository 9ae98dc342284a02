"""The README's commands, run as written, and the plausible mistakes around them: each
refused with a message naming what is wrong, and the right exit code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from actors.cli import main
from engine.settings import Settings

pytestmark = pytest.mark.integration


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_publishing_an_empty_file_is_an_error(content: str, config: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Given an events file that is empty (the wrong file, or one not written yet)
    events = tmp_path / "events.ndjson"
    events.write_text(content)
    # When it is published
    code, out, err = run_cli(capsys, "-c", config, "publish", str(events))
    # Then nothing is printed as if it had worked, and the exit code says it failed
    assert code == 2 and out == ""
    assert f"hookray: error: {events}: holds no events (the file is empty or blank)" in err


def test_an_empty_json_array_is_still_published_as_nothing(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.json"
    events.write_text("[]")
    code, out, _ = run_cli(capsys, "-c", config, "publish", str(events))
    assert code == 0 and json.loads(out) == {"accepted": 0, "rejected": 0, "issues": []}


def test_revoking_by_the_token_shows_only_its_id(config: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Given a token, revoked by the token itself (what an operator has at hand)
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "create", "--account", "23",
                           "--role", "ingest", "--name", "shop")
    created = json.loads(out)
    code, out, err = run_cli(capsys, "-c", config, "tokens", "revoke", created["token"])
    # Then the output (a terminal, a CI log) names the token by its id, never the secret
    assert code == 0 and json.loads(out) == {"revoked": created["id"]}
    assert created["token"] not in out + err
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "list", "--account", "23")
    assert json.loads(out) == []
    # and revoking it again says that it does not exist, by its id
    code, _, err = run_cli(capsys, "-c", config, "tokens", "revoke", created["token"])
    assert code == 2 and f"token {created['id']} does not exist" in err


@pytest.mark.parametrize("copied", ['"{}",', "{} ", "Bearer {}", "'{}'"])
def test_a_token_copied_with_what_surrounds_it_is_revoked_and_never_shown(
        config: str, capsys: pytest.CaptureFixture[str], copied: str) -> None:
    """The token as copied from the JSON ``tokens create`` printed (quotes, a comma),
    from a request ("Bearer "), with a space: revoked, not "does not exist" with the
    secret printed and the token still valid."""
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "create", "--account", "24",
                           "--role", "master")
    created = json.loads(out)
    code, out, err = run_cli(capsys, "-c", config, "tokens", "revoke",
                             copied.format(created["token"]))
    assert code == 0 and json.loads(out) == {"revoked": created["id"]}
    assert created["token"][20:] not in out + err
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "list", "--account", "24")
    assert json.loads(out) == []
    # again: it does not exist, named by its id, the secret part never quoted
    code, _, err = run_cli(capsys, "-c", config, "tokens", "revoke",
                           copied.format(created["token"]))
    assert code == 2 and f"token {created['id']} does not exist" in err
    assert created["token"][20:] not in err


def test_health_says_on_stderr_why_it_exits_1(config: str, settings: Settings,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    from engine.health import Heartbeat
    from engine.keys import Keys

    # no engine has run with this Redis and prefix
    code, out, err = run_cli(capsys, "-c", config, "health")
    assert code == 1 and json.loads(out)["partitions"]["expected"] is None
    assert (f"hookray: health: no engine has started with this Redis and REDIS_PREFIX "
            f"{settings.REDIS_PREFIX!r}") in err
    # an engine of 2 partitions, of which partition 1 and the retry worker are silent
    r, keys = redis.Redis.from_url(settings.REDIS_URL), Keys(settings.REDIS_PREFIX)
    r.hset(keys.config, "partitions", 2)
    marks = {name: Heartbeat(r, keys, name) for name in ("partition:0", "partition:1", "retry")}
    marks["partition:0"].beat()
    code, _, err = run_cli(capsys, "-c", config, "health")
    assert code == 1
    assert "hookray: health: partition(s) 1 of 2 ran no round in the last 15 s" in err
    assert "hookray: health: the retry worker ran no round in the last 15 s" in err
    # partition 1 waits for an operator: the reason is said
    marks["partition:1"].beat("stored hook 7 no longer validates")
    marks["retry"].beat()
    code, _, err = run_cli(capsys, "-c", config, "health")
    assert code == 1
    assert err.strip() == "hookray: health: partition 1 waits: stored hook 7 no longer validates"
    # all of them run: exit 0 and nothing on stderr
    marks["partition:1"].beat()
    code, _, err = run_cli(capsys, "-c", config, "health")
    assert code == 0 and err == ""


def test_run_refuses_a_bad_ray_address_naming_the_option(
        config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "-c", config, "run", "--ray-address", "nonsense",
                             "--duration", "1")
    assert code == 2
    assert "hookray: error: --ray-address 'nonsense': expected HOST:PORT" in err
    assert "starting" not in out  # refused before anything started


def test_run_hooks_without_a_file_is_refused(config: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # `--hooks $FILE` with FILE unset in the shell: refused rather than run without hooks
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", config, "run", "--hooks", "--duration", "1"])
    assert exit_info.value.code == 2
    assert "argument --hooks: expected at least one argument" in capsys.readouterr().err


def test_the_job_refuses_an_unknown_option_with_its_own_usage(
        capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.job import main as job_main

    with pytest.raises(SystemExit) as exit_info:
        job_main(["--config", "deploy/main.json", "--duraton", "5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: deploy/job.py")
    assert "deploy/job.py: error: unrecognized arguments: --duraton 5" in err
    assert "usage: hookray" not in err


def test_the_job_still_passes_options_of_hookray_run_on() -> None:
    from actors.cli import _parser
    from deploy.job import _parser as job_parser
    from deploy.job import run_argv

    args, extra = job_parser().parse_known_args(["--config", "c.json", "--api-port", "8080"])
    parsed = _parser().parse_args(run_argv(args, extra))
    assert parsed.command == "run" and parsed.api_port == 8080 and parsed.config == "c.json"


class _SlowEngine:
    """Engine.wait_idle / totals / retry.pending of an engine that settles after
    ``rounds`` waits."""

    def __init__(self, rounds: int) -> None:
        self.rounds, self.waits = rounds, []

        class _Retry:
            @staticmethod
            def pending() -> int:
                return 3
        self.retry = _Retry()

    def wait_idle(self, timeout: float, include_retries: bool = False) -> bool:
        assert include_retries
        self.waits.append(timeout)
        time.sleep(timeout)
        return len(self.waits) > self.rounds

    def totals(self) -> dict[str, Any]:
        return {"accepted": 2_000, "delivered": 500 * len(self.waits)}


def test_the_demo_shows_progress_while_it_waits_for_delivery(
        capsys: pytest.CaptureFixture[str]) -> None:
    from actors.demo import _wait_settled

    engine = _SlowEngine(rounds=2)
    assert _wait_settled(engine, timeout=60, every=0.01) is True
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["demo: 500 of 2,000 message(s) delivered so far, 3 awaiting a re-send ...",
                     "demo: 1,000 of 2,000 message(s) delivered so far, 3 awaiting a re-send ..."]
    assert engine.waits == [0.01, 0.01, 0.01]


def test_the_demo_gives_up_after_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    from actors.demo import _wait_settled

    engine = _SlowEngine(rounds=10**6)
    assert _wait_settled(engine, timeout=0.05, every=0.02) is False
    assert sum(engine.waits) <= 0.05 + 1e-9


def test_the_demo_samples_a_published_event_not_the_test_event() -> None:
    from actors.demo import _sample

    test = {"event_type": "click", "is_test": True}
    real = {"event_type": "open", "is_test": False, "custom_data": {"cname": "Welcome"}}
    assert _sample([test, real]) == real
    assert _sample([test]) is None
    assert _sample([]) is None


def test_a_failed_test_event_says_why_once_without_client_log_lines(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    from tests.services import free_port

    # Given a RabbitMQ hook whose broker port nobody listens on
    port = free_port()
    hook = tmp_path / "hook.json"
    hook.write_text(json.dumps({"name": "bounces", "account_id": 1, "actions": ["hbounce"],
                                "target": {"rabbitmq_queue": {
                                    "host": "127.0.0.1", "port": port, "user": "guest",
                                    "password": "guest", "queue": "hookray.nowhere"}}}))
    code, out, _ = run_cli(capsys, "-c", config, "hooks", "create", str(hook))
    assert code == 0
    hook_id = json.loads(out)[0]["id"]
    # When a test event is sent through it, as its own process (as a user runs it)
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "-c", config, "hooks", "test",
                           str(hook_id), "hbounce"], capture_output=True, text=True,
                          timeout=120)
    # Then the outcome says why, and no client library's log line precedes it
    assert proc.returncode == 1, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["delivered"] is False and outcome["error"] == "ConnectError"
    assert f"127.0.0.1:{port}" in outcome["detail"] and "cannot connect" in outcome["detail"]
    assert proc.stderr == ""


def test_the_demo_with_an_unreachable_redis_says_so_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.services import free_port

    # Given REDIS_URL naming a port nobody listens on
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/9")
    # When the demo runs
    code, out, err = run_cli(capsys, "demo")
    # Then it fails with the reason, before starting anything, and says nothing else
    assert code == 2
    assert err.startswith("hookray: error: Redis: ") and err.count("\n") == 1
    assert f"127.0.0.1:{port}" in err and "Connection refused" in err
    assert err.rstrip().endswith(f"(REDIS_URL redis://127.0.0.1:{port}/9: is Redis running "
                                 "and reachable there?)")
    assert out == ""  # neither "starting local Ray" nor "could not remove the demo's keys"


def test_a_redis_url_of_another_server_says_which_and_what_it_may_be(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    import threading

    # Given REDIS_URL naming a server that answers, but not as Redis does
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    monkeypatch.setenv("REDIS_URL", f"redis://user:secret@127.0.0.1:{port}/9")
    # When a command reads Redis
    code, _, err = run_cli(capsys, "stats")
    # Then the error names the URL, its password masked, and what it may be
    assert code == 2 and err.startswith("hookray: error: Redis: Protocol error")
    assert f"(REDIS_URL redis://***@127.0.0.1:{port}/9 answers, but not as Redis does: is " \
           "it another server's port?" in err and "secret" not in err


def test_a_refused_password_or_a_missing_database_is_named_as_such(
        redis_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from urllib.parse import urlsplit

    where = urlsplit(redis_url).netloc.rsplit("@", 1)[-1]
    # Given a REDIS_URL whose user Redis does not know
    monkeypatch.setenv("REDIS_URL", f"redis://nobody:secret@{where}/15")
    code, _, err = run_cli(capsys, "stats")
    # Then the error says the credentials were refused, not that Redis may be down
    assert code == 2 and f"(REDIS_URL redis://***@{where}/15: Redis refused its user or " \
        "password)" in err and "secret" not in err
    # Given a database beyond the server's
    monkeypatch.setenv("REDIS_URL", f"redis://{where}/99999")
    code, _, err = run_cli(capsys, "stats")
    assert code == 2 and "DB index is out of range" in err
    assert f"(REDIS_URL redis://{where}/99999: that Redis has fewer databases" in err


def test_ctrl_c_while_the_engine_starts_is_no_traceback(
        config: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from actors.driver import Engine

    # Given Ctrl-C pressed while `run` starts Ray (before it handles the signal itself)
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "start", interrupted)
    code, _, err = run_cli(capsys, "-c", config, "run", "--duration", "1")
    # Then it ends as a shell expects of an interrupted command, in one line
    assert code == 130
    assert err == "hookray: interrupted\n"


def test_the_settings_file_may_follow_the_command(config: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # `hookray stats -c main.json` was "unrecognized arguments: -c main.json"
    code, out, err = run_cli(capsys, "stats", "-c", config)
    assert code == 0 and "engine" in json.loads(out), err
    code, out, _ = run_cli(capsys, "hooks", "list", "--config", config)
    assert code == 0 and json.loads(out) == []
    # given in both places, the one after the command counts
    missing = str(tmp_path / "missing.json")
    code, _, _ = run_cli(capsys, "-c", missing, "stats", "-c", config)
    assert code == 0
    code, _, err = run_cli(capsys, "-c", config, "stats", "-c", missing)
    assert code == 2 and f"settings file {missing}: cannot be read" in err
    # and without it after the command, the one before it still counts
    code, _, err = run_cli(capsys, "-c", missing, "tokens", "list")
    assert code == 2 and f"settings file {missing}: cannot be read" in err


def test_the_job_refuses_hooks_without_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.job import main as job_main

    with pytest.raises(SystemExit) as exit_info:
        job_main(["--config", "deploy/main.json", "--hooks", "--duration", "5"])
    assert exit_info.value.code == 2
    assert ("deploy/job.py: error: argument --hooks: expected at least one argument"
            in capsys.readouterr().err)


@pytest.mark.parametrize("damage", [lambda t: t[:3] + t[4:],  # a digit of its id cut
                                    lambda t: t[:3] + t[3:19].upper() + t[19:]])
def test_a_token_damaged_in_copying_is_not_quoted_back_with_its_secret(
        config: str, capsys: pytest.CaptureFixture[str], damage: Any) -> None:
    """A token whose id no longer reads as one (cut, its case changed) was quoted back
    whole, its secret printed to stderr (and CI logs)."""
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "create", "--account", "25",
                           "--role", "ingest")
    token = json.loads(out)["token"]
    code, out, err = run_cli(capsys, "-c", config, "tokens", "revoke", damage(token))
    secret = token.split("_", 2)[2]
    assert code == 2 and "does not exist" in err and "***" in err, err
    assert secret[:4] not in err and secret[-4:] not in err, err
