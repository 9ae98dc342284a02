"""The ``hookray`` command line. ``hookray COMMAND --help`` explains each command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import redis

from engine.errors import EventError, HookError, HookrayError
from engine.hooks import not_utf8
from engine.jsonkeys import NotAFile, read_whole, unique_keys
from engine.settings import load_settings, ray_address_problem, with_overrides
from engine.stores import check_new_hook, parse_cursor

# how the main job is stopped, said when it runs (deploy/job.py: `ray job stop`)
STOP_HINT = "Ctrl-C stops"


def _engine(args: argparse.Namespace) -> Any:
    from actors.driver import Engine

    return Engine.connect(load_settings(args.config))


def _no_engine_warning(engine: Any) -> None:
    """Warn, on stderr, when no engine has run with this Redis and REDIS_PREFIX: what
    is written then (events, hooks, tokens) waits for an engine of that prefix, and a
    prefix or database mistyped would leave it where none reads it."""
    try:
        started = engine.redis.hexists(engine.keys.config, "partitions")
    except redis.RedisError:
        return  # the command itself says what Redis answers
    if not started:
        print(f"hookray: warning: no engine has run with this Redis and REDIS_PREFIX "
              f"{engine.settings.REDIS_PREFIX!r} (REDIS_URL "
              f"{engine.settings.redacted()['REDIS_URL']})"
              f": what this writes waits for one; check REDIS_URL and REDIS_PREFIX if an "
              f"engine runs (`hookray health`)", file=sys.stderr)


def _print(data: Any) -> None:
    try:
        print(json.dumps(data, indent=2, default=str))
        sys.stdout.flush()  # a write that fails fails here, not at exit
    except BrokenPipeError:  # the reader went away: main() ends quietly
        raise
    except OSError as exc:  # a full disk, a closed stream: said, no traceback
        raise HookrayError(f"the output cannot be written ({exc.strerror or exc})") from None


MAX_FILE_BYTES = 1 << 30  # the largest file a command reads (it is read whole)


def _read_bytes(path: str) -> bytes:
    """A file's bytes (``-``: standard input's; ``./-`` names a file called so); a
    device (/dev/zero would be read until memory ran out) or a file over
    MAX_FILE_BYTES is refused, naming it. Pipes are read."""
    if path == "-":
        if sys.stdin is None:
            raise HookrayError("-: there is no standard input to read")
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise HookrayError(f"-: standard input holds more than {MAX_FILE_BYTES >> 30} "
                               "GiB; split it")
        return data
    try:
        return read_whole(path, MAX_FILE_BYTES, "; split it")
    except NotAFile as exc:
        raise HookrayError(f"{path}: {exc}") from None


def _read_json(path: str) -> Any:
    try:
        # utf-8-sig: a byte order mark some editors write is no content
        return json.loads(_read_bytes(path).decode("utf-8-sig"), object_pairs_hook=unique_keys)
    except OSError as exc:
        raise HookrayError(f"{path}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise HookrayError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise HookrayError(f"{path}: JSON nested too deeply to be read") from None


# --- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: start the engine from main.json and run until interrupted."""
    from actors import logs
    from actors.driver import Engine

    logs.configure()  # the driver's own lines (its claim on the prefix lost...) as the actors'

    settings = load_settings(args.config)
    if args.api_port is not None:
        settings = with_overrides(settings, {"API_PORT": args.api_port})
    if args.ray_address and (problem := ray_address_problem(args.ray_address)) is not None:
        raise HookrayError(f"--ray-address {args.ray_address!r}: {problem}")
    hooks = [(path, n, data) for path in args.hooks or []  # bad files: before anything
             for n, data in enumerate(_as_list(_read_json(path)))]  # starts
    if hooks:
        from engine.catalogue import load_catalogue

        stored, counts = _stored_hooks(settings)
        _check_run_hooks(load_catalogue(settings.EVENT_TYPES_FILE), hooks,
                         settings.DESTINATION_DENY, stored, counts,
                         settings.MAX_HOOKS_PER_ACCOUNT)
    shown = settings.redacted()
    if args.ray_address:  # the cluster joined, not the settings' (overridden)
        shown["RAY_ADDRESS"] = args.ray_address
    print(f"hookray: starting with {json.dumps(shown)}", flush=True)
    engine = Engine.start(settings, ray_address=args.ray_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if engine.api_url:
            print(f"hookray: HTTP API on {engine.api_url}", flush=True)
        for path, n, data in hooks:
            _create_missing_hook(engine, data, path, n)
        print(f"hookray: running ({settings.PARTITIONS} partitions); {STOP_HINT}", flush=True)
        _report_until(engine, stop, args.report_sec, args.duration)
    finally:
        engine.shutdown()
    print("hookray: stopped", flush=True)
    return 0


def _hook_problem(data: Any, catalogue: Any, registry: Any = None, deny: str = ""
                  ) -> str | None:
    """Why ``data`` (one hook of a file) cannot be created; None if it can. With the
    engine's ``registry``, as it would refuse it (an action the engine lacks, too);
    without, as an engine with DESTINATION_DENY ``deny`` would."""
    if not isinstance(data, dict):
        return "expected a JSON object"
    try:
        if registry is not None:
            registry.check_new(data)
        else:
            check_new_hook(data, catalogue, deny)
    except HookError as exc:
        return str(exc)
    return None


def _stored_hooks(settings: Any) -> tuple[set[tuple[Any, Any]], Counter[int]]:
    """(account, name) of every hook stored under the settings' prefix, as far as its
    record can be read, and of every hook a ``run --hooks`` file created (recorded in
    ``{p}:hooks:from_file``), deleted or renamed since or not: none is created again;
    and how many hooks each account has stored."""
    from actors.driver import Engine

    engine = Engine.connect(settings)
    try:
        hooks, invalid = engine.hooks.listing(None)
        return {(h.account_id, h.name) for h in hooks} | {
            (engine.hooks.owner(hook_id), engine.hooks.stored_name(hook_id))
            for hook_id, _ in invalid} | {
            (record["account_id"], record["name"]) for record in _file_records(engine)
            if record["hook_id"] is not None}, engine.hooks.counts()
    finally:
        engine.redis.close()


def _check_run_hooks(catalogue: Any, hooks: list[tuple[str, int, Any]], deny: str,
                     stored: Collection[tuple[Any, Any]] = (),
                     counts: Mapping[int, int] | None = None,
                     most: int | None = None) -> None:
    """The hooks of ``run --hooks`` files (path, index in the file, hook), checked
    before anything starts: each valid (its target no address DESTINATION_DENY ``deny``
    refuses), and one name per account (a hook is known by its account and name). One
    ``stored`` already (its account and name), or created by a file before (deleted
    since, it is not created again), is left as it is, not created: it is not judged by
    the rules of a new hook (a job restarted after a rule or the deny list changed).
    ``counts``: the hooks each account has stored, and ``most`` MAX_HOOKS_PER_ACCOUNT:
    an account the files' new hooks would take past it is refused too."""
    problems: list[str] = []
    seen: dict[tuple[Any, Any], str] = {}
    new: list[Any] = []
    for path, n, data in hooks:
        exists = isinstance(data, dict) and isinstance(data.get("account_id"), int) \
            and isinstance(data.get("name"), str) \
            and (data["account_id"], data["name"]) in stored
        problem = None if exists else _hook_problem(data, catalogue, deny=deny)
        if problem is not None:
            problems.append(f"{path}[{n}]: {problem}")
            continue
        key = (data.get("account_id"), data.get("name"))
        if key in seen:
            problems.append(f"{path}[{n}]: account {key[0]} has a hook named {key[1]!r} "
                            f"already in {seen[key]}")
        seen[key] = f"{path}[{n}]"
        if not exists:
            new.append(data)
    problems += _past_bound(new, counts, most, "in the files")
    if problems:
        raise HookError("--hooks: nothing started; " + "; ".join(problems))


def _past_bound(new: list[Any], counts: Mapping[int, int] | None, most: int | None,
                where: str) -> list[str]:
    """A line per account the ``new`` hooks would take past MAX_HOOKS_PER_ACCOUNT
    ``most``, its stored hooks ``counts`` with them."""
    if counts is None or most is None:
        return []
    adding = Counter(d.get("account_id") for d in new if isinstance(d, dict))
    return [f"account {account}: {counts.get(account, 0)} hook(s) stored and {n} new "
            f"{where}, more than MAX_HOOKS_PER_ACCOUNT ({most}) allows"
            for account, n in sorted(adding.items(), key=lambda an: str(an[0]))
            if counts.get(account, 0) + n > most]


# {p}:hooks:from_file: a file hook's identity (JSON [account_id, name]) -> the id of the
# hook a `run --hooks` file created for it, or "creating {token} {ms}" while a run
# creates it (HSET only when the field is absent, or its claim older than ARGV[3] ms:
# the run that claimed it ended before it was done). KEYS: the hash; ARGV: the field,
# the claim's token, that age (ms). Returns {"recorded", value}, {"busy", age in ms} or
# {"claimed", the claim written}.
_CLAIM_FILE_HOOK = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if v then
  local since = tonumber(string.match(v, '^creating %S+ (%d+)$') or '')
  if not since then return {'recorded', v} end
  if now - since < tonumber(ARGV[3]) then return {'busy', tostring(now - since)} end
end
local claim = 'creating ' .. ARGV[2] .. ' ' .. now
redis.call('HSET', KEYS[1], ARGV[1], claim)
return {'claimed', claim}
"""
# the claim ARGV[2] of field ARGV[1] replaced by the hook id ARGV[3] ('': the field
# deleted), only if the claim is still there; 1 if it was
_FINISH_FILE_HOOK = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""
FILE_CLAIM_STALE_MS = 60_000  # a claim this old is taken over (its run ended meanwhile)


def _file_field(account_id: int, name: str) -> str:
    """A file hook's field in ``{p}:hooks:from_file``: JSON (ASCII, so any name can be
    written; the account and the name cannot run into one another)."""
    return json.dumps([account_id, name])


def _file_records(engine: Any, account_id: int | None = None) -> list[dict[str, Any]]:
    """The hooks ``run --hooks`` files created (``{p}:hooks:from_file``), by account
    and name: ``hook_id`` None while a run creates it (or a damaged record),
    ``exists`` whether that hook is still stored."""
    raw = engine.redis.hgetall(engine.keys.hooks_from_file)
    records = []
    for field, value in raw.items():
        try:
            account, name = json.loads(field)
        except (ValueError, TypeError):
            continue  # no field of hookray's
        if account_id is not None and account != account_id:
            continue
        text = value.decode("utf-8", "replace")
        hook_id = int(text) if text.isascii() and text.isdigit() else None
        records.append({"account_id": account, "name": name, "hook_id": hook_id,
                        "exists": hook_id is not None and _recorded_hook_exists(
                            engine, hook_id, account)})
    return sorted(records, key=lambda r: (str(r["account_id"]).zfill(20), str(r["name"])))


def _recorded_hook_exists(engine: Any, hook_id: int, account_id: int) -> bool:
    """Whether the hook a file created as ``hook_id`` is still stored: that id of
    another account's (ids handed out again after ``{p}:hooks:seq`` was lost) is not."""
    if not engine.redis.hexists(engine.keys.hooks, str(hook_id)):
        return False
    return engine.hooks.owner(hook_id) in (None, account_id)


def _create_missing_hook(engine: Any, data: dict[str, Any], path: str, n: int) -> None:
    """Create the hook (``path``[``n``]) unless a file created it before, or its account
    has one of that name already: a restarted job neither duplicates its hooks nor
    undoes changes made to them since (stopped, updated or renamed through the API or
    ``hookray hooks update``, deleted). The hooks a file created are recorded by
    account and name in ``{p}:hooks:from_file``; one deleted since is named on stderr
    and not created (``hookray hooks forget-file-record`` lets the next run create it).
    The record is claimed before the hook is created, so that two runs at once create
    it once."""
    account, name = data["account_id"], data["name"]  # checked: an int and a str
    field = _file_field(account, name)
    key = engine.keys.hooks_from_file
    state, value = (v.decode("utf-8", "replace") for v in engine.redis.eval(
        _CLAIM_FILE_HOOK, 1, key, field, os.urandom(8).hex(), FILE_CLAIM_STALE_MS))
    where = _printable(path)
    if state == "busy":
        print(f"hookray: hook {name!r} of account {account} from {where} is being created "
              f"by another run (claimed {int(value) / 1000:.0f} s ago); left to it (if that "
              f"run ended, the next run after {FILE_CLAIM_STALE_MS // 1000} s creates it)",
              file=sys.stderr, flush=True)
        return
    if state == "recorded":
        _recorded_file_hook(engine, data, where, value)
        return
    try:  # claimed: one of that name is taken as the file's (before the record, or
        # created by a run that ended before it recorded it), or the hook is created
        same = _same_named(engine, data)
        if same:
            print(f"hookray: hook {same[0][0]} ({same[0][1]!r}) exists; left as it is "
                  f"(not taken from {where})", flush=True)
            hook_id = same[0][0]
            _say_differs(engine, data, hook_id, where)
        else:
            try:  # checked before the engine started; an engine of other settings may
                created = engine.create_hook(data)  # refuse it
            except HookError as exc:
                raise HookError(f"{where}[{n}]: {exc}", exc.issues) from None
            print(f"hookray: hook {created.id} created from {where}", flush=True)
            hook_id = created.id
    except BaseException:  # the claim let go: the next run tries again
        with contextlib.suppress(redis.RedisError):
            engine.redis.eval(_FINISH_FILE_HOOK, 1, key, field, value, "")
        raise
    if not engine.redis.eval(_FINISH_FILE_HOOK, 1, key, field, value, str(hook_id)):
        print(f"hookray: hook {hook_id} of {where}: its record was taken over by another "
              f"run meanwhile; see `hookray hooks list --account {account}` for a second "
              f"hook named {name!r}", file=sys.stderr, flush=True)


def _recorded_file_hook(engine: Any, data: dict[str, Any], where: str, value: str) -> None:
    """A file's hook that a file created before, as hook ``value``: left as it is
    whatever it is now, and not created again when it was deleted since (said on
    stderr, with what to do)."""
    account, name = data["account_id"], data["name"]  # checked: an int and a str
    forget = f"hookray hooks forget-file-record {account} {shlex.quote(str(name))}"
    if not (value.isascii() and value.isdigit()):
        print(f"hookray: hook {name!r} of account {account} from {where}: its record in "
              f"{engine.keys.hooks_from_file} holds {value[:40]!r}, no hook id (damaged): "
              f"not created; delete the record (`{_printable(forget)}`) for the next run "
              "to create it", file=sys.stderr, flush=True)
        return
    hook_id = int(value)
    if not _recorded_hook_exists(engine, hook_id, account):
        print(f"hookray: hook {name!r} of account {account} from {where} was created as "
              f"hook {hook_id} and deleted since: not created again; remove it from the "
              f"file, or delete its record (`{_printable(forget)}`) for the next run to "
              "create it", file=sys.stderr, flush=True)
        return
    now = engine.hooks.stored_name(hook_id)  # None: its record cannot be read
    shown = "its record unreadable" if now is None else repr(now)
    renamed = f", created as {name!r} from the file" if now not in (None, name) else ""
    print(f"hookray: hook {hook_id} ({shown}{renamed}) exists; left as it is (not taken "
          f"from {where})", flush=True)
    _say_differs(engine, data, hook_id, where)


# what a file's hook and the stored one it stands for may differ in unsaid: the id (the
# store's), whether it is active (stopped or activated since) and its name (renamed)
_FILE_HOOK_KEPT = frozenset({"id", "active", "name"})


def _say_differs(engine: Any, data: dict[str, Any], hook_id: int, where: str) -> None:
    """Say on stderr which settings of the file's hook differ from those of the stored
    hook ``hook_id`` that is left as it is (a file edited since changes no stored hook),
    or that the file's no longer validates. Nothing when they agree, or when the
    stored one cannot be read (said where it is loaded)."""
    try:
        stored = engine.hooks.get(hook_id).to_storage()
    except (HookrayError, redis.RedisError):
        return
    try:
        given = check_new_hook(data, engine.catalogue).to_storage()
    except HookError as exc:
        print(f"hookray: hook {hook_id}: {where} gives it settings that no longer validate "
              f"({exc}); the stored ones are left as they are", file=sys.stderr, flush=True)
        return
    differ = sorted(k for k in stored.keys() | given.keys()
                    if k not in _FILE_HOOK_KEPT and stored.get(k) != given.get(k))
    if differ:
        print(f"hookray: hook {hook_id}: {where} gives it other {', '.join(differ)} than "
              f"stored; the stored ones are left as they are (`hookray hooks update "
              f"{hook_id} FILE` changes them)", file=sys.stderr, flush=True)


def _same_named(engine: Any, data: dict[str, Any]) -> list[tuple[int, str | None]]:
    """(id, name) of the account's stored hooks named as ``data``: those that validate,
    then those that no longer do (by id)."""
    # one of the account's stored hooks that no longer validates (its record damaged,
    # EVENT_TYPES_FILE changed) is named, and stops nothing; one of the same name (as
    # far as its record can be read) exists all the same: a second would send every
    # message twice once the first is valid again
    hooks, invalid = engine.hooks.listing(data.get("account_id"))
    for hook_id, problem in invalid:
        print(f"hookray: hook {hook_id} of account {data.get('account_id')}: {problem}; "
              "its partitions wait until it is deleted or valid again", flush=True)
    return [(h.id, h.name) for h in hooks if h.name == data.get("name")] + [
        (hook_id, name) for hook_id, _ in invalid
        if (name := engine.hooks.stored_name(hook_id)) == data.get("name")]


def _report_until(engine: Any, stop: threading.Event, report_sec: float, duration: float
                  ) -> None:
    from engine.health import eviction_risk

    started = time.monotonic()
    seen: set[int] = set()  # every hook stored during the run: one deleted still counts
    # what health said last, and when: the same problems again once a minute at most
    said: tuple[list[str], float] = ([], -HEALTH_REPEAT_SEC)
    while True:
        wait = report_sec
        if duration:
            wait = min(wait, max(started + duration - time.monotonic(), 0))
        done = stop.wait(wait) or bool(duration and time.monotonic() - started >= duration)
        try:  # a progress line every report_sec, and a last one on the way out
            seen.update(engine.hooks.stored_ids())
            print(f"hookray: {time.monotonic() - started:.0f}s {json.dumps(engine.totals(seen))} "
                  f"backlog={engine.backlog()} retry={engine.retry.pending()}", flush=True)
            # the job runs on while a worker waits or stopped (a hook that no longer
            # validates, an actor that cannot start again): said here, not only by
            # `hookray health`; when it changes, and once a minute while it lasts
            problems = _health_problems(engine.health(), engine.settings.REDIS_PREFIX,
                                        engine.redis)
            # a policy set after the start (its warning) drops work as silently
            problems += [risk] if (risk := eviction_risk(engine.redis)) is not None else []
            if problems and (problems != said[0]
                             or time.monotonic() - said[1] >= HEALTH_REPEAT_SEC):
                for problem in problems:
                    print(f"hookray: health: {problem}", flush=True)
                said = (problems, time.monotonic())
            elif not problems and said[0]:
                print("hookray: health: every worker runs again", flush=True)
                said = ([], -HEALTH_REPEAT_SEC)
        except redis.RedisError as exc:
            print(f"hookray: progress unavailable: Redis: {exc}", flush=True)
        except HookrayError as exc:  # the progress line must never end the job
            print(f"hookray: progress unavailable: {exc}", flush=True)
        if done:
            return


HEALTH_REPEAT_SEC = 60.0  # the same health problems said again in the progress after
MAX_SECONDS = 10 * 365 * 86_400  # a bound any wait here can take (threading's is lower)


def _seconds(text: str, least: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value > MAX_SECONDS or value < least \
            or (strict and value == least):
        bound = f"> {least:g}" if strict else f">= {least:g}"
        raise argparse.ArgumentTypeError(f"must be a number {bound} and <= {MAX_SECONDS}, "
                                         f"got {text}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: seconds > 0 (also deploy/job.py's options)."""
    return _seconds(text, 0, strict=True)


def non_negative_seconds(text: str) -> float:
    """argparse type: seconds >= 0 (also deploy/job.py's options)."""
    return _seconds(text, 0, strict=False)


def _port(text: str) -> int:
    try:
        value = _whole(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {text}")
    return value


def _as_list(data: Any) -> list[Any]:
    return data if isinstance(data, list) else [data]


def cmd_demo(args: argparse.Namespace) -> int:
    from actors.demo import run_demo

    return run_demo(events=args.events, config=args.config)


def cmd_hooks(args: argparse.Namespace) -> int:
    engine = _engine(args)
    action = args.action
    if action == "list":
        # the hooks that validate; one that no longer does is named on stderr, as the
        # API lists it apart, not hiding the others
        hooks, invalid = engine.hooks.listing(args.account)
        _print([h.display() for h in hooks])
        for hook_id, problem in invalid:
            print(f"hookray: hook {hook_id}: {problem}; delete it (`hookray hooks delete "
                  f"{hook_id}`) and create it again", file=sys.stderr)
    elif action == "get":
        _print(engine.get_hook(args.id).display())
    elif action == "create":
        hooks = _as_list(_read_json(args.file))
        _check_hooks(engine, hooks, args.file)  # all or none: nothing half-created
        _print([engine.create_hook(d).display() for d in hooks])
        _no_engine_warning(engine)
    elif action == "update":
        data = _read_json(args.file)
        if not isinstance(data, dict):
            raise HookrayError(f"{args.file}: expected a JSON object (one hook)")
        _print(engine.update_hook(args.id, data).display())
    elif action in ("activate", "stop"):
        fn: Callable[[int], Any] = getattr(engine, f"{action}_hook")
        _print(fn(args.id).display())
    elif action == "clone":
        _print(engine.clone_hook(args.id, args.name).display())
    elif action == "delete":
        engine.delete_hook(args.id)
        _print({"deleted": args.id})
    elif action in ("file-records", "forget-file-record"):
        _file_record_command(engine, args)
    elif action == "test":
        with _client_logs_muted():  # the outcome says why a send failed, once
            outcome = engine.test_event(args.id, args.event_type)
        _print({"delivered": outcome.ok, "status": outcome.status, "detail": outcome.detail,
                "error": outcome.error})
        return 0 if outcome.ok else 1
    return 0


def _file_record_command(engine: Any, args: argparse.Namespace) -> None:
    if args.action == "file-records":
        _print(_file_records(engine, args.account))
    else:
        _forget_file_record(engine, args.account, args.file_name)


def _forget_file_record(engine: Any, account_id: int, name: str) -> None:
    """Delete the record that a ``run --hooks`` file created the account's hook ``name``:
    the next run with that file creates it again. Refused while the hook recorded is
    stored (renamed, say): the next run would create a second one, sending every
    message twice."""
    field = _file_field(account_id, name)
    raw = engine.redis.hget(engine.keys.hooks_from_file, field)
    if raw is None:
        raise HookrayError(f"forget-file-record: no hook named {name!r} of account "
                           f"{account_id} was created by a --hooks file (see `hookray "
                           "hooks file-records`)")
    text = raw.decode("utf-8", "replace")
    if text.isascii() and text.isdigit() and _recorded_hook_exists(engine, int(text),
                                                                   account_id):
        raise HookrayError(f"forget-file-record: hook {text} (created as {name!r} of account "
                           f"{account_id} by a --hooks file) still exists: the next run "
                           "would create a second one; delete it first (`hookray hooks "
                           f"delete {text}`)")
    # only the value read: a run that recorded the hook again meanwhile keeps its record
    if not engine.redis.eval(_FINISH_FILE_HOOK, 1, engine.keys.hooks_from_file, field,
                             raw, ""):
        raise HookrayError("forget-file-record: the record changed meanwhile (a run "
                           "recorded the hook again); see `hookray hooks file-records`")
    _print({"forgotten": {"account_id": account_id, "name": name}})
    print("hookray: the next `run --hooks` with that file creates the hook again",
          file=sys.stderr)


@contextlib.contextmanager
def _client_logs_muted() -> Iterator[None]:
    """No log lines of the transports' client libraries (aiormq logs "error when
    creating transport: ..." itself) on stderr: without a handler of the process's
    own, Python prints them, ahead of the outcome that gives the same reason."""
    quiet = logging.NullHandler()
    logging.getLogger().addHandler(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(quiet)


def _check_hooks(engine: Any, hooks: list[Any], path: str) -> None:
    """Every hook of a file validated before any is created; the bad ones by index."""
    problems = [f"[{n}]: {problem}" for n, data in enumerate(hooks)
                if (problem := _hook_problem(data, engine.catalogue, engine.hooks)) is not None]
    if not problems:
        problems = _past_bound(hooks, engine.hooks.counts(), engine.hooks.max_per_account,
                               "in the file")
    if problems:
        raise HookError(f"{path}: nothing created; " + "; ".join(problems))


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = _read_bytes(args.file)
    except OSError as exc:
        raise HookrayError(f"{args.file}: cannot be read ({exc.strerror})") from None
    if not data.strip():  # a wrong file, likely (POST /v1/events takes it as no events)
        raise HookrayError(f"{args.file}: holds no events (the file is empty or blank)")
    engine = _engine(args)
    try:
        result = engine.publish(data, partial=args.partial)
    except EventError as exc:  # bad events, nothing accepted: every one listed too
        _print(_published(0, exc.issues))
        raise
    _print(_published(result.accepted, result.issues))
    if result.accepted:
        _no_engine_warning(engine)
    if result.issues and not result.accepted:
        print(f"hookray: error: no event accepted ({len(result.issues)} bad)",
              file=sys.stderr)
        return 2
    if result.issues:  # --partial: some accepted (as the API's 207, not its 202)
        bad = len({issue.index for issue in result.issues})
        print(f"hookray: {result.accepted} event(s) accepted, {bad} bad left out",
              file=sys.stderr)
        return 1
    return 0


def _published(accepted: int, issues: list[Any]) -> dict[str, Any]:
    """What publish prints, as POST /v1/events answers: the events accepted, the bad
    ones (events, not issues: one may have several) and an issue per bad field."""
    return {"accepted": accepted, "rejected": len({i.index for i in issues}),
            "issues": [{"index": i.index, "field": i.field, "reason": i.reason}
                       for i in issues]}


def cmd_stats(args: argparse.Namespace) -> int:
    engine = _engine(args)
    _print(engine.stats(args.hook))
    return 0


def _set_aside_usage(args: argparse.Namespace) -> None:
    if args.requeue and args.discard:
        raise HookrayError("set-aside: either --requeue or --discard")
    if args.ids and not (args.requeue or args.discard):
        raise HookrayError("set-aside: ids go with --requeue or --discard")
    if args.discard and not args.ids:
        raise HookrayError("set-aside: --discard takes the ids of the entries to delete")
    if (args.requeue or args.discard) and (args.after is not None or args.limit is not None):
        raise HookrayError("set-aside: --limit and --after page the list; --requeue "
                           "and --discard take ids")


# what `set-aside` reaches (the intake entries the partitions set aside) and, with
# --retries, the re-sends the retry worker set aside: the driver calls (list, requeue,
# discard) and the command's name
_SET_ASIDE = {
    False: ("set_aside", "requeue_set_aside", "discard_set_aside", "set-aside"),
    True: ("set_aside_retries", "requeue_set_aside_retries", "discard_set_aside_retries",
           "set-aside --retries"),
}


def cmd_set_aside(args: argparse.Namespace) -> int:
    """List the intake entries the partitions set aside, put them back (--requeue), or
    delete them for good (--discard IDS). With --retries: the re-sends the retry worker
    set aside, their stored payload undecodable (damaged, or written by another
    hookray version); --requeue puts those this version decodes back into the retry
    schedule."""
    engine = _engine(args)
    listed, requeue, discard, command = _SET_ASIDE[bool(args.retries)]
    _set_aside_usage(args)
    try:
        if args.discard:
            _print({"discarded": getattr(engine, discard)(args.ids)})
        elif args.requeue:
            _print({"requeued": getattr(engine, requeue)(args.ids or None)})
        else:
            limit = args.limit or 100
            page = getattr(engine, listed)(limit, args.after)
            _print(page)
            if len(page) == limit:  # as dead-letters says it
                print(f"hookray: there may be more: --after {page[-1]['id']}",
                      file=sys.stderr)
    except ValueError as exc:  # an id that is none, or not of a set-aside entry
        said = str(exc)  # named as the command, not as the driver call behind it
        for call in (requeue, discard, listed):
            said = said.removeprefix(f"{call}: ")
        raise HookrayError(f"{command}: {said}") from None
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Print which of the engine's workers run (as GET /v1/health); exit 1 when one of
    them is stopped or waits (see its reason), no engine ever started here, or Redis
    may evict keys on its own (its maxmemory-policy); 2 (an error) when Redis cannot be
    read."""
    from engine.health import eviction_policy, eviction_risk

    engine = _engine(args)
    health = engine.health()
    full = _full_if_stopped(health, engine.redis)
    _print({"status": "ok", **health, "redis_eviction": eviction_policy(engine.redis),
            "redis_full": full is not None})
    problems = [full] if full is not None else []
    problems += _health_problems(health, engine.settings.REDIS_PREFIX)
    problems += [risk] if (risk := eviction_risk(engine.redis)) is not None else []
    for problem in problems:
        print(f"hookray: health: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _full_if_stopped(health: dict[str, Any], r: Any) -> str | None:
    """What to say of a Redis at its maxmemory, asked as the API asks it: only when a
    worker of an engine that ran seems stopped (Redis refuses the marks of workers
    that may well run)."""
    from engine.health import redis_full

    parts = health["partitions"]
    if parts["expected"] is None or not (parts["stopped"] or not health["retry_running"]):
        return None
    return redis_full(r)


def _health_problems(health: dict[str, Any], prefix: str, r: Any = None) -> list[str]:
    """Why ``health`` (Engine.health) is not every worker running, one line each;
    ``r``: the engine's Redis, asked whether it is full when a worker seems stopped."""
    from engine.health import ALIVE_SEC

    parts = health["partitions"]
    if parts["expected"] is None:
        return [f"no engine has started with this Redis and REDIS_PREFIX {prefix!r}"]
    problems = []
    if r is not None and (full := _full_if_stopped(health, r)) is not None:
        problems.append(full)
    if parts["stopped"]:
        problems.append(f"partition(s) {', '.join(map(str, parts['stopped']))} of "
                        f"{parts['expected']} ran no round in the last {ALIVE_SEC} s")
    problems += [f"partition {w['partition']} waits: {w['reason']}" for w in parts["waiting"]]
    if not health["retry_running"]:
        problems.append(f"the retry worker ran no round in the last {ALIVE_SEC} s")
    if health["retry_waiting"] is not None:
        problems.append(f"the retry worker waits: {health['retry_waiting']}")
    return problems


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if args.after is not None:
        try:
            parse_cursor(args.after)
        except ValueError as exc:
            raise HookrayError(f"--after: {exc}") from None
    letters = _engine(args).dead_letters(args.account, args.hook, args.limit, args.after)
    _print([vars(d) for d in letters])
    if len(letters) == args.limit:
        print(f"hookray: there may be more: --after {letters[-1].cursor}", file=sys.stderr)
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from engine.auth import TokenStore

    engine = _engine(args)
    tokens = TokenStore(engine.redis, engine.settings.REDIS_PREFIX)
    if args.action == "create":
        try:
            token, info = tokens.create(args.account, args.role, args.name)
        except ValueError as exc:
            raise HookrayError(str(exc)) from None
        try:  # written out, or taken back: a token no one was shown is no one's
            if sys.stdout is None:
                raise OSError("no standard output")
            _print({**info.public(), "token": token})
            sys.stdout.flush()
        except (OSError, HookrayError) as exc:
            tokens.revoke(info.id)
            raise HookrayError(f"tokens create: the token could not be written out "
                               f"({exc}); it was revoked, nothing is left") from None
        print("hookray: the token is shown once; store it now", file=sys.stderr)
        _no_engine_warning(engine)
    elif args.action == "list":
        _print([i.public() for i in tokens.list(args.account)])
    elif args.action == "revoke":
        # given the token itself, only its id is shown
        _print({"revoked": tokens.revoke(args.token_id)})
    return 0


def _whole(text: str) -> int:
    """``text`` as a whole number written in ASCII digits (an optional leading ``-``):
    int() would also read "1_0" as 10, " +5 " as 5 and other scripts' digits, so a
    typo could name another hook. ValueError otherwise."""
    if re.fullmatch(r"-?[0-9]+", text) is None:
        raise ValueError(text)
    return int(text)


def _id_number(text: str) -> int:
    """An id argument (a hook's, an account's): an integer from 0 to MAX_ID, else the
    command is refused before anything runs (a negative or huge id names nothing)."""
    from engine.events import MAX_ID

    try:
        value = _whole(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: expected an id, an integer from 0 to {MAX_ID}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = _whole(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


DEMO_EVENTS = (100, 1_000_000)  # the demo's --events bounds


def _demo_events(text: str) -> int:
    try:
        value = _whole(text)
    except ValueError:
        value = -1
    if not DEMO_EVENTS[0] <= value <= DEMO_EVENTS[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an integer from {DEMO_EVENTS[0]:,} to {DEMO_EVENTS[1]:,}")
    return value


def _progress(verb: str) -> Callable[[int], None]:
    """Progress on stderr for a long replay or discard: a line per 10,000."""
    said = [0]

    def say(n: int) -> None:
        if n >= said[0] + 10_000:
            print(f"hookray: {n:,} dead letter(s) {verb} so far", file=sys.stderr, flush=True)
            said[0] = n
    return say


def _scope(args: argparse.Namespace, what: str) -> None:
    if args.ids and (args.hook is not None or args.account is not None):
        raise HookrayError(f"{what}: --hook and --account select all of a hook's or an "
                           "account's dead letters; not with ids")


def cmd_replay(args: argparse.Namespace) -> int:
    _scope(args, "replay")
    if args.ids and args.all:
        raise HookrayError("replay: give dead letter ids, or --all; not both")
    if not (args.ids or args.all or args.hook is not None or args.account is not None):
        # an empty $(...) of ids would otherwise replay every account's dead letters
        raise HookrayError("replay: give dead letter ids, --hook or --account (all of a "
                           "hook's or an account's), or --all (every dead letter)")
    n = _engine(args).replay(args.ids or None, hook_id=args.hook, account_id=args.account,
                             progress=_progress("replayed"))
    _print({"replayed": n})  # as POST .../replay answers
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    _scope(args, "discard")
    if bool(args.ids) == args.all:
        raise HookrayError("discard: give dead letter ids, or --all (with --hook or "
                           "--account to narrow it)")
    engine = _engine(args)
    if args.ids:
        n = engine.discard(args.ids)
    else:
        n = engine.discard(everything=True, hook_id=args.hook, account_id=args.account,
                           progress=_progress("discarded"))
    _print({"discarded": n})  # as POST .../discard answers
    return 0


# --- parser ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hookray", description="Action-hook dispatch engine on Ray.")
    p.add_argument("--config", "-c", metavar="MAIN_JSON",
                   default=os.environ.get("HOOKRAY_CONFIG") or None,
                   help="settings file (main.json; default: $HOOKRAY_CONFIG); environment "
                   "variables override it")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the engine (the main job)", description=cmd_run.__doc__)
    run.add_argument("--hooks", nargs="+", metavar="FILE",
                     help="hook JSON files: each hook is created unless its account has a "
                     "hook of that name already, or a file created it before (deleted or "
                     "renamed since: see `hooks file-records`)")
    run.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS of "
                     "the settings or the environment; unset, a local Ray)")
    run.add_argument("--report-sec", type=positive_seconds, default=10.0,
                     help="seconds between progress lines (default: 10)")
    run.add_argument("--duration", type=non_negative_seconds, default=0.0,
                     help="stop after N seconds (0: never)")
    run.add_argument("--api-port", type=_port, metavar="PORT",
                     help="serve the HTTP API on PORT (0: any free port; default: API_PORT)")
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser("demo", help="everything local on embedded defaults",
                          description="Local Ray, an embedded Redis when REDIS_URL is unset, a "
                          "local HTTP receiver, sample hooks and events; prints what each "
                          "receiver got and the stats.")
    demo.add_argument("--events", type=_demo_events, default=2_000,
                      help=f"sample events to publish ({DEMO_EVENTS[0]:,} to "
                           f"{DEMO_EVENTS[1]:,}; fewer leave a sample hook without any; "
                           "default: 2,000)")
    demo.set_defaults(fn=cmd_demo)

    hooks = sub.add_parser("hooks", help="manage hooks", description="Manage hooks.")
    hsub = hooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    hsub.add_parser("list", help="list hooks").add_argument(
        "--account", type=_id_number, help="only this account's hooks")
    for name, text in (("get", "show a hook"), ("activate", "activate a hook"),
                       ("stop", "stop a hook"), ("clone", "clone a hook (stopped)"),
                       ("delete", "delete a hook")):
        action_parser = hsub.add_parser(name, help=text, description=text)
        action_parser.add_argument("id", type=_id_number, help="the hook's id")
        if name == "clone":
            action_parser.add_argument("--name", help="the clone's name (default: the "
                                       "hook's name + ' (copy)')")
    hsub.add_parser("create", help="create hooks from a JSON file (object or array)",
                    description="Create hooks from a JSON file (an object or an array), "
                    "all or none: every hook is checked before the first is created."
                    ).add_argument("file", help="JSON file of hook settings (-: standard input)")
    hsub.add_parser("file-records", help="the hooks `run --hooks` files created",
                    description="The hooks `run --hooks` files created, by account and "
                    "name (a file's hook is known by them): the id of the hook created, "
                    "and whether it still exists. A run never creates a recorded hook "
                    "again, deleted or renamed since."
                    ).add_argument("--account", type=_id_number, help="only this account's")
    forget = hsub.add_parser(
        "forget-file-record", help="let `run --hooks` create a deleted file hook again",
        description="Delete the record that a `run --hooks` file created the account's "
        "hook NAME (deleted since): the next run with that file creates it again. "
        "Refused while the hook created still exists.")
    forget.add_argument("account", type=_id_number, help="the hook's account id")
    # a dest of its own: --name (clone, tokens create) names another argument
    forget.add_argument("file_name", metavar="NAME", help="the hook's name in the file")
    upd = hsub.add_parser("update", help="replace a hook's settings from a JSON file")
    upd.add_argument("id", type=_id_number, help="the hook's id")
    upd.add_argument("file", help="JSON file of the hook's settings (-: standard input; "
                     "redacted secrets keep the stored ones for the same destination)")
    test = hsub.add_parser("test", help="send one test event through a hook's target")
    test.add_argument("id", type=_id_number, help="the hook's id")
    test.add_argument("event_type", help="an event code, e.g. click")
    hooks.set_defaults(fn=cmd_hooks)

    pub = sub.add_parser("publish", help="publish events from a file (JSON array or NDJSON)")
    pub.add_argument("file", help="events: a JSON array or NDJSON (-: standard input)")
    pub.add_argument("--partial", action="store_true",
                     help="accept the good events even when some are bad (exit 1 when "
                          "some were left out, 2 when none was accepted)")
    pub.set_defaults(fn=cmd_publish)

    stats = sub.add_parser("stats", help="per-hook counters")
    stats.add_argument("--hook", type=_id_number, help="only this hook's counters")
    stats.set_defaults(fn=cmd_stats)

    health = sub.add_parser("health", help="which workers run (exit 1: not all of them)",
                            description=cmd_health.__doc__)
    health.set_defaults(fn=cmd_health)

    dead = sub.add_parser("dead-letters", help="list dead letters")
    dead.add_argument("--hook", type=_id_number, help="only this hook's dead letters")
    dead.add_argument("--account", type=_id_number, help="only this account's dead letters")
    dead.add_argument("--limit", type=_at_least_one, default=100,
                      help="at most this many (default 100)")
    dead.add_argument("--after", metavar="CURSOR",
                      help="the next ones: after the dead letter of this cursor")
    dead.set_defaults(fn=cmd_dead_letters)

    aside = sub.add_parser("set-aside", help="intake entries set aside; --requeue puts "
                           "them back, --discard deletes them",
                           description=cmd_set_aside.__doc__)
    aside.add_argument("ids", nargs="*", help="with --requeue: these entries (default: "
                       "every one that can be decoded); with --discard: these entries")
    aside.add_argument("--requeue", action="store_true",
                       help="put entries back into the intake, to be processed again")
    aside.add_argument("--discard", action="store_true",
                       help="delete the given entries for good (counted as "
                       "entries_discarded)")
    aside.add_argument("--limit", type=_at_least_one, default=None,
                       help="at most this many (default 100)")
    aside.add_argument("--after", metavar="ID", help="the next ones: after this entry")
    aside.add_argument("--retries", action="store_true",
                       help="the re-sends set aside (their stored payload undecodable) "
                       "instead of intake entries; --requeue puts them back into the "
                       "retry schedule")
    aside.set_defaults(fn=cmd_set_aside)

    tokens = sub.add_parser("tokens", help="manage HTTP API tokens",
                            description="Manage HTTP API tokens (stored hashed).")
    tsub = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    tcreate = tsub.add_parser("create", help="create a token (printed once)")
    tcreate.add_argument("--account", type=_id_number, required=True, help="account id")
    tcreate.add_argument("--role", choices=["master", "ingest"], required=True,
                         help="master: everything of the account; ingest: publish only")
    tcreate.add_argument("--name", default="", help="a label for the token")
    tsub.add_parser("list", help="list tokens (never their secrets)").add_argument(
        "--account", type=_id_number, help="only this account's tokens")
    tsub.add_parser("revoke", help="revoke a token at once").add_argument(
        "token_id", help="the token's id, or the token itself")
    tokens.set_defaults(fn=cmd_tokens)

    replay = sub.add_parser("replay", help="send dead letters again",
                            description="Send dead letters again: the given ids, all of "
                            "--hook's or --account's, or --all.")
    _dead_letters_chosen(replay, "only this hook's dead letters",
                         "only this account's dead letters")
    replay.set_defaults(fn=cmd_replay)

    discard = sub.add_parser("discard", help="delete dead letters for good",
                             description="Delete dead letters for good (counted as "
                             "'discarded' in their hooks' stats): the given ids, or --all.")
    _dead_letters_chosen(discard, "with --all: only this hook's",
                         "with --all: only this account's")
    discard.set_defaults(fn=cmd_discard)
    _config_after_the_command(p)
    return p


def _config_after_the_command(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``-c`` also after the command (``hookray stats -c main.json``, ``hookray hooks -c
    main.json list``): there it was refused as "unrecognized arguments: -c" or taken
    for the action, an option hookray does know. Given in several places, the last one
    counts. Each command's parser is its arguments' ``command_parser``: an unknown
    option is refused with that command's usage (main)."""
    if not top:
        parser.add_argument("--config", "-c", metavar="MAIN_JSON", default=argparse.SUPPRESS,
                            help="settings file, as `hookray -c MAIN_JSON ...`")
        parser.set_defaults(command_parser=parser)  # the innermost command's wins
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(c): c for c in action.choices.values()}.values():
                _config_after_the_command(child, top=False)


# arguments that name files: a file name may hold any bytes, which Python hands on
# as they came (os.fsencode); the text of every other argument goes to Redis, JSON or
# Ray, as UTF-8
FILE_ARGUMENTS = frozenset({"config", "file", "hooks"})


def _dead_letters_chosen(command: argparse.ArgumentParser, hook: str, account: str) -> None:
    """The dead letters replay and discard act on: ids, or --all (of --hook, --account)."""
    command.add_argument("ids", nargs="*", help="dead letter ids")
    command.add_argument("--all", action="store_true",
                         help="every dead letter (of --hook, of --account)")
    command.add_argument("--hook", type=_id_number, help=hook)
    command.add_argument("--account", type=_id_number, help=account)


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's name as --help shows it (``--name``, ``token_id``), by dest,
    over every command."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                names.update(_argument_names(child))
        elif action.option_strings:
            names.setdefault(action.dest, max(action.option_strings, key=len))
        else:
            names.setdefault(action.dest, action.metavar if isinstance(action.metavar, str)
                             else action.dest)
    return names


def _not_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The name of the first argument (not a file name) whose text cannot be encoded
    as UTF-8, or None. Bytes that are not UTF-8 on the command line reach Python as
    lone surrogates ($'\\xff' is "\\udcff"), which fail where the text is sent on."""
    for dest, value in vars(args).items():
        if dest in FILE_ARGUMENTS:
            continue
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not_utf8(text) is not None:
                return _argument_names(parser).get(dest, dest)
    return None


def _printable(text: str) -> str:
    """``text`` (a file name, a message quoting one) for any stdout or stderr: bytes
    of a file name that are not UTF-8 as ``\\xff``, not the lone surrogates Python
    holds them as, which a stream of strict UTF-8 refuses."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name holds (main() given it)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _redis_hint(args: argparse.Namespace, exc: redis.RedisError) -> str:
    """Which REDIS_URL failed to connect, or answered as no Redis does (password
    masked), and what is likely wrong; "" for other errors."""
    db_index = isinstance(exc, redis.ResponseError) and "DB index" in str(exc)
    if not (db_index or isinstance(exc, redis.ConnectionError | redis.TimeoutError
                                   | redis.exceptions.InvalidResponse)):
        return ""
    try:
        url = load_settings(getattr(args, "config", None)).redacted()["REDIS_URL"]
    except Exception:  # the error itself is what counts
        return ""
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return (f" (REDIS_URL {url} answers, but not as Redis does: is it another server's "
                "port? A Ray head's GCS listens on 6379 too unless started with --port)")
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError) \
            or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return f" (REDIS_URL {url}: Redis refused its user or password)"
    if db_index:
        return f" (REDIS_URL {url}: that Redis has fewer databases than the one named)"
    if url.startswith("rediss://") and isinstance(exc, redis.TimeoutError
                                                  | redis.ConnectionError):
        return (f" (REDIS_URL {url}: is Redis running and reachable there, and does it "
                "speak TLS on that port? rediss:// to a plain Redis waits for a TLS "
                "answer that never comes)")
    return f" (REDIS_URL {url}: is Redis running and reachable there?)"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the usage of the command given them, not hookray's own
        given = sys.argv[1:] if argv is None else argv
        before = unknown[0] in given and args.command in given \
            and given.index(unknown[0]) < given.index(args.command)
        (parser if before else getattr(args, "command_parser", parser)).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    bad = _not_utf8(parser, args)
    if bad is not None:  # refused before anything is read or connected
        print(f"hookray: error: {bad}: not valid UTF-8", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except HookrayError as exc:
        print(f"hookray: error: {_printable(str(exc))}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"hookray: error: Redis: {_printable(str(exc))}{_redis_hint(args, exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before `run` handles it itself (Ray starting) or
        # in any other command: what was started is stopped on the way out, no traceback
        print("hookray: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports
    except BrokenPipeError:  # the reader went away (| head): no traceback, as other tools
        with contextlib.suppress(OSError):  # and none when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for such a pipe



if __name__ == "__main__":
    sys.exit(main())
