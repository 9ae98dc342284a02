"""The ``hookray`` command line: help, hook management, stats, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from actors.cli import _parser, main
from engine.settings import Settings

pytestmark = pytest.mark.integration

COMMANDS = [[], ["run"], ["demo"], ["hooks"], ["hooks", "list"], ["hooks", "create"],
            ["hooks", "update"], ["hooks", "get"], ["hooks", "delete"], ["hooks", "activate"],
            ["hooks", "stop"], ["hooks", "clone"], ["hooks", "test"], ["publish"], ["stats"],
            ["dead-letters"], ["replay"], ["tokens"], ["tokens", "create"], ["tokens", "list"],
            ["tokens", "revoke"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "hookray")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hookray" in capsys.readouterr().out


@pytest.fixture
def config(tmp_path: Path, settings: Settings) -> str:
    path = tmp_path / "main.json"
    path.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL,
                                "REDIS_PREFIX": settings.REDIS_PREFIX, "PARTITIONS": 2}))
    return str(path)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
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
    code, listed, _ = run_cli(capsys, "-c", config, "hooks", "list", "--account", "3")
    assert sorted(h["id"] for h in listed) == sorted([hook_id, clone["id"]])
    assert "s3cr3t" not in json.dumps(listed)
    code, stats, _ = run_cli(capsys, "-c", config, "stats", "--hook", str(hook_id))
    assert stats == {"accepted": 0, "delivered": 0, "retried": 0, "dead_lettered": 0}
    code, out, _ = run_cli(capsys, "-c", config, "hooks", "delete", str(clone["id"]))
    assert code == 0 and out.strip() == f"hook {clone['id']} deleted"
    code, _, err = run_cli(capsys, "-c", config, "hooks", "get", str(clone["id"]))
    assert code == 2 and f"hook {clone['id']} does not exist" in err


def test_bad_input_gets_a_clear_error(config: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "account_id": 1, "actions": ["clack"],
                               "target": {"http_batch": {"url": "ftp://x"}}}))
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(bad))
    assert code == 2
    assert "actions: unknown event code(s) 'clack'" in err
    assert "target.http_batch.url: 'ftp://x' is not an http(s) URL" in err
    code, _, err = run_cli(capsys, "-c", config, "hooks", "create", str(tmp_path / "nope.json"))
    assert code == 2 and "nope.json: cannot be read" in err
    events = tmp_path / "events.ndjson"
    good = '{"event_type": "click", "account_id": 1, "event_date": "2026-01-01T00:00:00Z"}'
    events.write_text(good + "\n" + good.replace("1,", '"one",') + "\n")
    code, _, err = run_cli(capsys, "-c", config, "publish", str(events))
    assert code == 2 and "event 1: account_id: Expected `int`, got `str`" in err
    code, result, _ = run_cli(capsys, "-c", config, "publish", "--partial", str(events))
    assert result["accepted"] == 1 and len(result["issues"]) == 1
    code, _, err = run_cli(capsys, "-c", str(tmp_path / "missing.json"), "stats")
    assert code == 2 and "settings file" in err and "cannot be read" in err


def test_demo_runs_on_embedded_redis_without_redis_url(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "actors.cli", "demo", "--events", "400"],
                          env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: embedded Redis at unix://" in proc.stdout
    assert "demo: ok" in proc.stdout
    assert "receiver /flaky: 2 request(s)" in proc.stdout  # one failure, one re-send


def test_run_twice_with_the_same_hooks_file_keeps_one_hook(config: str, tmp_path: Path,
                                                           settings: Settings) -> None:
    # Given a hooks file used by two consecutive runs of the main job
    hooks = tmp_path / "hooks.json"
    hooks.write_text(json.dumps([{"name": "crm", "account_id": 4, "actions": ["click"],
                                  "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}]))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    outputs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "actors.cli", "-c", config, "run", "--hooks", str(hooks),
             "--duration", "0.5", "--report-sec", "0.2"],
            env=env, capture_output=True, text=True, timeout=240,
            cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    # Then the second run updates the hook instead of creating a second one
    assert "hook 1 created from" in outputs[0]
    assert "hook 1 updated from" in outputs[1]
    assert "hookray: stopped" in outputs[1]
    from actors.driver import Engine

    engine = Engine.connect(settings)
    assert [h.name for h in engine.list_hooks(4)] == ["crm"]
    engine.redis.close()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--report-sec", "0", "must be > 0, got 0"),
    ("--duration", "-1", "must be >= 0, got -1"),
])
def test_run_rejects_bad_intervals(option: str, value: str, message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["run", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
