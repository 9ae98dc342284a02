"""``hookray run --hooks FILE`` restarted: the hooks a file created are recorded
(``{p}:hooks:from_file``), so a hook deleted since is not created again and one renamed
since is not created a second time. The functions ``cmd_run`` uses, on Engine.connect
and a real Redis, without Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from actors.cli import _check_run_hooks, _create_missing_hook, _stored_hooks
from actors.driver import Engine
from engine.catalogue import load_catalogue
from engine.errors import HookError
from engine.settings import Settings
from tests.integration.test_cli import run_cli

pytestmark = pytest.mark.integration

OLD_CRM = {"name": "old CRM", "active": True, "account_id": 1, "actions": ["click"],
           "target": {"http_batch": {"url": "https://old-crm.example.com/hook"}}}
CRM = {"name": "CRM clicks", "active": True, "account_id": 1, "actions": ["click"],
       "target": {"http_batch": {"url": "https://crm.example.com/hook"}}}


def job_start(settings: Settings, path: Path) -> None:
    """What cmd_run does with --hooks, minus Ray: the files checked, then each hook
    created unless it is there (or was) already."""
    listed = [(str(path), n, data) for n, data in enumerate(json.loads(path.read_text()))]
    stored, counts = _stored_hooks(settings)
    _check_run_hooks(load_catalogue(None), listed, settings.DESTINATION_DENY, stored, counts,
                     settings.MAX_HOOKS_PER_ACCOUNT)
    engine = Engine.connect(settings)
    try:
        for file, n, data in listed:
            _create_missing_hook(engine, data, file, n)
    finally:
        engine.redis.close()


def hooks_now(settings: Settings) -> list[tuple[int | None, str, str]]:
    engine = Engine.connect(settings)
    try:
        return [(h.id, h.name, h.target.http_batch.url)  # type: ignore[union-attr]
                for h in engine.list_hooks()]
    finally:
        engine.redis.close()


@pytest.fixture
def hooks_file(tmp_path: Path) -> Path:
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([OLD_CRM, CRM]))
    return path


def test_a_restarted_run_creates_no_hook_deleted_or_renamed_since(
        settings: Settings, hooks_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job_start(settings, hooks_file)
    assert hooks_now(settings) == [(1, "old CRM", "https://old-crm.example.com/hook"),
                                   (2, "CRM clicks", "https://crm.example.com/hook")]
    engine = Engine.connect(settings)
    engine.delete_hook(1)  # the old CRM is gone for good: its deliveries stop
    engine.update_hook(2, {**engine.get_hook(2).to_storage(), "name": "CRM clicks (prod)"})
    engine.redis.close()
    capsys.readouterr()
    job_start(settings, hooks_file)  # the job restarts with the same file
    out, err = capsys.readouterr()
    # neither the deleted hook comes back nor the renamed one is created twice (every
    # event it captures would be delivered twice, under two hook_message_ids)
    assert hooks_now(settings) == [(2, "CRM clicks (prod)", "https://crm.example.com/hook")]
    assert (f"hookray: hook 'old CRM' of account 1 from {hooks_file} was created as hook 1 "
            "and deleted since: not created again; remove it from the file, or delete its "
            "record (`hookray hooks forget-file-record 1 'old CRM'`) for the next run to "
            "create it") in err
    assert ("hookray: hook 2 ('CRM clicks (prod)', created as 'CRM clicks' from the file) "
            f"exists; left as it is (not taken from {hooks_file})") in out
    # a hook deleted since is not judged as a new one (its address denied since, say)
    assert (1, "old CRM") in _stored_hooks(settings)[0]


def test_forget_file_record_lets_the_next_run_create_a_deleted_hook_again(
        settings: Settings, config: str, hooks_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    job_start(settings, hooks_file)
    capsys.readouterr()
    code, records, _ = run_cli(capsys, "-c", config, "hooks", "file-records")
    assert code == 0 and records == [
        {"account_id": 1, "name": "CRM clicks", "hook_id": 2, "exists": True},
        {"account_id": 1, "name": "old CRM", "hook_id": 1, "exists": True}]
    # while the hook created exists, its record stays: a run would create a second one
    code, _, err = run_cli(capsys, "-c", config, "hooks", "forget-file-record", "1", "old CRM")
    assert code == 2 and "hook 1 (created as 'old CRM' of account 1 by a --hooks file) " \
        "still exists" in err, err
    code, _, err = run_cli(capsys, "-c", config, "hooks", "forget-file-record", "1", "nope")
    assert code == 2 and "no hook named 'nope' of account 1 was created by a --hooks " \
        "file" in err, err
    assert run_cli(capsys, "-c", config, "hooks", "delete", "1")[0] == 0
    code, records, _ = run_cli(capsys, "-c", config, "hooks", "file-records", "--account", "1")
    assert code == 0 and records[1] == {"account_id": 1, "name": "old CRM", "hook_id": 1,
                                        "exists": False}
    job_start(settings, hooks_file)
    assert [h[0] for h in hooks_now(settings)] == [2]  # not created again
    capsys.readouterr()
    code, out, err = run_cli(capsys, "-c", config, "hooks", "forget-file-record", "1",
                             "old CRM")
    assert code == 0 and out == {"forgotten": {"account_id": 1, "name": "old CRM"}}, err
    assert "the next `run --hooks` with that file creates the hook again" in err
    job_start(settings, hooks_file)  # created again, on purpose, and recorded
    assert hooks_now(settings) == [(2, "CRM clicks", "https://crm.example.com/hook"),
                                   (3, "old CRM", "https://old-crm.example.com/hook")]
    capsys.readouterr()
    assert run_cli(capsys, "-c", config, "hooks", "file-records")[1][1]["hook_id"] == 3


def test_hooks_stored_before_the_record_are_taken_as_the_files(
        settings: Settings, hooks_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hooks an earlier version's run created (no record) are found by name once, as
    before, and recorded: deleted afterwards, they stay deleted."""
    engine = Engine.connect(settings)
    engine.create_hook(OLD_CRM)
    engine.create_hook(CRM)
    job_start(settings, hooks_file)
    assert "hook 1 ('old CRM') exists; left as it is" in capsys.readouterr().out
    assert [h[0] for h in hooks_now(settings)] == [1, 2]
    engine.delete_hook(1)
    job_start(settings, hooks_file)
    assert [h[0] for h in hooks_now(settings)] == [2]
    engine.redis.close()


def test_two_runs_at_once_create_a_hook_once(
        settings: Settings, hooks_file: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run B comes to the hook while run A creates it (between A's look and A's
    create): B leaves it to A."""
    first, second = Engine.connect(settings), Engine.connect(settings)
    create = first.create_hook

    def create_while_the_other_runs(data: Any) -> Any:
        _create_missing_hook(second, data, "b.json", 0)
        return create(data)

    monkeypatch.setattr(first, "create_hook", create_while_the_other_runs)
    _create_missing_hook(first, CRM, "a.json", 0)
    out, err = capsys.readouterr()
    assert [h[0] for h in hooks_now(settings)] == [1]
    assert "hook 'CRM clicks' of account 1 from b.json is being created by another run" \
        in err
    assert "hook 1 created from a.json" in out
    first.redis.close()
    second.redis.close()


def test_a_claim_is_let_go_when_the_hook_is_refused_and_taken_over_when_stale(
        settings: Settings, redis_client: Any, keys: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    engine = Engine.connect(settings)
    with pytest.raises(HookError, match=r"^h\.json\[0\]: invalid hook"):
        _create_missing_hook(engine, {**CRM, "actions": ["nope"]}, "h.json", 0)
    assert redis_client.hlen(keys.hooks_from_file) == 0  # the next run tries again
    # a run that ended between its claim and its record: its claim is taken over
    field = json.dumps([1, "CRM clicks"])
    redis_client.hset(keys.hooks_from_file, field, "creating 0123abcd 1000")
    _create_missing_hook(engine, CRM, "h.json", 0)
    assert redis_client.hget(keys.hooks_from_file, field) == b"1"
    # one that ended after it created the hook: the hook is found by name, not made twice
    redis_client.hset(keys.hooks_from_file, field, "creating 0123abcd 1000")
    _create_missing_hook(engine, CRM, "h.json", 0)
    assert redis_client.hget(keys.hooks_from_file, field) == b"1"
    assert [h[0] for h in hooks_now(settings)] == [1]
    engine.redis.close()



def test_a_restart_says_what_a_file_edited_since_would_have_changed(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hook left as it is is not changed by its file: the run says which settings the
    file gives it otherwise (a stop, or a rename, made since is no difference worth a
    line), and when the file's no longer validate."""
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([CRM]))
    job_start(settings, path)
    engine = Engine.connect(settings)
    engine.stop_hook(1)
    engine.redis.close()
    capsys.readouterr()
    job_start(settings, path)  # the same file: nothing to say but that it exists
    assert "hookray: hook 1" not in capsys.readouterr().err
    path.write_text(json.dumps([{**CRM, "actions": ["click", "open"], "filters": {
        "campaigns": [7]}, "target": {"http_batch": {"url": "https://crm2.example.com/"}}}]))
    job_start(settings, path)
    assert (f"hookray: hook 1: {path} gives it other actions, filters, target than stored; "
            "the stored ones are left as they are (`hookray hooks update 1 FILE` changes "
            "them)") in capsys.readouterr().err
    path.write_text(json.dumps([{**CRM, "actions": ["clik"]}]))
    job_start(settings, path)
    err = capsys.readouterr().err
    assert f"hookray: hook 1: {path} gives it settings that no longer validate (" in err
    assert "clik" in err
    assert hooks_now(settings) == [(1, "CRM clicks", "https://crm.example.com/hook")]
