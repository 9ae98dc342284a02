"""The ``hookray`` command line: help, hook management, stats, demo."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.cli import _parser, main
from engine.errors import HookError
from engine.settings import Settings

pytestmark = pytest.mark.integration

COMMANDS = [[], ["run"], ["demo"], ["hooks"], ["hooks", "list"], ["hooks", "create"],
            ["hooks", "update"], ["hooks", "get"], ["hooks", "delete"], ["hooks", "activate"],
            ["hooks", "stop"], ["hooks", "clone"], ["hooks", "test"], ["publish"], ["stats"],
            ["health"], ["dead-letters"], ["replay"], ["discard"], ["tokens"], ["tokens", "create"],
            ["tokens", "list"], ["tokens", "revoke"], ["set-aside"],
            ["hooks", "file-records"], ["hooks", "forget-file-record"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "hookray")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hookray" in capsys.readouterr().out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse refusing an argument, as a shell would see it
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except ValueError:
        return code, out, err


def test_hook_management_from_json_files(config: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    hook_file = tmp_path / "hook.json"
    hook_file.write_text(json.dumps({"name": "crm", "account_id": 3, "actions": ["click"],
                                     "target": {"http_batch": {
                                         "url": "http://127.0.0.1:9/x",
                                         "auth": {"kind": "bearer", "token": "s3cr3t"}}}}))
    code, created, _ = run_cli(capsys, "-c", config, "hooks", "create", str(hook_file))
    assert code == 0 and created[0]["name"] == "crm" and created[0]["active"] is False
    hook_id = created[0]["id"]
    assert created[0]["target"]["http_batch"]["auth"]["token"] == "**********"
    code, shown, _ = run_cli(capsys, "-c", config, "hooks", "activate", str(hook_id))
    assert shown["active"] is True
    code, clone, _ = run_cli(capsys, "-c", config, "hooks", "clone", str(hook_id))
    assert clone["name"] == "crm (copy)" and clone["id"] != hook_id
    code, named, _ = run_cli(capsys, "-c", config, "hooks", "clone", str(hook_id),
                             "--name", "crm for tests")
    assert code == 0 and named["name"] == "crm for tests" and named["active"] is False
    code, _, _ = run_cli(capsys, "-c", config, "hooks", "delete", str(named["id"]))
    code, listed, _ = run_cli(capsys, "-c", config, "hooks", "list", "--account", "3")
    assert sorted(h["id"] for h in listed) == sorted([hook_id, clone["id"]])
    assert "s3cr3t" not in json.dumps(listed)
    code, stats, _ = run_cli(capsys, "-c", config, "stats", "--hook", str(hook_id))
    assert stats == {"accepted": 0, "delivered": 0, "retried": 0, "dead_lettered": 0,
                     "discarded": 0}
    code, out, _ = run_cli(capsys, "-c", config, "hooks", "delete", str(clone["id"]))
    assert code == 0 and out == {"deleted": clone["id"]}
    code, _, err = run_cli(capsys, "-c", config, "hooks", "get", str(clone["id"]))
    assert code == 2 and f"hook {clone['id']} does not exist" in err
    # one hook's settings (its export, with its id) do not replace another's
    exported = tmp_path / "exported.json"
    code, shown, _ = run_cli(capsys, "-c", config, "hooks", "get", str(hook_id))
    exported.write_text(json.dumps({**shown, "id": hook_id + 1000}))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "update", str(hook_id),
                           str(exported))
    assert code == 2 and f"id {hook_id + 1000} differs from the hook's id {hook_id}" in err
    exported.write_text(json.dumps(shown))  # its own id: fine
    code, updated, _ = run_cli(capsys, "-c", config, "hooks", "update", str(hook_id),
                               str(exported))
    assert code == 0 and updated["id"] == hook_id
    # a hook neither stored nor ever counted is named as missing by every command that
    # takes --hook, not shown as having nothing
    for command in (["stats"], ["dead-letters"], ["replay"], ["discard", "--all"]):
        code, _, err = run_cli(capsys, "-c", config, *command, "--hook", "999999")
        assert code == 2 and "hook 999999 does not exist" in err, command


def test_bad_input_gets_a_clear_error(config: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch,
                                      redis_client: Any, keys: Any) -> None:
    redis_client.hset(keys.config, "partitions", 2)  # an engine ran here: no warning
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "account_id": 1, "actions": ["clack"],
                               "target": {"http_batch": {"url": "ftp://x"}}}))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(bad))
    assert code == 2
    assert "actions: unknown event code(s) 'clack'" in err
    assert "target.http_batch.url: 'ftp://x' is not an http(s) URL" in err
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(tmp_path / "nope.json"))
    assert code == 2 and "nope.json: cannot be read" in err
    for device in ("/dev/zero", "/dev/null"):  # read whole, /dev/zero would fill memory
        for command in (["hooks", "create"], ["publish"]):
            code, _, err = run_cli(capsys, "-c", config, *command, device)
            assert code == 2 and f"{device}: a device, not a file of JSON" in err
        # the settings and event types files too: no MemoryError traceback
        code, _, err = run_cli(capsys, "-c", device, "stats")
        assert code == 2 and f"settings file {device}: cannot be read (a device, not a " \
            "file of JSON)" in err
        with monkeypatch.context() as env:
            env.setenv("EVENT_TYPES_FILE", device)
            code, _, err = run_cli(capsys, "-c", config, "stats")
        assert code == 2 and f"EVENT_TYPES_FILE={device}: cannot read event types (a " \
            "device, not a file of JSON)" in err
    bad.write_text('{"name": "a", "name": "b"}')
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(bad))
    assert code == 2 and "bad.json: not valid JSON (duplicate key 'name')" in err
    bad.write_text('{"name": ' + "[" * 5000 + "]" * 5000 + "}")
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(bad))
    assert code == 2 and "bad.json: JSON nested too deeply to be read" in err
    events = tmp_path / "events.ndjson"
    good = '{"event_type": "click", "account_id": 1, "event_date": "2026-01-01T00:00:00Z"}'
    events.write_text(good + "\n" + good.replace("1,", '"one",') + "\n")
    code, refused, err = run_cli(capsys, "-c", config, "publish", str(events))
    assert code == 2 and "event 1: account_id: Expected `int`, got `str`" in err
    # every bad event listed on stdout too, as POST /v1/events lists them
    assert refused == {"accepted": 0, "rejected": 1, "issues": [
        {"index": 1, "field": "account_id", "reason": "Expected `int`, got `str`"}]}
    code, result, err = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert result["accepted"] == 1 and result["rejected"] == 1 and len(result["issues"]) == 1
    # some left out: exit 1, not the 0 of all accepted (as the API's 207 is no 202)
    assert code == 1 and err == "hookray: 1 event(s) accepted, 1 bad left out\n"
    events.write_text(good + "\n")
    code, result, err = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert (code, result, err) == (0, {"accepted": 1, "rejected": 0, "issues": []}, "")
    # a lone surrogate escape in one event of an array: that event, named by its field
    events.write_text("[" + good + ", " + good[:-1] + ', "profile_id": "a\\ud800b"}]')
    code, result, _ = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert code == 1 and result["accepted"] == 1
    assert result["issues"] == [{"index": 1, "field": "profile_id", "reason":
                                 "not valid UTF-8: a lone surrogate '\\ud800' at character 1"}]
    code, _, err = run_cli(capsys, "-c", str(tmp_path / "missing.json"), "stats")
    assert code == 2 and "settings file" in err and "cannot be read" in err
    # an empty -c (a variable that was not set) is no reason to act on the defaults
    code, _, err = run_cli(capsys, "-c", "", "stats")
    assert code == 2 and "settings file: the path given is empty" in err
    # ids and counts are ASCII digits: "0_8" or an Arabic-Indic 5 names no hook
    for arg in ("0_8", "\u0665", " +5 ", "\uff15"):
        code, _, err = run_cli(capsys, "-c", config, "hooks", "get", arg)
        assert code == 2 and "expected an id, an integer from 0 to" in err, arg
    code, _, err = run_cli(capsys, "-c", config, "dead-letters", "--limit", "1_0")
    assert code == 2 and "expected an integer >= 1" in err
    # --limit pages the list: given with --requeue, at the default or not, it is refused
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--requeue", "--limit", "100")
    assert code == 2 and "--limit and --after page the list" in err


def test_a_token_that_cannot_be_written_out_is_revoked(
        config: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tokens create to an output that fails (a full disk): the token, shown to no one,
    is revoked at once, and the error says so; other output failures are errors too."""
    env = {k: v for k, v in os.environ.items() if k != "HOOKRAY_CONFIG"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "actors.cli", "-c", config, "tokens",
                               "create", "--account", "4", "--role", "master"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr
    assert "the token could not be written out" in proc.stderr
    assert "it was revoked, nothing is left" in proc.stderr and "Traceback" not in proc.stderr
    code, listed, _ = run_cli(capsys, "-c", config, "tokens", "list", "--account", "4")
    assert code == 0 and listed == []


def test_damaged_records_are_named_not_tracebacks(
        config: str, redis_client: Any, keys: Any, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Records no engine writes (a damaged token, a PARTITIONS record or counter that is
    no number) are named with their key and what to do, by every command that reads
    them; a damaged token hides no other token and authenticates nothing."""
    from engine.auth import TokenStore

    code, made, _ = run_cli(capsys, "-c", config, "tokens", "create", "--account", "3",
                            "--role", "ingest")
    redis_client.hset(f"{keys.p}:tokens", "deadbeefdeadbeef", "not json")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        code, listed, _ = run_cli(capsys, "-c", config, "tokens", "list")
    assert code == 0 and [t["id"] for t in listed] == [made["id"]]
    assert "token deadbeefdeadbeef: its record cannot be read" in caplog.text
    store = TokenStore(redis_client, keys.p)
    assert store.authenticate(made["token"]) is not None
    # a hash no digest compares with (not ASCII): refused, not an error at each use
    record = json.loads(redis_client.hget(f"{keys.p}:tokens", made["id"]))
    redis_client.hset(f"{keys.p}:tokens", made["id"], json.dumps({**record, "hash": "é"}))
    assert store.authenticate(made["token"]) is None
    redis_client.hset(f"{keys.p}:tokens", made["id"], json.dumps(record))
    code, out, _ = run_cli(capsys, "-c", config, "tokens", "revoke", "deadbeefdeadbeef")
    assert code == 0 and out == {"revoked": "deadbeefdeadbeef"}
    redis_client.hset(keys.config, "partitions", "abc")
    for command in (["stats"], ["health"], ["set-aside", "--requeue"]):
        code, _, err = run_cli(capsys, "-c", config, *command)
        assert code == 2 and f"{keys.config} field partitions holds 'abc'" in err, command
    redis_client.hset(keys.config, "partitions", "100000000")  # no engine runs so many
    code, _, err = run_cli(capsys, "-c", config, "stats")
    assert code == 2 and "not the engine's PARTITIONS" in err
    redis_client.hset(keys.config, "partitions", "2")
    redis_client.hset(keys.stats(7), "accepted", "abc")
    code, _, err = run_cli(capsys, "-c", config, "stats", "--hook", "7")
    assert code == 2 and f"{keys.stats(7)} field accepted holds b'abc', not a count" in err
    redis_client.hset(keys.engine_stats, "events_accepted", "1.5")
    redis_client.delete(keys.stats(7))
    code, _, err = run_cli(capsys, "-c", config, "stats")
    assert code == 2 and f"{keys.engine_stats} field events_accepted holds b'1.5'" in err


def test_demo_runs_on_embedded_redis_without_redis_url() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    # the embedded Redis's folders go there, and are gone after the demo (a short path:
    # Ray puts its sockets there too, and a socket's path has at most 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))
    env["TMPDIR"] = str(temp)
    try:
        proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--events", "400"],
                              env=env, capture_output=True, text=True, timeout=240,
                              cwd=Path(__file__).resolve().parents[2])
        left = sorted(p.name for p in temp.iterdir() if p.name != "ray")
        running = [p.pid for p in psutil.process_iter(["cmdline"])
                   if str(temp) in " ".join(p.info["cmdline"] or [])
                   and "redis-server" in " ".join(p.info["cmdline"] or [])]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: embedded Redis at unix://" in proc.stdout
    assert "demo: ok" in proc.stdout
    assert "receiver /flaky: 2 request(s)" in proc.stdout  # one failure, one re-send
    assert left == [] and running == []  # the embedded Redis stopped, its folder gone


def test_run_twice_with_the_same_hooks_file_keeps_one_hook(config: str, tmp_path: Path,
                                                           settings: Settings) -> None:
    # Given a hooks file used by two consecutive runs of the main job
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps([{"name": "crm", "account_id": 4, "actions": ["click"],
                                  "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}]))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    outputs = []
    from actors.driver import Engine

    for n in range(2):
        if n == 1:  # an operator stopped it between the runs
            engine = Engine.connect(settings)
            engine.stop_hook(engine.list_hooks(4)[0].id)
            engine.redis.close()
        proc = subprocess.run(
            [sys.executable, "-m", "actors.cli", "-c", config, "run", "--hooks", str(hooks),
             "--duration", "0.5", "--report-sec", "0.2"],
            env=env, capture_output=True, text=True, timeout=240,
            cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    # Then the second run leaves the hook as it is instead of creating a second one
    assert "hook 1 created from" in outputs[0]
    assert "hook 1 ('crm') exists; left as it is" in outputs[1]
    assert "hookray: stopped" in outputs[1]
    engine = Engine.connect(settings)
    assert [(h.name, h.active) for h in engine.list_hooks(4)] == [("crm", False)]
    engine.redis.close()


def test_run_refuses_bad_or_clashing_hook_files_before_starting(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook = {"name": "crm", "account_id": 4, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    masked = {**hook, "name": "read back", "target": {"http_batch": {
        "url": "http://127.0.0.1:9/x", "auth": {"kind": "bearer", "token": "**********"}}}}
    # an address DESTINATION_DENY refuses (by default, the cloud's metadata service)
    denied = {**hook, "name": "metadata",
              "target": {"http_batch": {"url": "http://169.254.169.254/latest"}}}
    first.write_text(json.dumps([hook, {**hook, "name": "other", "actions": ["nope"]},
                                 masked, denied]))
    second.write_text(json.dumps(hook))
    code, _, err = run_cli(capsys, "-c", config, "run", "--hooks", str(first), str(second))
    assert code == 2 and "--hooks: nothing started" in err
    assert f"{first}[1]: invalid hook: actions: unknown event code(s) 'nope'" in err
    # what create refuses is found before anything starts, not after the first hooks
    assert f"{first}[2]: invalid hook: target.http_batch.auth.token: the redacted value " \
           "********** is no secret" in err
    assert f"{first}[3]: invalid hook: target.http_batch.url: address 169.254.169.254 " \
           "is refused by DESTINATION_DENY" in err
    assert f"{second}[0]: account 4 has a hook named 'crm' already in {first}[0]" in err
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(first))
    assert code == 2 and f"{first}: nothing created" in err and "; [2]: invalid hook" in err
    code, listed, _ = run_cli(capsys, "-c", config, "hooks", "list", "--account", "4")
    assert code == 0 and listed == []


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--report-sec", "0", "must be a number > 0 and <= 315360000, got 0"),
    ("--report-sec", "nan", "must be a number > 0 and <= 315360000, got nan"),
    ("--report-sec", "inf", "must be a number > 0 and <= 315360000, got inf"),
    ("--report-sec", "soon", "expected a number of seconds, got 'soon'"),
    ("--duration", "-1", "must be a number >= 0 and <= 315360000, got -1"),
    ("--duration", "nan", "must be a number >= 0 and <= 315360000, got nan"),
    ("--api-port", "70000", "must be from 0 to 65535, got 70000"),
    ("--api-port", "http", "expected a port number, got 'http'"),
])
def test_run_rejects_bad_intervals(option: str, value: str, message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["run", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_settings_file_can_come_from_hookray_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "main.json"
    bad.write_text(json.dumps({"PARTITIONS": 0}))
    monkeypatch.setenv("HOOKRAY_CONFIG", str(bad))
    code, _, err = run_cli(capsys, "stats")
    assert code == 2 and f"PARTITIONS=0 (in {bad})" in err
    code, _, err = run_cli(capsys, "-c", str(tmp_path / "other.json"), "stats")
    assert code == 2 and "other.json: cannot be read" in err  # -c wins


def test_more_bad_input_gets_a_clear_error_not_a_traceback(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    code, _, err = run_cli(capsys, "-c", config, "publish", str(tmp_path / "none.json"))
    assert code == 2 and "none.json: cannot be read (No such file or directory)" in err
    code, _, err = run_cli(capsys, "-c", config, "publish", str(tmp_path))
    assert code == 2 and "cannot be read (Is a directory)" in err
    hook = {"name": "crm", "account_id": 3, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}
    both = tmp_path / "both.json"
    both.write_text(json.dumps([hook, {**hook, "actions": ["nope"]}, 7]))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(both))
    assert code == 2 and "nothing created" in err
    assert "[1]: invalid hook: actions: unknown event code(s) 'nope'" in err
    assert "[2]: expected a JSON object" in err
    code, listed, _ = run_cli(capsys, "-c", config, "hooks", "list")
    assert code == 0 and listed == []
    one = tmp_path / "one.json"
    one.write_text(json.dumps(hook))
    code, created, _ = run_cli(capsys, "-c", config, "hooks", "create", str(one))
    hook_id = str(created[0]["id"])
    code, _, err = run_cli(capsys, "-c", config, "hooks", "update", hook_id, str(both))
    assert code == 2 and "both.json: expected a JSON object (one hook)" in err
    code, _, err = run_cli(capsys, "-c", config, "hooks", "test", hook_id, "nosuchtype")
    assert code == 2 and "unknown event type 'nosuchtype'" in err
    code, _, err = run_cli(capsys, "-c", config, "tokens", "create", "--account",
                           str(2**63), "--role", "master")
    assert code == 2 and f"'{2**63}': expected an id, an integer from 0 to " \
        "9223372036854775807" in err
    monkeypatch.setenv("REDIS_URL", "")
    code, _, err = run_cli(capsys, "-c", config, "stats")
    assert code == 2 and "REDIS_URL is empty" in err
    monkeypatch.setenv("REDIS_URL", "redis//:S3cretPass@redis.internal:6379/0")
    code, _, err = run_cli(capsys, "-c", config, "stats")
    assert code == 2 and "REDIS_URL='***@redis.internal:6379/0'" in err
    assert "S3cretPass" not in err


@pytest.mark.parametrize(("argv", "usage"), [
    (["stats", "--bogus"], "usage: hookray stats "),
    (["hooks", "list", "--bogus", "1"], "usage: hookray hooks list "),
    (["tokens", "revoke", "abc", "--bogus"], "usage: hookray tokens revoke "),
    (["replay", "d1", "--bogus"], "usage: hookray replay "),
    (["--bogus", "stats"], "usage: hookray [-h]"),  # given before the command: hookray's
])
def test_an_unknown_option_is_refused_with_its_commands_usage(
        argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]) -> None:
    """As README says: the usage of the command given it, then ``hookray COMMAND:
    error: ...`` (not hookray's own usage, which hides the command's options)."""
    code, _, err = run_cli(capsys, *argv)
    command = usage.removeprefix("usage: ").removesuffix(" [-h]").strip()
    assert code == 2 and err.startswith(usage), err
    assert f"{command}: error: unrecognized arguments: " in err


def test_a_file_argument_of_a_dash_reads_standard_input(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``publish -``, ``hooks create -`` and ``hooks update ID -`` read standard input
    (``cat events.ndjson | hookray publish -``); ``./-`` is a file of that name."""
    import io

    def stdin(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    hook = {"name": "piped", "account_id": 3, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}
    stdin(json.dumps(hook))
    code, created, err = run_cli(capsys, "-c", config, "hooks", "create", "-")
    assert code == 0 and [h["name"] for h in created] == ["piped"], err
    stdin(json.dumps({**hook, "name": "piped again"}))
    code, updated, err = run_cli(capsys, "-c", config, "hooks", "update",
                                 str(created[0]["id"]), "-")
    assert code == 0 and updated["name"] == "piped again", err
    event = {"event_type": "click", "account_id": 3, "event_date": "2026-01-01T00:00:00Z"}
    stdin(json.dumps(event) + "\n" + json.dumps({**event, "event_type": "open"}) + "\n")
    code, result, err = run_cli(capsys, "-c", config, "publish", "-")
    assert code == 0 and result == {"accepted": 2, "rejected": 0, "issues": []}, err
    stdin("")
    code, _, err = run_cli(capsys, "-c", config, "publish", "-")
    assert code == 2 and "hookray: error: -: holds no events" in err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_text(json.dumps([event]))
    code, result, err = run_cli(capsys, "-c", config, "publish", "./-")
    assert code == 0 and result["accepted"] == 1, err


def test_publish_partial_with_nothing_accepted_is_an_error(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text('{"event_type": "clack", "account_id": 1, '
                      '"event_date": "2026-01-01T00:00:00Z"}\n')
    code, result, err = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert code == 2 and result["accepted"] == 0 and len(result["issues"]) == 1
    assert err.startswith("hookray: error: no event accepted (1 bad)")


def test_publish_of_an_integer_beyond_64_bits_is_a_clear_error(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.json"
    good = {"event_type": "click", "account_id": 1, "event_date": "2026-01-01T00:00:00Z"}
    events.write_text(json.dumps([good, {**good, "event_data": {"x": 2**64}}]))
    code, _, err = run_cli(capsys, "-c", config, "publish", str(events))
    assert code == 2
    assert err.startswith("hookray: error: 1 bad event(s), nothing accepted: event 1: "
                          "event_data.x: cannot be encoded")
    code, result, _ = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert code == 1 and result["accepted"] == 1
    assert result["issues"] == [{"index": 1, "field": "event_data.x", "reason":
                                 "cannot be encoded: can't serialize ints < -2**63 or > "
                                 "2**64 - 1"}]


def test_demo_refuses_an_empty_settings_path(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``-c "$CFG"`` with CFG unset: refused, as by every command, not HOOKRAY_CONFIG or
    the defaults taken instead."""
    monkeypatch.setenv("HOOKRAY_CONFIG", "deploy/main.json")
    code, _, err = run_cli(capsys, "-c", "", "demo")
    assert code == 2 and "settings file: the path given is empty" in err


def test_demo_with_a_given_redis_leaves_no_keys(redis_client: Any, tmp_path: Path) -> None:
    """REDIS_URL from the settings file (not the environment; the file starts with a
    byte order mark, as settings files may) is used, and the demo's keys are gone
    afterwards. The demo runs all local whatever the settings' deny list, API port and
    Ray cluster."""
    before = set(redis_client.scan_iter("demo*", count=1000))
    main_json = tmp_path / "main.json"
    url = redis_client.connection_pool.connection_kwargs
    # settings of an engine, which the demo, all local, does not take: a deny list that
    # refuses its receiver's 127.0.0.1, an API port (in use), a Ray cluster to join
    main_json.write_text("\ufeff" + json.dumps({
        "REDIS_URL": f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}",
        "DESTINATION_DENY": "loopback,link-local", "API_PORT": url["port"]}),
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    env["HOOKRAY_CONFIG"] = str(main_json)
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--events", "200"],
                          env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded Redis" not in proc.stdout and "demo: ok" in proc.stdout
    assert set(redis_client.scan_iter("demo*", count=1000)) == before


def test_health_exits_1_unless_every_worker_runs(config: str, settings: Settings,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    from engine.health import Heartbeat
    from engine.keys import Keys

    code, health, _ = run_cli(capsys, "-c", config, "health")  # no engine here yet
    assert code == 1 and health["partitions"]["expected"] is None
    r, keys = redis.Redis.from_url(settings.REDIS_URL), Keys(settings.REDIS_PREFIX)
    r.hset(keys.config, "partitions", 2)  # as an engine's start records it
    marks = {name: Heartbeat(r, keys, name) for name in ("partition:0", "partition:1", "retry")}
    for mark in marks.values():
        mark.beat()
    code, health, _ = run_cli(capsys, "-c", config, "health")
    assert code == 0 and health == {  # as GET /v1/health answers
        "status": "ok",
        "partitions": {"expected": 2, "running": 2, "waiting": [], "stopped": []},
        "retry_running": True, "retry_waiting": None, "redis_eviction": None,
        "redis_full": False}
    marks["partition:1"].beat("stored hook 7 no longer validates")
    code, health, _ = run_cli(capsys, "-c", config, "health")
    assert code == 1 and health["partitions"]["waiting"] == [
        {"partition": 1, "reason": "stored hook 7 no longer validates"}]
    marks["partition:1"].beat()
    r.delete(marks["retry"].key)  # the retry worker stopped
    code, health, _ = run_cli(capsys, "-c", config, "health")
    assert code == 1 and health["retry_running"] is False
    assert health["partitions"]["running"] == 2


def test_dead_letters_are_listed_replayed_and_discarded(config: str, settings: Settings,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    import redis

    from engine.keys import Keys
    from engine.stores import RetryStore
    from engine.transports.base import Delivery

    retry = RetryStore(redis.Redis.from_url(settings.REDIS_URL), Keys(settings.REDIS_PREFIX))
    for n, (account, hook_id) in enumerate([(3, 30), (3, 30), (3, 31), (4, 40)]):
        retry.kill(Delivery(id=f"d{n}", hook_id=hook_id, account_id=account,
                            kind="http_batch", parts=[b"{}"], created_ms=1000 + n,
                            last_attempt_ms=2000 + n), "HTTP 500")
    code, listed, _ = run_cli(capsys, "-c", config, "dead-letters", "--account", "3")
    assert code == 0 and [d["id"] for d in listed] == ["d0", "d1", "d2"]
    # the times the API gives, too
    assert [(d["created_ms"], d["last_attempt_ms"]) for d in listed] == [
        (1000, 2000), (1001, 2001), (1002, 2002)]
    code, _, err = run_cli(capsys, "-c", config, "discard")
    assert code == 2 and "give dead letter ids, or --all" in err
    code, _, err = run_cli(capsys, "-c", config, "discard", "d0", "--all")
    assert code == 2 and "give dead letter ids, or --all" in err
    code, _, err = run_cli(capsys, "-c", config, "discard", "d0", "--hook", "30")
    assert code == 2 and "not with ids" in err
    code, _, err = run_cli(capsys, "-c", config, "replay", "d0", "--hook", "30")
    assert code == 2 and "not with ids" in err
    # no ids and no scope (an empty $(...)): refused, not every account's replayed
    for given in ([], ["d0", "--all"]):
        code, _, err = run_cli(capsys, "-c", config, "replay", *given)
        assert code == 2 and "replay: give dead letter ids" in err, given
    assert retry.pending() == 0
    code, page, err = run_cli(capsys, "-c", config, "dead-letters", "--limit", "2")
    assert code == 0 and [d["id"] for d in page] == ["d0", "d1"]
    assert f"there may be more: --after {page[1]['cursor']}" in err
    code, rest, err = run_cli(capsys, "-c", config, "dead-letters", "--after",
                              page[1]["cursor"])
    assert code == 0 and [d["id"] for d in rest] == ["d2", "d3"] and "more" not in err
    code, _, err = run_cli(capsys, "-c", config, "dead-letters", "--after", "d1")
    assert code == 2 and "--after: 'd1' is not a dead-letter cursor" in err
    with pytest.raises(SystemExit):
        _parser().parse_args(["dead-letters", "--limit", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "-c", config, "discard", "d0", "nope")
    assert code == 2 and "nope do not exist" in err
    assert len(retry.dead_letters()) == 4  # all or nothing
    # what they did, as JSON: as the API's replay and discard answer
    code, out, _ = run_cli(capsys, "-c", config, "discard", "d0")
    assert code == 0 and out == {"discarded": 1}
    code, out, _ = run_cli(capsys, "-c", config, "replay", "--hook", "31")
    assert code == 0 and out == {"replayed": 1}
    code, out, _ = run_cli(capsys, "-c", config, "discard", "--all", "--account", "3")
    assert code == 0 and out == {"discarded": 1}
    assert [d.id for d in retry.dead_letters()] == ["d3"] and retry.pending() == 1
    code, stats, _ = run_cli(capsys, "-c", config, "stats", "--hook", "30")
    assert stats["discarded"] == 2 and stats["dead_lettered"] == 2
    code, out, _ = run_cli(capsys, "-c", config, "discard", "--all")
    assert code == 0 and out == {"discarded": 1}
    assert retry.dead_letters() == []
    retry.kill(Delivery(id="d9", hook_id=40, account_id=4, kind="http_batch",
                        parts=[b"{}"]), "HTTP 500")
    code, out, _ = run_cli(capsys, "-c", config, "replay", "--all")
    assert code == 0 and out == {"replayed": 1}
    assert retry.dead_letters() == [] and retry.pending() == 2


@pytest.mark.parametrize("value", ["5", "-1", "abc", "1000001"])
def test_demo_refuses_too_few_or_too_many_events(value: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Fewer than 100 sample events leave a sample hook without any, and the demo
    would report a failure of an engine that worked."""
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["demo", "--events", value])
    assert exit_info.value.code == 2
    assert f"argument --events: {value!r}: expected an integer from 100 to 1,000,000" \
        in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_no_traceback(config: str) -> None:
    """``hookray hooks list | head``: the reader went away before the output was
    written; the command ends quietly with 141, as other tools do."""
    proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "-c", config, "hooks", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the command has imported anything
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_hook_read_back_keeps_its_secrets_when_updated_and_is_refused_as_new(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        redis_client: Any, settings: Settings) -> None:
    """``hooks get`` shows secrets redacted; ``hooks update`` with that output keeps
    the stored secrets (same destination), ``hooks create`` with it is refused, and
    so is an update that sends the redacted value to another destination: the mask is
    never stored as a secret."""
    from engine.keys import Keys
    from engine.stores import HookRegistry

    hook_file = tmp_path / "hook.json"
    hook_file.write_text(json.dumps({"name": "crm", "account_id": 3, "actions": ["click"],
                                     "target": {"http_batch": {
                                         "url": "https://user:pa55@crm.example.com/x",
                                         "headers": {"X-Api-Token": "s3cr3t"}}}}))
    code, (created,), _ = run_cli(capsys, "-c", config, "hooks", "create", str(hook_file))
    hook_id = created["id"]
    code, shown, _ = run_cli(capsys, "-c", config, "hooks", "get", str(hook_id))
    assert code == 0 and "s3cr3t" not in json.dumps(shown) and "pa55" not in json.dumps(shown)
    shown["name"] = "crm renamed"
    read_back = tmp_path / "read_back.json"
    read_back.write_text(json.dumps(shown))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "update", str(hook_id),
                                 str(read_back))
    assert code == 0, err
    registry = HookRegistry(redis_client, Keys(settings.REDIS_PREFIX))
    stored = registry.get(hook_id).target.http_batch
    assert stored is not None and stored.headers == {"X-Api-Token": "s3cr3t"}
    assert stored.url == "https://user:pa55@crm.example.com/x"
    assert registry.get(hook_id).name == "crm renamed"
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(read_back))
    assert code == 2 and "the redacted value ********** is no secret" in err
    assert "target.http_batch.url" in err and "target.http_batch.headers.X-Api-Token" in err
    moved = json.loads(read_back.read_text())
    moved["target"]["http_batch"]["url"] = moved["target"]["http_batch"]["url"].replace(
        "crm.example.com", "elsewhere.example.com")
    read_back.write_text(json.dumps(moved))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "update", str(hook_id),
                           str(read_back))
    assert code == 2 and "the destination changed" in err
    kept = registry.get(hook_id).target.http_batch
    assert kept is not None and kept.headers == {"X-Api-Token": "s3cr3t"}


# arguments that are not valid UTF-8 ($'\xff' in a shell) reach Python as lone
# surrogates: (command line with {X} for such an argument, the argument's name)
NOT_UTF8 = "\udcff"
TEXT_ARGUMENTS = [
    (["replay", "d0", "{X}"], "ids"),
    (["discard", "{X}"], "ids"),
    (["tokens", "revoke", "{X}"], "token_id"),
    (["tokens", "create", "--account", "1", "--role", "master", "--name", "{X}"], "--name"),
    (["dead-letters", "--after", "1:{X}"], "--after"),
    (["hooks", "test", "1", "{X}"], "event_type"),
    (["run", "--ray-address", "{X}"], "--ray-address"),
    # its own name, not that of --name (clone, tokens create): another argument
    (["hooks", "forget-file-record", "1", "{X}"], "NAME"),
]


@pytest.mark.parametrize(("command", "name"), TEXT_ARGUMENTS, ids=lambda c: str(c))
def test_an_argument_that_is_not_utf8_is_refused_naming_it(
        command: list[str], name: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything is read or connected (this Redis does not answer):
    Redis, JSON and Ray take UTF-8 only, and failed with a UnicodeEncodeError
    traceback (exit 1), or stored the text as it was (`tokens create --name`)."""
    main_json = tmp_path / "main.json"
    main_json.write_text(json.dumps({"REDIS_URL": "redis://127.0.0.1:1/0"}))
    argv = ["-c", str(main_json), *(a.replace("{X}", NOT_UTF8) for a in command)]
    code, out, err = run_cli(capsys, *argv)
    assert (code, out, err) == (2, "", f"hookray: error: {name}: not valid UTF-8\n")


def test_every_text_argument_is_checked_unless_it_names_a_file() -> None:
    """The arguments whose text goes on as it is (not an int, a choice or a flag)
    are each in TEXT_ARGUMENTS above, or name a file (which may be any bytes)."""
    from actors.cli import FILE_ARGUMENTS, _argument_names

    def text_dests(parser: Any) -> set[str]:
        found = set()
        for action in parser._actions:
            if action.choices is not None and not action.option_strings \
                    and isinstance(action.choices, dict):
                for child in action.choices.values():
                    found |= text_dests(child)
            elif action.type is None and action.choices is None and action.nargs != 0 \
                    and action.dest != "help":
                found.add(action.dest)
        return found

    parser = _parser()
    names = _argument_names(parser)
    checked = {name for _, name in TEXT_ARGUMENTS}
    assert {names[dest] for dest in text_dests(parser) - FILE_ARGUMENTS} == checked
    assert text_dests(parser) >= FILE_ARGUMENTS


def test_not_utf8_arguments_from_a_shell_end_without_a_traceback() -> None:
    """The reported commands, with the raw byte 0xff as the shell passes it."""
    for command in (["replay"], ["discard"], ["tokens", "revoke"]):
        proc = subprocess.run([sys.executable.encode(), b"-m", b"actors.cli",
                               *(c.encode() for c in command), b"\xff"],
                              capture_output=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[2])
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 2, err
        assert err.startswith("hookray: error: ") and err.endswith(": not valid UTF-8\n")
        assert "Traceback" not in err


def test_a_file_name_that_is_not_utf8_is_used_as_it_is(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook_file = Path(os.fsdecode(bytes(tmp_path) + b"/hook\xff.json"))
    hook_file.write_text(json.dumps({"name": "crm", "account_id": 3, "actions": ["click"],
                                     "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}))
    code, created, err = run_cli(capsys, "-c", config, "hooks", "create", str(hook_file))
    assert code == 0 and created[0]["name"] == "crm", err
    # an error quoting such a name shows its bytes, on a stderr of strict UTF-8 too
    code, _, err = run_cli(capsys, "-c", str(tmp_path / f"main{NOT_UTF8}.json"), "stats")
    assert code == 2 and "main\\xff.json: cannot be read (No such file or directory)" in err


def test_run_names_a_hooks_file_that_is_not_utf8_on_any_stdout(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --hooks` says which file each hook came from: a file name that is not
    UTF-8 failed the print (after the engine started) on a stdout that refuses lone
    surrogates (a UTF-8 locale other than C.UTF-8)."""
    import io

    from actors.cli import _create_missing_hook
    from actors.driver import Engine

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    engine = Engine.connect(settings)
    target = {"http_batch": {"url": "http://127.0.0.1:9/x"}}
    try:
        engine.create_hook({"account_id": 3, "name": "crm", "actions": ["click"],
                            "target": target})
        for name, file in (("crm", f"/h/a{NOT_UTF8}.json"), ("new", f"/h/b{NOT_UTF8}.json")):
            _create_missing_hook(engine, {"account_id": 3, "name": name, "actions": ["click"],
                                          "target": target}, file, 0)
    finally:
        engine.redis.close()
    out.flush()
    assert out.buffer.getvalue().decode().splitlines() == [
        "hookray: hook 1 ('crm') exists; left as it is (not taken from /h/a\\xff.json)",
        "hookray: hook 2 created from /h/b\\xff.json"]


def test_run_says_the_ray_cluster_it_joins(
        config: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--ray-address overrides the settings' RAY_ADDRESS: the first line says that one."""
    from actors.driver import Engine
    from engine.errors import HookrayError

    def start(*args: Any, **kwargs: Any) -> Any:
        raise HookrayError(f"not started here ({kwargs.get('ray_address')})")

    monkeypatch.setattr(Engine, "start", start)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    code, out, err = run_cli(capsys, "-c", config, "run", "--ray-address", "127.0.0.1:6380")
    assert code == 2 and "not started here (127.0.0.1:6380)" in err
    started = json.loads(out.split("hookray: starting with ", 1)[1].splitlines()[0])
    assert started["RAY_ADDRESS"] == "127.0.0.1:6380"


def test_run_restarts_with_a_file_whose_stored_hooks_a_new_hook_could_not_be(
        config: str, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook of the file that is stored already is left as it is: a rule for new hooks
    added since (a filter on segment 0) or an address denied since does not stop the
    job's restart. A new one breaking them still does."""
    import redis

    from actors.driver import Engine
    from engine.errors import HookrayError
    from engine.hooks import parse_hook
    from engine.keys import Keys
    from engine.stores import HookRegistry

    def start(*args: Any, **kwargs: Any) -> Any:
        raise HookrayError("not started here")

    monkeypatch.setattr(Engine, "start", start)
    old = {"name": "old", "account_id": 4, "actions": ["click"], "filters": {"segments": [0]},
           "target": {"http_batch": {"url": "http://169.254.169.254/x"}}}
    r = redis.Redis.from_url(settings.REDIS_URL)
    registry = HookRegistry(r, Keys(settings.REDIS_PREFIX))
    registry._save(parse_hook({**old, "id": 1}, stored=True))  # stored before the rules
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps([old]))
    code, _, err = run_cli(capsys, "-c", config, "run", "--hooks", str(hooks))
    assert code == 2 and "not started here" in err, err
    hooks.write_text(json.dumps([old, {**old, "name": "new"}]))
    code, _, err = run_cli(capsys, "-c", config, "run", "--hooks", str(hooks))
    assert code == 2 and f"--hooks: nothing started; {hooks}[1]: invalid hook: " in err
    assert "not started here" not in err
    r.close()


def test_run_names_the_file_and_place_of_a_hook_the_started_engine_refuses(
        settings: Settings, redis_client: Any, keys: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook the files' check passed and the engine refuses (its settings differ from
    the file's: an action its EVENT_TYPES_FILE lacks) is named by file and place; the
    run's claim on creating it is let go (the next run tries again)."""
    from actors.cli import _create_missing_hook
    from actors.driver import Engine

    def refuse(data: Any) -> Any:
        raise HookError("invalid hook: actions: 'x': not an event type of the engine",
                        [("actions", "not an event type of the engine")])

    engine = Engine.connect(settings)
    monkeypatch.setattr(engine, "create_hook", refuse)
    try:
        with pytest.raises(HookError) as raised:
            _create_missing_hook(engine, {"account_id": 3, "name": "new"}, "hooks.json", 2)
    finally:
        engine.redis.close()
    assert str(raised.value) == ("hooks.json[2]: invalid hook: actions: 'x': not an event "
                                 "type of the engine")
    assert raised.value.issues == [("actions", "not an event type of the engine")]
    assert redis_client.hlen(keys.hooks_from_file) == 0


NOT_AN_ID = "expected an id, an integer from 0 to 9223372036854775807"


@pytest.mark.parametrize(("command", "code", "message"), [
    (["hooks", "get", str(2**70)], 2, f"argument id: '{2**70}': {NOT_AN_ID}"),
    (["hooks", "delete", "-1"], 2, f"argument id: '-1': {NOT_AN_ID}"),
    (["hooks", "activate", str(2**64)], 2, f"argument id: '{2**64}': {NOT_AN_ID}"),
    (["hooks", "test", str(2**70), "click"], 2, f"argument id: '{2**70}': {NOT_AN_ID}"),
    (["stats", "--hook", "-3"], 2, f"argument --hook: '-3': {NOT_AN_ID}"),
    (["hooks", "list", "--account", str(2**70)], 2, f"argument --account: '{2**70}'"),
    (["tokens", "list", "--account", "-1"], 2, f"argument --account: '-1': {NOT_AN_ID}"),
    (["tokens", "create", "--account", str(2**70), "--role", "ingest"], 2,
     f"argument --account: '{2**70}'"),
    (["dead-letters", "--hook", str(2**70)], 2, f"argument --hook: '{2**70}'"),
    (["replay", "--hook", str(2**70)], 2, f"argument --hook: '{2**70}'"),
    (["discard", "--all", "--account", "-7"], 2, f"argument --account: '-7': {NOT_AN_ID}"),
    # answered: every dead letter; none died after the year 3e297
    (["dead-letters", "--limit", str(2**70)], 0, ["d1", "d2"]),
    (["dead-letters", "--after", "1e308:x"], 0, []),
    (["dead-letters", "--after", "1e400:x"], 2, "--after: '1e400:x' is not a dead-letter "
     "cursor"),
    (["replay", ""], 2, "hookray: error: dead letter(s) '' do not exist"),
    (["tokens", "revoke", "x" * 10_000], 2, "hookray: error: token 'xxxxxxx"),
], ids=lambda c: " ".join(a[:24] for a in c) if isinstance(c, list) else None)
def test_odd_numbers_and_ids_get_an_answer_not_a_traceback(
        command: list[str], code: int, message: str | list[str], config: str,
        redis_client: Any,
        keys: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """An id out of range is refused before anything runs (a negative account must
    not select, or discard, anything); the other odd values get an answer."""
    from engine.stores import RetryStore
    from engine.transports.base import Delivery

    retry = RetryStore(redis_client, keys)
    for account in (1, 2):
        retry.kill(Delivery(id=f"d{account}", hook_id=account, account_id=account,
                            kind="http_batch", parts=[b"{}"]), "HTTP 500")
    got, out, err = run_cli(capsys, "-c", config, *command)
    assert got == code, (out, err)
    assert "Traceback" not in err and len(err) < 500, err
    if isinstance(message, list):  # the dead letters listed
        assert sorted(letter["id"] for letter in out) == message
    else:
        assert message in err, err
    assert sorted(d.id for d in retry.dead_letters()) == ["d1", "d2"]  # nothing moved


def test_a_stored_hook_that_no_longer_validates_stops_no_progress_report(
        settings: Settings, redis_client: Any, keys: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The main job's progress line reads every hook's counters: one stored hook that
    no longer validates (its partitions wait, see health) must not end the job."""
    import threading

    from actors.cli import _create_missing_hook, _report_until
    from actors.driver import Engine
    from engine.stores import ENGINE_STAT_FIELDS, STAT_FIELDS

    engine = Engine.connect(settings)
    try:
        good = engine.create_hook({"name": "crm", "account_id": 4, "actions": ["click"],
                                   "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
        redis_client.hset(keys.hooks, "77", b'{"account_id": 4, "name": "bro')  # damaged
        stats = engine.stats()
        assert set(stats) == {good.id, 77, "engine"}
        # the engine's counters are there, 0, before anything counted them
        assert stats["engine"] == {**dict.fromkeys(ENGINE_STAT_FIELDS, 0), "retry_scheduled": 0,
                                   "dead_letters": 0, "intake_backlog": 0}
        assert engine.totals() == dict.fromkeys(STAT_FIELDS, 0)
        stop = threading.Event()
        stop.set()
        _report_until(engine, stop, 0.01, 0)
        out = capsys.readouterr().out
        assert out.startswith("hookray: 0s {") and "unavailable" not in out, out
        # run --hooks: the account's damaged hook is named, and the others are known
        _create_missing_hook(engine, {"name": "crm", "account_id": 4}, "hooks.json", 0)
        out = capsys.readouterr().out
        assert "hook 77 of account 4: stored hook 77 is not valid JSON" in out
        assert f"hook {good.id} ('crm') exists; left as it is" in out
        # one that no longer validates, of the same name, exists all the same: a second
        # would send every message twice once the first is valid again
        stale = dict(good.to_storage(), id=78, name="old crm", actions=["nope"])
        redis_client.hset(keys.hooks, "78", json.dumps(stale))
        _create_missing_hook(engine, {"name": "old crm", "account_id": 4}, "hooks.json", 1)
        out = capsys.readouterr().out
        assert "hook 78 of account 4: stored hook 78 no longer validates" in out
        assert "hook 78 ('old crm') exists; left as it is" in out
        assert engine.redis.hlen(keys.hooks) == 3  # good, 77 and 78: none created
        # the backlog covers the partitions the running engine recorded, more than these
        redis_client.hset(keys.config, "partitions", settings.PARTITIONS + 2)
        redis_client.xadd(keys.intake(settings.PARTITIONS + 1), {"x": "1"})
        assert engine.backlog() == 1
    finally:
        engine.redis.close()


def test_hooks_list_names_a_stored_hook_that_no_longer_validates_and_lists_the_others(
        config: str, redis_client: Any, keys: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """As the API lists such a hook apart: the valid hooks on stdout, the invalid one
    named on stderr with what to do, exit 0 (not an error that lists nothing)."""
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps([
        {"name": n, "account_id": a, "actions": ["click"],
         "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}
        for n, a in (("a", 5), ("b", 5), ("c", 6))]))
    code, created, _ = run_cli(capsys, "-c", config, "hooks", "create", str(hooks))
    assert code == 0
    stale = json.loads(redis_client.hget(keys.hooks, str(created[1]["id"])))
    redis_client.hset(keys.hooks, str(created[1]["id"]),
                      json.dumps({**stale, "actions": ["no_such_code"]}))
    code, listed, err = run_cli(capsys, "-c", config, "hooks", "list")
    assert code == 0, err
    assert [h["name"] for h in listed] == ["a", "c"]
    assert f"hookray: hook {created[1]['id']}: stored hook {created[1]['id']} no longer " \
        "validates" in err
    assert f"delete it (`hookray hooks delete {created[1]['id']}`)" in err
    code, listed, err = run_cli(capsys, "-c", config, "hooks", "list", "--account", "6")
    assert code == 0 and [h["name"] for h in listed] == ["c"] and err == ""


def test_the_progress_line_still_counts_a_hook_deleted_during_the_run(
        settings: Settings, redis_client: Any, keys: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A hook deleted while the main job runs (the locustfile deletes its own at the
    end) keeps its counters, and the last progress line still adds them up."""
    import threading

    from actors.cli import _report_until
    from actors.driver import Engine

    engine = Engine.connect(settings)
    stop = threading.Event()
    reporter = threading.Thread(target=_report_until, args=(engine, stop, 0.05, 0))
    try:
        hook = engine.create_hook({"name": "bench", "account_id": 4, "actions": ["click"],
                                   "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
        kept = engine.create_hook({"name": "kept", "account_id": 4, "actions": ["open"],
                                   "target": {"http_batch": {"url": "http://127.0.0.1:9/y"}}})
        redis_client.hset(keys.stats(hook.id), mapping={"accepted": 7, "delivered": 5})
        redis_client.hset(keys.stats(kept.id), mapping={"accepted": 3, "delivered": 3})
        reporter.start()
        deadline = time.monotonic() + 10
        while '"accepted": 10' not in capsys.readouterr().out:  # a line saw both
            assert time.monotonic() < deadline, "no progress line counted both hooks"
            time.sleep(0.02)
        engine.delete_hook(hook.id)
        stop.set()
        reporter.join(10)
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert '"accepted": 10, "delivered": 8' in last, last
        assert engine.totals() == {**engine.stats(kept.id)}  # stored hooks only
        assert engine.totals([hook.id, kept.id])["accepted"] == 10
    finally:
        stop.set()
        if reporter.is_alive():
            reporter.join(10)
        engine.redis.close()


def test_set_aside_entries_are_listed_and_put_back(
        config: str, redis_client: Any, keys: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """What a partition sets aside (as PartitionWorker._set_aside writes it: the
    entry's fields, then why) can be listed and put back into the intake, where a
    partition processes it again; an undecodable one cannot be put back."""
    from engine.intake import Intake, decode_entry

    Intake(redis_client, keys, 2, 100).publish(
        [{"event_type": "click", "account_id": 1, "list_id": 7, "id": f"e{n}",
          "event_date": "2026-01-01T00:00:00Z"} for n in range(3)])
    ((stream, ((entry_id, fields),)),) = [
        (s, redis_client.xrange(s)) for s in (keys.intake(0), keys.intake(1))
        if redis_client.xlen(s)]
    redis_client.delete(stream)  # taken out of the intake, as a set-aside entry is
    kept = redis_client.xadd(keys.intake_unreadable, {
        **fields, b"_partition": b"1", b"_entry": entry_id,
        b"_error": b"WRONGTYPE Operation against a key holding the wrong kind of value"})
    junk = redis_client.xadd(keys.intake_unreadable, {
        b"x": b"\xc1", b"_partition": b"0", b"_entry": b"5-0", b"_error": b"KeyError: b'e'"})
    code, listed, _ = run_cli(capsys, "-c", config, "set-aside")
    assert code == 0 and listed == [
        {"id": kept.decode(), "partition": 1, "entry": entry_id.decode(),
         "error": "WRONGTYPE Operation against a key holding the wrong kind of value",
         "events": 3},
        {"id": junk.decode(), "partition": 0, "entry": "5-0",
         "error": "KeyError: b'e'", "events": None}]
    code, page, err = run_cli(capsys, "-c", config, "set-aside", "--after", kept.decode())
    assert [e["id"] for e in page] == [junk.decode()] and "more" not in err
    code, page, err = run_cli(capsys, "-c", config, "set-aside", "--limit", "1")
    assert [e["id"] for e in page] == [kept.decode()]
    assert err == f"hookray: there may be more: --after {kept.decode()}\n"  # as dead-letters
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--requeue", junk.decode())
    assert code == 2 and "cannot be decoded" in err and "nothing requeued" in err
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--requeue", "9-9")
    assert code == 2 and "9-9 do not exist" in err
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--requeue", "soon")
    assert code == 2 and "'soon' is no set-aside entry's id" in err
    assert redis_client.xlen(keys.intake_unreadable) == 2
    code, out, _ = run_cli(capsys, "-c", config, "set-aside", "--requeue")
    assert code == 0 and out == {"requeued": 1}
    ((_, back),) = redis_client.xrange(keys.intake(1))  # the partition it came from
    assert [e.id for e in decode_entry(back)] == ["e0", "e1", "e2"]
    assert not any(k.startswith(b"_") for k in back)
    assert [eid for eid, _ in redis_client.xrange(keys.intake_unreadable)] == [junk]
    assert redis_client.hget(keys.engine_stats, "entries_requeued") == b"1"
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--requeue", "--limit", "5")
    assert code == 2 and "--limit and --after page the list" in err
    # two requeue runs that both read an entry put it back once: the move appends only
    # where it removed
    from engine.intake import _REQUEUE

    again = redis_client.xadd(keys.intake_unreadable, {**fields, b"_partition": b"0"})
    original = [x for k, v in fields.items() for x in (k, v)]
    moved = [redis_client.eval(_REQUEUE, 3, keys.intake_unreadable, keys.engine_stats,
                               keys.intake(0), again, len(original), *original)
             for _ in range(2)]
    assert moved == [1, 0] and redis_client.xlen(keys.intake(0)) == 1


def test_set_aside_entries_are_discarded_by_id_all_or_none(
        config: str, redis_client: Any, keys: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """An entry that can never be processed (it cannot be decoded) is deleted by id,
    counted as entries_discarded; an unknown id deletes nothing; ids are required."""
    junk = [redis_client.xadd(keys.intake_unreadable, {
        b"x": b"\xc1", b"_partition": b"0", b"_entry": f"{n}-0".encode(),
        b"_error": b"KeyError: b'e'"}).decode() for n in range(3)]
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--discard", junk[0], "9-9")
    assert code == 2 and "9-9 do not exist; nothing discarded" in err
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--discard")
    assert code == 2 and "--discard takes the ids" in err
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--discard", "--requeue", junk[0])
    assert code == 2 and "either --requeue or --discard" in err
    assert redis_client.xlen(keys.intake_unreadable) == 3
    code, out, _ = run_cli(capsys, "-c", config, "set-aside", "--discard", junk[0], junk[2],
                           junk[0])
    assert code == 0 and out == {"discarded": 2}
    assert [eid.decode() for eid, _ in redis_client.xrange(keys.intake_unreadable)] == \
        [junk[1]]
    assert redis_client.hget(keys.engine_stats, "entries_discarded") == b"2"
    # two runs at once: the second finds nothing left to delete, and counts nothing
    from engine.intake import _DISCARD

    assert [redis_client.eval(_DISCARD, 2, keys.intake_unreadable, keys.engine_stats,
                              junk[1]) for _ in range(2)] == [1, 0]
    assert redis_client.hget(keys.engine_stats, "entries_discarded") == b"3"


def test_set_aside_retries_are_listed_put_back_and_discarded(
        config: str, redis_client: Any, keys: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-sends the retry worker set aside undecoded (``retry:unreadable``) are listed
    with their hook and why; those this version decodes (set aside by another version)
    go back into the schedule, due at once; the others can only be deleted, by id."""
    import msgspec

    from engine.stores import RetryStore
    from engine.transports.base import Delivery, pack_delivery

    store = RetryStore(redis_client, keys)
    good = Delivery(id="d-good", hook_id=7, account_id=1, kind="http_batch", parts=[b"{}"])
    # a payload of another version: hook_id as text; and one that is no msgpack at all
    other = msgspec.msgpack.encode({"id": "d-other", "hook_id": 8, "account_id": "one"})
    for delivery_id, raw in (("d-other", other), ("d-junk", b"\xc1\xc1")):
        redis_client.hset(keys.retry_payload, delivery_id, raw)
        redis_client.zadd(keys.retry, {delivery_id: 0})
    assert store.claim_due(now=10) == []  # both set aside, as the retry worker does
    redis_client.hset(keys.retry_unreadable, "d-good", pack_delivery(good))
    code, listed, _ = run_cli(capsys, "-c", config, "set-aside", "--retries")
    assert code == 0 and [(e["id"], e["hook_id"], e["bytes"]) for e in listed] == [
        ("d-good", 7, len(pack_delivery(good))), ("d-junk", None, 2),
        ("d-other", 8, len(other))]
    assert listed[0]["error"] is None and listed[1]["error"].startswith("DecodeError")
    assert "account_id" in listed[2]["error"]
    code, page, _ = run_cli(capsys, "-c", config, "set-aside", "--retries", "--after",
                            "d-good", "--limit", "1")
    assert [e["id"] for e in page] == ["d-junk"]
    # a cursor that is no re-send's id (a typo) is refused, not paged from
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--retries", "--after",
                           "garbage")
    assert code == 2 and "set-aside --retries: after: expected a set-aside re-send's id " \
        "(32 hex digits, as listed), got 'garbage'" in err
    code, page, _ = run_cli(capsys, "-c", config, "set-aside", "--retries", "--after",
                            "f" * 32)
    assert code == 0 and page == []  # of the form of an id: after the last one
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--retries", "--requeue",
                           "d-good", "d-other")
    assert code == 2 and "d-other still cannot be decoded" in err and "nothing requeued" in err
    code, _, err = run_cli(capsys, "-c", config, "set-aside", "--retries", "--discard", "d-x")
    assert code == 2 and "re-send(s) d-x do not exist; nothing discarded" in err
    assert redis_client.hlen(keys.retry_unreadable) == 3
    code, out, _ = run_cli(capsys, "-c", config, "set-aside", "--retries", "--requeue")
    assert code == 0 and out == {"requeued": 1}
    (claimed,) = store.claim_due(now=10)  # due at once
    assert claimed == good
    code, out, _ = run_cli(capsys, "-c", config, "set-aside", "--retries", "--discard",
                           "d-junk", "d-other")
    assert code == 0 and out == {"discarded": 2}
    assert redis_client.hlen(keys.retry_unreadable) == 0
    stats = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.engine_stats).items()}
    assert (stats["retries_unreadable"], stats["retries_requeued"],
            stats["retries_discarded"]) == (2, 1, 2)
    # two runs at once: the second finds nothing left, and counts nothing
    redis_client.hset(keys.retry_unreadable, "d-good", pack_delivery(good))
    assert [store.requeue_set_aside(["d-good"]) if n == 0 else store.requeue_set_aside(None)
            for n in range(2)] == [1, 0]
    assert store.requeue_set_aside([]) == 0 and store.discard_set_aside([]) == 0


def test_the_settings_file_may_come_between_a_group_and_its_action(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.json")
    for argv in (["hooks", "-c", config, "list"], ["tokens", "-c", config, "list"],
                 ["-c", missing, "hooks", "-c", config, "list"],  # the last one counts
                 ["hooks", "-c", missing, "list", "-c", config]):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out, err) == (0, [], ""), argv
    code, _, err = run_cli(capsys, "hooks", "-c", missing, "list")
    assert code == 2 and "missing.json: cannot be read" in err


def test_hook_files_with_a_byte_order_mark_are_read(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hook.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({
        "name": "bom", "account_id": 3, "actions": ["click"],
        "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}).encode())
    code, created, err = run_cli(capsys, "-c", config, "hooks", "create", str(path))
    assert code == 0, err
    assert created[0]["name"] == "bom"


def test_a_clone_takes_no_empty_name_and_its_default_name_says_copy(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hook.json"
    path.write_text(json.dumps({"name": "n" * 255, "account_id": 3, "actions": ["click"],
                                "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}))
    code, created, _ = run_cli(capsys, "-c", config, "hooks", "create", str(path))
    hook_id = str(created[0]["id"])
    code, _, err = run_cli(capsys, "-c", config, "hooks", "clone", hook_id, "--name", "")
    assert code == 2 and "name: String should have at least 1 character" in err
    code, clone, _ = run_cli(capsys, "-c", config, "hooks", "clone", hook_id)
    assert code == 0 and clone["name"] == "n" * 248 + " (copy)"


def test_driver_hook_calls_refuse_an_id_of_another_kind(settings: Settings) -> None:
    from actors.driver import Engine

    engine = Engine.connect(settings)
    try:
        hook = engine.create_hook({"name": "h", "account_id": 3, "actions": ["click"],
                                   "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
        calls = [("get_hook", lambda v: engine.get_hook(v)),
                 ("update_hook", lambda v: engine.update_hook(v, hook)),
                 ("activate_hook", lambda v: engine.activate_hook(v)),
                 ("stop_hook", lambda v: engine.stop_hook(v)),
                 ("clone_hook", lambda v: engine.clone_hook(v)),
                 ("delete_hook", lambda v: engine.delete_hook(v)),
                 ("test_event", lambda v: engine.test_event(v, "click"))]
        for name, call in calls:
            for wrong in (str(hook.id), True, float(hook.id or 0), None, -1):
                with pytest.raises(ValueError) as err:
                    call(wrong)
                assert str(err.value) == (f"{name}: hook_id must be an integer from 0 to "
                                          f"{2**63 - 1}, got {wrong!r}"), (name, wrong)
        with pytest.raises(ValueError, match="test_event: event_type must be an event code"):
            engine.test_event(hook.id or 0, ["click"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="clone_hook: name must be a string, got int"):
            engine.clone_hook(hook.id or 0, 5)  # type: ignore[arg-type]
        assert engine.get_hook(hook.id or 0) == hook  # nothing changed it
    finally:
        engine.redis.close()


def test_driver_hook_listing_lists_the_valid_hooks_and_names_the_others(
        settings: Settings, redis_client: Any) -> None:
    from actors.driver import Engine
    from engine.errors import HookError
    from engine.keys import Keys

    engine = Engine.connect(settings)
    try:
        good = engine.create_hook({"name": "h", "account_id": 3, "actions": ["click"],
                                   "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
        broken = engine.create_hook({**good.to_storage(), "account_id": 4, "name": "b"})
        record = json.loads(redis_client.hget(Keys(settings.REDIS_PREFIX).hooks,
                                              str(broken.id)))
        record["actions"] = ["no_such_event"]  # as an older EVENT_TYPES_FILE allowed
        redis_client.hset(Keys(settings.REDIS_PREFIX).hooks, str(broken.id),
                          json.dumps(record))
        with pytest.raises(HookError):
            engine.list_hooks()
        hooks, invalid = engine.hook_listing()
        assert [h.id for h in hooks] == [good.id]
        assert [i for i, _ in invalid] == [broken.id]
        assert f"stored hook {broken.id} no longer validates" in invalid[0][1]
        assert engine.hook_listing(3) == ([good], [])
        with pytest.raises(ValueError, match="hook_listing: account_id must be an integer"):
            engine.hook_listing("3")  # type: ignore[arg-type]
    finally:
        engine.redis.close()


def test_a_hooks_file_with_an_action_the_engine_lacks_creates_nothing(
        settings: Settings, redis_client: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The shell's EVENT_TYPES_FILE has a code the engine (which recorded its codes at
    start) lacks: a file of a valid hook and one of that code creates neither."""
    from engine.intake import Intake
    from engine.keys import Keys

    Intake(redis_client, Keys(settings.REDIS_PREFIX), 2, 100).keep_records()
    types = tmp_path / "types.json"
    types.write_text(json.dumps({"event_types": [
        {"code": "promo", "name": "Promo", "category": "delivery", "channel": "promo"}]}))
    main_json = tmp_path / "shell.json"
    main_json.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL, "PARTITIONS": 2,
                                     "REDIS_PREFIX": settings.REDIS_PREFIX,
                                     "EVENT_TYPES_FILE": str(types)}))
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps([
        {"name": n, "account_id": 3, "actions": [code],
         "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}
        for n, code in (("ok", "click"), ("promo", "promo"))]))
    code, _, err = run_cli(capsys, "-c", str(main_json), "hooks", "create", str(hooks))
    assert code == 2 and "nothing created; [1]: invalid hook: actions: 'promo'" in err, err
    assert "not an event type of the engine" in err
    code, listed, _ = run_cli(capsys, "-c", str(main_json), "hooks", "list")
    assert listed == []


def test_a_hook_cannot_move_to_another_account(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        redis_client: Any, settings: Settings) -> None:
    """Its re-sends and dead letters are its account's: moved, they would go to the
    other account's destination (and be replayable there by the old account)."""
    from engine.keys import Keys
    from engine.stores import HookRegistry

    hook_file = tmp_path / "hook.json"
    hook = {"name": "crm", "account_id": 3, "actions": ["click"],
            "target": {"http_batch": {"url": "https://crm.example.com/x"}}}
    hook_file.write_text(json.dumps(hook))
    code, (created,), _ = run_cli(capsys, "-c", config, "hooks", "create", str(hook_file))
    hook_file.write_text(json.dumps({**hook, "account_id": 4,
                                     "target": {"http_batch": {"url": "https://b.example/"}}}))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "update", str(created["id"]),
                           str(hook_file))
    assert code == 2, err
    assert "account_id: cannot change from 3 to 4: the hook's re-sends and dead letters " \
           "belong to its account" in err
    stored = HookRegistry(redis_client, Keys(settings.REDIS_PREFIX)).get(created["id"])
    assert stored.account_id == 3 and stored.target.http_batch is not None
    assert stored.target.http_batch.url == "https://crm.example.com/x"


def test_writing_where_no_engine_ever_ran_warns_of_a_mistyped_prefix(
        config: str, tmp_path: Path, redis_client: Any, keys: Any, settings: Settings,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Events published, a hook or a token created under a REDIS_PREFIX (or database)
    no engine has run with wait for one: written all the same (producers may run
    first), with a warning naming the prefix, since a mistyped one leaves them where no
    engine reads; none once an engine has run there."""
    hook_file = tmp_path / "hook.json"
    hook_file.write_text(json.dumps({"name": "h", "account_id": 3, "actions": ["click"],
                                     "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}))
    events = tmp_path / "events.json"
    events.write_text(json.dumps([{"event_type": "click", "account_id": 3,
                                   "event_date": "2026-01-01T00:00:00Z"}]))
    warning = (f"hookray: warning: no engine has run with this Redis and REDIS_PREFIX "
               f"{settings.REDIS_PREFIX!r}")
    for command in (["hooks", "create", str(hook_file)], ["publish", str(events)],
                    ["tokens", "create", "--account", "3", "--role", "ingest"]):
        code, _, err = run_cli(capsys, "-c", config, *command)
        assert code == 0 and warning in err, (command, err)
    redis_client.hset(keys.config, "partitions", 2)  # an engine ran here
    for command in (["hooks", "create", str(hook_file)], ["publish", str(events)]):
        code, _, err = run_cli(capsys, "-c", config, *command)
        assert code == 0 and "warning" not in err, (command, err)


def test_the_progress_says_when_a_worker_waits_or_stopped_and_when_all_run_again(
        settings: Settings, redis_client: Any, keys: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`hookray run` (and the Ray job) runs on while a worker waits or stopped: its
    progress says so, as `hookray health` does, when that changes and once a minute
    while it lasts, and says when every worker runs again."""
    import threading

    from actors.cli import _report_until
    from actors.driver import Engine
    from engine.health import Heartbeat

    engine = Engine.connect(settings)
    try:
        redis_client.hset(keys.config, "partitions", 1)
        Heartbeat(redis_client, keys, "partition:0").beat("stored hook 9 no longer validates")
        Heartbeat(redis_client, keys, "retry").beat("")
        stop = threading.Event()
        reporter = threading.Thread(target=_report_until, args=(engine, stop, 0.05, 0))
        reporter.start()
        try:
            deadline = time.monotonic() + 10
            out = ""
            while out.count("backlog=") < 4:
                assert time.monotonic() < deadline
                out += capsys.readouterr().out
                time.sleep(0.02)
            # said once, not at each of the progress lines
            assert out.count("hookray: health: partition 0 waits: stored hook 9 no longer "
                             "validates\n") == 1, out
            Heartbeat(redis_client, keys, "partition:0").beat("")
            while "hookray: health: every worker runs again" not in out:
                assert time.monotonic() < deadline
                out += capsys.readouterr().out
                time.sleep(0.02)
        finally:
            stop.set()
            reporter.join(10)
    finally:
        engine.redis.close()
