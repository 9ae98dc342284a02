"""Redis-backed stores: hook registry, side stores (names, profiles, content),
stats, the retry schedule and dead letters. Key names: ``engine.keys``.

Synchronous redis-py: used by the driver API and by the actors' loops alike.
Every multi-step update is one MULTI/EXEC transaction or one Lua script.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, Generic, NamedTuple, TypeVar, cast

import msgspec
import redis

from engine.catalogue import EventCatalogue, engine_codes
from engine.errors import (
    SHOWN_CHARS,
    Conflict,
    DamagedRecord,
    HookError,
    NotFound,
    Stale,
    named,
)
from engine.events import MAX_ID, is_account_id
from engine.hooks import (
    MASK,
    Hook,
    changed_paths,
    destination,
    destination_hosts,
    masked_secrets,
    not_utf8,
    parse_hook,
    quoted,
    restore_secrets,
    scrub,
    sent_secrets,
)
from engine.keys import RETRY_LEASE_MS, Keys, damaged_count
from engine.names import KIND_FIELDS, NameCatalogue
from engine.transports.base import Delivery, pack_delivery, unpack_delivery, writable

log = logging.getLogger("hookray")

COPY_SUFFIX = " (copy)"  # of a clone's default name
# a re-send's or dead letter's last error is cut to this: a dead letter of a deleted hook,
# replayed and dead again, says so in front of its last error each time
LAST_ERROR_CHARS = 1000
STAT_FIELDS = ("accepted", "delivered", "retried", "dead_lettered", "discarded")
# the engine's own counters ({p}:stats:engine), each 0 until first counted
ENGINE_STAT_FIELDS = ("events_accepted", "events_rejected", "entries_unreadable",
                      "entries_requeued", "entries_discarded", "retries_unreadable",
                      "retries_requeued", "retries_discarded",
                      "dead_letters_unreadable_discarded")


def _version(r: redis.Redis, key: str) -> int:
    return version_number(key, cast(bytes | None, r.get(key)))


def version_number(key: str, raw: bytes | None) -> int:
    """A version key's value (``{p}:version:hooks``...; absent: 0); ConfigError naming
    the key for one that holds no integer (written from outside the engine): every
    round failed on a bare ``invalid literal for int()``."""
    try:
        return int(raw or 0)
    except ValueError:
        raise DamagedRecord(
            f"{key} holds {quoted(raw.decode('utf-8', 'replace') if raw else raw)}, not a "
            "version number (written from outside the engine?); set it to an integer (e.g. "
            "`redis-cli SET KEY 1000000`): each change moves it on",
            "a version number holds something other than a number") from None


# The index of hooks by account ({p}:hooks:account:{account}, sets of hook ids) is
# whole while {p}:hooks:index holds the hooks' version and field count as they are, and
# how many ids each account's set holds (field "a:{account}"): the scripts that change
# hooks keep it so; a change made otherwise (from outside the engine, a restore, keys
# evicted or lost) leaves it behind until a read builds it again (HookRegistry._index).
# KEYS[1] the hooks hash, KEYS[2] its version, KEYS[3] the mark, KEYS[4] the log of
# hook changes a build made meanwhile catches up with.
_INDEXED = """
local function indexed()
  if redis.call('TYPE', KEYS[3]).ok ~= 'hash' then return false end
  local mark = redis.call('HMGET', KEYS[3], 'version', 'count')
  return mark[1] ~= false and mark[1] == (redis.call('GET', KEYS[2]) or '') and
         tonumber(mark[2]) == redis.call('HLEN', KEYS[1])
end
local function marked(index, account)
  local kind = redis.call('TYPE', index).ok
  if kind ~= 'set' and kind ~= 'none' then return false end
  local n = tonumber(redis.call('HGET', KEYS[3], 'a:' .. account) or '0')
  return n == redis.call('SCARD', index)
end
-- a change made while the index was not whole leaves it so for good (else the version
-- coming back to the mark's, after a restore or the key lost, would pass it for whole)
local function spoil()
  if redis.call('TYPE', KEYS[3]).ok == 'hash' then redis.call('HDEL', KEYS[3], 'version')
  else redis.call('DEL', KEYS[3]) end
end
local function logged(version, op, id, account)
  if redis.call('TYPE', KEYS[4]).ok ~= 'list' then redis.call('DEL', KEYS[4]) end
  -- with Redis' time: an entry of another history (the version lost, the same change
  -- made again) is never the same text (_INDEX_HOOKS compares them)
  local t = redis.call('TIME')
  redis.call('LPUSH', KEYS[4], string.format('%d', version) .. ' ' .. op .. ' ' .. id ..
             ' ' .. account .. ' ' .. t[1] .. '.' .. t[2])
  redis.call('LTRIM', KEYS[4], 0, 999)
end
"""
# KEYS: as _INDEXED; ARGV: the id, the new record, the record it replaces. Stored only
# over that record (1); 0: no such hook; -1: changed since. The account stays the
# hook's (update refuses another), so the index does too.
_REPLACE_HOOK = _INDEXED + """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return 0 end
if stored ~= ARGV[3] then return -1 end
local whole = indexed()
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local version = redis.call('INCR', KEYS[2])
logged(version, '=', ARGV[1], '-')
if whole then redis.call('HSET', KEYS[3], 'version', version) else spoil() end
return 1
"""
# KEYS: the hooks hash, the hook id counter, the deleted hooks zset; ARGV: the per-hook
# counters' and dead-letter indexes' key prefixes ("{p}:stats:", "{p}:dead:hook:"). The
# next hook id: the counter's next, unless the counter was missing (copied or restored
# without it, or Redis emptied) or that id is a stored or deleted-and-marked hook's (a
# counter restored older than the hooks): then one above the counter and every such
# hook's id (decimal fields only, as the engine writes them; compared as text, so any
# length is exact), and none that has counters or dead letters (written by outcomes
# of an earlier hook of that id: a new hook would take them over)
_NEXT_HOOK_ID = """
local fresh = redis.call('EXISTS', KEYS[2]) == 0
local id = redis.call('INCR', KEYS[2])
local taken = redis.call('HEXISTS', KEYS[1], id) == 1 or
              redis.call('ZSCORE', KEYS[3], id) ~= false
local function free()
  local n = string.format('%d', id)  -- not tostring: 1e+14 from 10^14 on
  return redis.call('EXISTS', ARGV[1] .. n, ARGV[2] .. n) == 0
end
if not fresh and not taken and free() then return id end
local top = redis.call('GET', KEYS[2])
local function higher(field)
  if string.find(field, '^[1-9]%d*$') and
     (#field > #top or (#field == #top and field > top)) then
    top = field
  end
end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do higher(field) end
for _, field in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do higher(field) end
if taken or top ~= redis.call('GET', KEYS[2]) then
  redis.call('SET', KEYS[2], top)
  id = redis.call('INCR', KEYS[2])
end
while not free() do id = redis.call('INCR', KEYS[2]) end
return id
"""
# KEYS: as _INDEXED; ARGV: the new hook's id, its record, its account's index, its
# account. Stored only where no hook is (1), else nothing changes (0).
_CREATE_HOOK = _INDEXED + """
local whole = indexed() and marked(ARGV[3], ARGV[4])
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local version = redis.call('INCR', KEYS[2])
logged(version, '+', ARGV[1], ARGV[4])
if whole then
  redis.call('SADD', ARGV[3], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'a:' .. ARGV[4], 1)
  redis.call('HSET', KEYS[3], 'version', version, 'count', redis.call('HLEN', KEYS[1]))
else
  spoil()
end
return 1
"""# KEYS: the hooks hash, its version, the index's mark; ARGV: an account's index, what to
# read ('records': {1, id, record, id, record...}; 'count': {1, how many}), the account.
# {0}: the index is not whole (to be built again first).
_ACCOUNT_HOOKS = _INDEXED + """
if not (indexed() and marked(ARGV[1], ARGV[3])) then return {0} end
if ARGV[2] == 'count' then return {1, redis.call('SCARD', ARGV[1])} end
local out = {1}
for _, id in ipairs(redis.call('SMEMBERS', ARGV[1])) do
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    out[#out + 1] = id
    out[#out + 1] = record
  end
end
return out
"""
# KEYS: as _INDEXED; ARGV: the version the hooks were read at, how many fields they
# had, the accounts' index key prefix, the index of the account whose read asks for
# this, the log's newest entry then, then for each account: the account, how many ids,
# the ids. Builds the index from those, then catches up with the engine's changes made
# since they were read (as logged, on from that entry: else the version was lost or set
# back meanwhile, and the numbers are another history's); 1: built; 0: changed since
# by something else (or too much), read again; 2:
# the mark is of another type (to be deleted first: a script's first write is to be
# one Redis refuses at its maxmemory, so that nothing is built past it)
_INDEX_HOOKS = """
local kind = redis.call('TYPE', KEYS[3]).ok
if kind ~= 'hash' and kind ~= 'none' then return 2 end
local now = redis.call('GET', KEYS[2]) or ''
local replay = {}
local logs = redis.call('TYPE', KEYS[4]).ok == 'list'
if now == ARGV[1] then
  if (logs and redis.call('LINDEX', KEYS[4], 0) or '') ~= ARGV[5] then return 0 end
else
  local from, to = tonumber(ARGV[1] == '' and '0' or ARGV[1]), tonumber(now)
  if not (from and to) or to <= from or to - from > 999 or not logs then
    return 0
  end
  local entries = redis.call('LRANGE', KEYS[4], 0, to - from)
  if (entries[to - from + 1] or '') ~= ARGV[5] then return 0 end
  for k = 1, to - from do
    local v, op, id, account = string.match(entries[k] or '', '^(%d+) (.) (%d+) (%S+) %S+$')
    if v ~= string.format('%d', to - k + 1) then return 0 end
    replay[to - from - k + 1] = {op, id, account}
  end
end
redis.call('HSET', KEYS[3], 'version', '-')
for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
  if string.sub(field, 1, 2) == 'a:' then redis.call('DEL', ARGV[3] .. string.sub(field, 3)) end
end
redis.call('DEL', KEYS[3], ARGV[4])
local counts = {}
local i = 6
while i <= #ARGV do
  local key, n = ARGV[3] .. ARGV[i], tonumber(ARGV[i + 1])
  redis.call('DEL', key)
  for j = i + 2, i + 1 + n do redis.call('SADD', key, ARGV[j]) end
  counts[ARGV[i]] = n
  i = i + 2 + n
end
local count = tonumber(ARGV[2])
for _, change in ipairs(replay) do
  local op, id, account = change[1], change[2], change[3]
  if op == '+' then count = count + 1 elseif op == '-' then count = count - 1 end
  if op ~= '=' and account ~= '-' then
    local key = ARGV[3] .. account
    if counts[account] == nil then
      redis.call('DEL', key)
      counts[account] = 0
    end
    if op == '+' then
      counts[account] = counts[account] + redis.call('SADD', key, id)
    else
      counts[account] = counts[account] - redis.call('SREM', key, id)
    end
  end
end
for account, n in pairs(counts) do
  if n > 0 then redis.call('HSET', KEYS[3], 'a:' .. account, n) end
end
redis.call('HSET', KEYS[3], 'version', now, 'count', count)
return 1
"""# builds of the index of hooks by account a read tries (each reading every hook record)
# before it reads every record itself
INDEX_TRIES = 3
# a hook changed by others this many times while one change was being made to it: the
# change is refused (Conflict) rather than made over a version it never read
REPLACE_TRIES = 10


MAX_TTL_SEC = 10 * 365 * 86_400  # the longest content is kept when asked: 10 years

class HookRegistry:
    """Hooks CRUD; every change bumps a version that partition actors watch."""

    def __init__(self, r: redis.Redis, keys: Keys, catalogue: EventCatalogue | None = None,
                 deny: str = "", max_per_account: int | None = None) -> None:
        """``deny``: DESTINATION_DENY, to refuse a hook whose target is written as an
        address no delivery may connect to (it could deliver nothing).
        ``max_per_account``: MAX_HOOKS_PER_ACCOUNT, the most hooks ``create`` (and
        ``clone``) lets an account have (None: no bound)."""
        self.r, self.k, self.catalogue = r, keys, catalogue
        self.deny = deny
        self.max_per_account = max_per_account
        self._replace_script = r.register_script(_REPLACE_HOOK)
        # field -> (record, hook) as ``load`` last parsed them: a reload parses only the
        # records that changed (validating 100k hooks took 17-32 s at each change)
        self._parsed: dict[bytes, tuple[bytes, Hook]] = {}
        self._next_id = r.register_script(_NEXT_HOOK_ID)
        self._create_script = r.register_script(_CREATE_HOOK)
        self._account_script = r.register_script(_ACCOUNT_HOOKS)
        self._index_script = r.register_script(_INDEX_HOOKS)

    def _changed(self, hook_id: int, change: Callable[[Hook], Hook], what: str,
                 expect: Collection[str] | None = None) -> Hook:
        """Store ``change(the stored hook)`` over the stored record, only if that record
        is still the one read: a change racing another (an update, a stop) is made again
        on the other's result, never over it (a stop would otherwise bring back the
        secret an update had just replaced); one racing a delete does not bring the hook
        back (NotFound). ``expect``: the hook's ETags (``hook_etag``) its caller read it
        with (HTTP If-Match); Stale if it changed since (a change built on an older
        read would undo the other: a stop, say)."""
        for _ in range(REPLACE_TRIES):
            raw = cast(bytes | None, self.r.hget(self.k.hooks, str(hook_id)))
            if raw is None:
                raise NotFound(f"hook {hook_id} does not exist")
            stored = self._parse(str(hook_id), raw)
            if expect is not None and hook_etag(stored) not in expect:
                raise Stale(f"hook {hook_id} changed since it was read (its ETag is now "
                            f"{hook_etag(stored)}, not {', '.join(expect)[:200]}): read it "
                            f"again, and make the change on what it is now")
            hook = change(stored)
            done = self._replace_script(
                keys=[self.k.hooks, self.k.hooks_version, self.k.hooks_index,
                      self.k.hooks_index_log],
                args=[str(hook_id), json.dumps(hook.to_storage()), raw])
            if done == 1:
                return hook
            if done == 0:
                raise NotFound(f"hook {hook_id} does not exist")
        raise Conflict(f"hook {hook_id} changed {REPLACE_TRIES} times while it was being "
                       f"{what}: try again")

    def _save(self, hook: Hook) -> Hook:
        """Store ``hook`` under its id as it is, over any record there (tests write a
        record of an earlier version's rules with it; ``create`` overwrites none)."""
        with self.r.pipeline() as pipe:
            pipe.hset(self.k.hooks, str(hook.id), json.dumps(hook.to_storage()))
            pipe.incr(self.k.hooks_version)
            pipe.delete(self.k.hooks_index)  # (no index script's change: built again)
            pipe.execute()
        return hook

    def create(self, data: Mapping[str, Any] | Hook) -> Hook:
        """Validate and store a new hook; its id is assigned here, above every stored
        or deleted-and-marked hook's (``_NEXT_HOOK_ID``), and the hook is stored only
        where none is (``_CREATE_HOOK``): never over another hook, were
        ``{p}:hooks:seq`` lost or restored older than the hooks (another account's
        re-sends would go to the new hook's destination). A secret that is the
        redacted value itself (a hook read back and created again) is refused."""
        fields = data.to_storage() if isinstance(data, Hook) else dict(data)
        new = self.check_new(fields)  # before using an id
        self._room_for(new.account_id)
        for _ in range(REPLACE_TRIES):
            fields["id"] = int(cast(int, self._next_id(
                keys=[self.k.hooks, self.k.hooks_seq, self.k.hooks_gone],
                args=[self.k.stats(0)[:-1], self.k.dead_of_hook(0)[:-1]])))
            hook = parse_hook(fields, self.catalogue)
            if self._create_script(
                    keys=[self.k.hooks, self.k.hooks_version, self.k.hooks_index,
                          self.k.hooks_index_log],
                    args=[str(hook.id), json.dumps(hook.to_storage()),
                          self.k.hooks_of_account(hook.account_id), hook.account_id]):
                return hook
        raise Conflict(f"hooks were stored under {REPLACE_TRIES} new ids while one was "
                       "being created (written from outside the engine?): try again")

    def check_new(self, fields: Mapping[str, Any]) -> Hook:
        """The hook ``fields`` would create (its id 0), or HookError naming why
        ``create`` would refuse it: a hooks file is checked whole, before any is made."""
        hook = check_new_hook(fields, self.catalogue)
        self._engine_knows(hook)
        self._reachable(hook)
        return hook

    def _room_for(self, account_id: int) -> None:
        """HookError when the account has MAX_HOOKS_PER_ACCOUNT hooks already (its
        stored records, read without validating them). Two creates at once may both
        pass: the bound is one of cost, not of correctness."""
        if self.max_per_account is None:
            return
        have = self._of_account(account_id, "count")[0]
        if have >= self.max_per_account:
            reason = (f"the account has {have} hooks, the most MAX_HOOKS_PER_ACCOUNT "
                      f"({self.max_per_account}) allows: delete one first")
            raise HookError(f"account_id: {reason}", [("account_id", reason)])

    def counts(self) -> Counter[int]:
        """How many hooks each account has stored (records read without validating
        them; one that names no account is not counted)."""
        return Counter(account for raw in cast(list[bytes], self.r.hvals(self.k.hooks))
                       if (account := stored_account(raw)) is not None)

    def _reachable(self, hook: Hook) -> None:
        refuse_denied(hook, self.deny)

    def _engine_knows(self, hook: Hook) -> None:
        """HookError if one of the hook's actions is not an event code of the engine
        (as ``Intake.keep_records`` recorded them): a hook stored from a shell
        with another EVENT_TYPES_FILE would be one the engine cannot load, and a stored
        hook it cannot load stops every partition."""
        known = engine_codes(cast(bytes | None, self.r.hget(self.k.config, "event_types")))
        if known is None:
            return
        engine = set(known)
        foreign = [code for code in hook.actions if code not in engine]
        if foreign:
            reason = (f"{', '.join(map(quoted, foreign))}: not an event type of the engine "
                      f"(REDIS_PREFIX {self.k.p!r}): its EVENT_TYPES_FILE lacks it, and a "
                      "stored hook the engine cannot load stops every partition; use the "
                      "engine's settings")
            raise HookError(f"invalid hook: actions: {reason}", [("actions", reason)])

    def update(self, hook_id: int, data: Mapping[str, Any],
               expect: Collection[str] | None = None) -> Hook:
        """Replace a hook's settings (keeps its id). Settings as a read shows them
        (``hooks get`` then ``hooks update``) keep the stored secrets where they show
        the redacted value, as long as the destination is the same; a secret that is
        still the redacted value after that is refused, never stored."""
        given = dict(data).get("id", hook_id)
        if given is not None and (type(given) is not int or given != hook_id):
            # another hook's settings (its export), or no id at all: as the API refuses
            reason = f"must be {hook_id} (or absent)"
            raise HookError(f"invalid hook: id {given!r} differs from the hook's id "
                            f"{hook_id}", [("id", reason)])
        sent = {**dict(data), "id": hook_id}
        return self._changed(hook_id, lambda stored: self._updated(stored, sent), "updated",
                             expect)

    def _updated(self, stored: Hook, sent: dict[str, Any]) -> Hook:
        """``stored`` with the settings ``sent`` (redacted secrets restored from it)."""
        restored = restore_secrets(sent, stored)
        hook = parse_hook(restored, self.catalogue)
        if hook.account_id != stored.account_id:
            # its re-sends and dead letters are the old account's: they would go to the
            # new account's destination, and the old account could replay them there
            reason = (f"cannot change from {stored.account_id} to {hook.account_id}: the "
                      "hook's re-sends and dead letters belong to its account; create a "
                      "hook in the other account instead")
            raise HookError(f"invalid hook: account_id: {reason}", [("account_id", reason)])
        self._engine_knows(hook)
        if destination_hosts(hook) != destination_hosts(stored):  # kept: still editable
            self._reachable(hook)
        kept = changed_paths(sent, restored)
        if kept and destination(hook) != destination(stored):
            reason = (f"the destination changed, so the redacted value {MASK} cannot keep "
                      "the stored secret; give the secret itself")
            raise HookError(f"invalid hook: the destination changed, so the redacted value "
                            f"{MASK} cannot keep the stored secret(s) of "
                            f"{', '.join(kept)}; give the secret itself",
                            [(path, reason) for path in kept])
        return _no_mask(hook)

    def set_active(self, hook_id: int, active: bool,
                   expect: Collection[str] | None = None) -> Hook:
        return self._changed(hook_id, lambda hook: hook.model_copy(update={"active": active}),
                             "activated" if active else "stopped", expect)

    def clone(self, hook_id: int, name: str | None = None) -> Hook:
        """A stopped copy of a hook, with a new id, named ``name`` (validated as any
        hook's: "" is refused), by default "<its name> (copy)" (the name cut so that the
        copy's still says so, within 255 characters)."""
        data = self.get(hook_id).to_storage()
        if name is None:
            name = data["name"][:255 - len(COPY_SUFFIX)] + COPY_SUFFIX
        data.update(name=name, active=False)
        return self.create(data)

    def delete(self, hook_id: int) -> None:
        """Delete a stored hook. Its counters stay while it has dead letters (they may
        still be replayed or discarded), and go STATS_GONE_SEC after it has none
        (``RetryStore.forget_gone_stats``)."""
        account = self.owner(hook_id)
        index = self.k.hooks_of_account(account) if account is not None else ""
        removed = self.r.eval(_DELETE_HOOK, 5, self.k.hooks, self.k.hooks_version,
                              self.k.hooks_index, self.k.hooks_index_log, self.k.hooks_gone,
                              str(hook_id), index,
                              "" if account is None else account)
        if not removed:
            raise NotFound(f"hook {hook_id} does not exist")

    def stored_secrets(self, hook_id: int, account_id: int) -> list[str]:
        """The secrets of stored hook ``hook_id`` (read without validating it: one that
        no longer validates has them too); none when it is not ``account_id``'s, no
        longer exists or its record is damaged."""
        raw = cast(bytes | None, self.r.hget(self.k.hooks, str(hook_id)))
        if raw is None or stored_account(raw) != account_id:
            return []
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # damaged: its secrets cannot be read
            return []
        return sent_secrets(data)

    def shown_dead_letters(self, page: list[tuple[Delivery, str]]
                           ) -> list[tuple[Delivery, str]]:
        """Dead letters as shown: an error text may hold what the destination answered,
        echoing the credentials it was sent, so each is shown with its hook's stored
        secrets masked (masked when written already, with the secrets of the hook as
        sent: this masks again, as the hook is now)."""
        secrets = {(d.hook_id, d.account_id): self.stored_secrets(d.hook_id, d.account_id)
                   for d, _ in page}
        return [(msgspec.structs.replace(
            d, last_error=scrub(d.last_error, secrets[d.hook_id, d.account_id])), cursor)
            for d, cursor in page]

    def owner(self, hook_id: int) -> int | None:
        """The account of a stored hook, read without validating the hook (one that no
        longer validates, or whose record is damaged, can still be deleted by its
        account); None: no such hook, or a damaged record that names no account."""
        raw = cast(bytes | None, self.r.hget(self.k.hooks, str(hook_id)))
        return stored_account(raw) if raw is not None else None

    def stored_name(self, hook_id: int) -> str | None:
        """The ``name`` of a stored hook's record, read without validating the hook;
        None when there is no such hook or its record names none that can be read."""
        raw = cast(bytes | None, self.r.hget(self.k.hooks, str(hook_id)))
        try:
            name = json.loads(raw).get("name") if raw is not None else None
        except (ValueError, AttributeError, RecursionError):
            return None
        return name if isinstance(name, str) else None

    def stored_ids(self) -> list[int]:
        """The ids of every stored hook, read without validating the hooks."""
        keys = cast(list[bytes], self.r.hkeys(self.k.hooks))
        return sorted(hook_id for key in keys if (hook_id := _key_id(key)) is not None)

    def get(self, hook_id: int) -> Hook:
        raw = self.r.hget(self.k.hooks, str(hook_id))
        if raw is None:
            raise NotFound(f"hook {hook_id} does not exist")
        return self._parse(str(hook_id), raw)  # type: ignore[arg-type]

    def all(self, account_id: int | None = None) -> list[Hook]:
        """Every hook, or one account's; a stored hook that no longer validates raises
        HookError (for one account: only one of that account's)."""
        if account_id is None:
            return self.load()[1]
        hooks, invalid = self.listing(account_id)
        if invalid:
            raise HookError(invalid[0][1])
        return hooks

    def listing(self, account_id: int | None) -> tuple[list[Hook], list[tuple[int, str]]]:
        """The account's hooks (None: every account's), and (id, error) of its stored
        hooks that no longer validate, by id. Other accounts' hooks are not validated:
        one of theirs that no longer validates changes nothing here."""
        raw = self._of_account(account_id, "records")[1] if account_id is not None else \
            cast(dict[bytes, bytes], self.r.hgetall(self.k.hooks))
        hooks: list[Hook] = []
        invalid: list[tuple[int, str]] = []
        for key, value in raw.items():
            hook_id = _key_id(key)
            if hook_id is None:  # no hook's (as stored_ids; ``load`` names it)
                continue
            # a damaged record is its account's (as far as it can be read) to see, apart
            if account_id is not None and stored_account(value) != account_id:
                continue
            try:
                hooks.append(self._parse(key.decode(), value))
            except HookError as exc:
                invalid.append((hook_id, str(exc)))
        return sorted(hooks, key=lambda h: h.id or 0), sorted(invalid)

    def _of_account(self, account_id: int, what: str) -> tuple[int, dict[bytes, bytes]]:
        """The account's stored records by field (``what``: "records"), or how many
        the index holds (``what``: "count"), read through the index of hooks by
        account (built again first where it is not whole): not every account's."""
        key = self.k.hooks_of_account(account_id)
        for built in (False, True):
            got = cast(list[Any], self._account_script(
                keys=[self.k.hooks, self.k.hooks_version, self.k.hooks_index],
                args=[key, what, account_id]))
            if got[0] == 1:
                if what == "count":
                    return int(got[1]), {}
                return len(got) // 2, dict(zip(got[1::2], got[2::2], strict=True))
            if built or not self._index(key):
                break
        # the index cannot be written (Redis at its maxmemory, a replica), or the hooks
        # kept changing past it (from outside the engine): every account's records, read
        records = {key: value for key, value in
                   cast(dict[bytes, bytes], self.r.hgetall(self.k.hooks)).items()
                   if _key_id(key) is not None and stored_account(value) == account_id}
        return len(records), records

    def _snapshot(self) -> tuple[bytes | None, dict[bytes, bytes], bytes] | None:
        """(the hooks' version, every stored record, the newest entry of the index's log
        of hook changes) as of that version; None when the hooks changed during the
        read. The version before and after, not a MULTI: Redis at its maxmemory refuses
        a transaction's every command, and a partition starting then could load no hook
        (so deliver nothing, and make no room); every change moves the version with it,
        so the same version around the read means none."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.get(self.k.hooks_version)
            pipe.lindex(self.k.hooks_index_log, 0)
            pipe.hgetall(self.k.hooks)
            pipe.get(self.k.hooks_version)
            version, top, raw, after = pipe.execute(raise_on_error=False)
        for reply in (version, raw, after):
            if isinstance(reply, Exception):
                raise reply
        top = top if isinstance(top, bytes) else b""  # (none, or a log of another type)
        return (version, raw, top) if version == after else None

    def _index(self, reader: str) -> bool:
        """Build the index of hooks by account again from the stored records (as of
        one version, caught up with the engine's changes made since); False when it
        cannot be written, or the hooks kept changing otherwise than by the engine.
        ``reader``: the index of the account whose read asks for it (deleted with the
        rest: a set left of an account whose last hook went while the index was not
        whole)."""
        for _ in range(INDEX_TRIES):
            read = self._snapshot()
            if read is None:
                continue  # changed meanwhile: read again
            version, raw, top = read
            by_account: dict[int, list[bytes]] = {}
            for key, value in raw.items():
                if _key_id(key) is not None and (account := stored_account(value)) is not None:
                    by_account.setdefault(account, []).append(key)
            args: list[Any] = [version or b"", len(raw), self.k.hooks_of_account(""), reader,
                               top]
            for account, ids in by_account.items():
                args += [account, len(ids), *ids]
            try:
                done = self._index_script(
                    keys=[self.k.hooks, self.k.hooks_version, self.k.hooks_index,
                          self.k.hooks_index_log], args=args)
            except redis.exceptions.ResponseError as exc:
                # at its maxmemory Redis still serves reads: the listing is read without
                if isinstance(exc, redis.exceptions.OutOfMemoryError |
                              redis.exceptions.ReadOnlyError) \
                        or any(code in str(exc) for code in ("OOM ", "READONLY ")):
                    return False
                raise
            if done == 2:  # a mark of another type (written from outside): gone first
                self.r.delete(self.k.hooks_index)
            elif done == 1:
                return True
        return False

    def version(self) -> int:
        return _version(self.r, self.k.hooks_version)

    def version_and_epoch(self) -> tuple[int, bytes | None]:
        """The hooks' version and the data's epoch (``Keys.epoch``)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.get(self.k.hooks_version)
            pipe.get(self.k.epoch)
            raw, epoch = pipe.execute()
        return version_number(self.k.hooks_version, raw), epoch

    def load(self) -> tuple[int, list[Hook]]:
        """(version, every hook), read as of one version. A stored hook that no longer
        validates, or whose record is damaged, raises HookError naming it: also one
        stored under a field that is no hook id, which no tool could list, get or
        delete (it would deliver unseen)."""
        for _ in range(REPLACE_TRIES):
            read = self._snapshot()
            if read is not None:
                version, raw, _ = read
                break
        else:
            raise Conflict(f"hooks changed {REPLACE_TRIES} times while they were being "
                           "read: try again")
        hooks = []
        parsed: dict[bytes, tuple[bytes, Hook]] = {}
        for key, value in raw.items():
            if _key_id(key) is None:
                field = key.decode("utf-8", "replace")
                raise HookError(f"stored hook {quoted(field)} is damaged: that field of "
                                f"{self.k.hooks} is no hook id (the engine writes a decimal "
                                "number), so no hook tool can list, get or delete it; "
                                f"delete the field (HDEL {self.k.hooks} ...)")
            known = self._parsed.get(key)
            hook = known[1] if known is not None and known[0] == value else \
                self._parse(key.decode(), value)
            parsed[key] = (value, hook)
            hooks.append(hook)
        self._parsed = parsed
        return int(version or 0), sorted(hooks, key=lambda h: h.id or 0)

    def _parse(self, hook_id: str, raw: bytes) -> Hook:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # written by hand or damaged: reported like an invalid one
            raise HookError(f"stored hook {hook_id} is not valid JSON: its record is "
                            f"damaged ({exc})") from None
        if not isinstance(data, dict):
            raise HookError(f"stored hook {hook_id} is not a JSON object: its record is "
                            "damaged")
        if "id" not in data:  # every record written holds its id: one edited by hand
            raise HookError(f"stored hook {hook_id} has no id: its record is damaged (the "
                            f"record of a hook holds its id, {hook_id})")
        stored_id = data["id"]
        if type(stored_id) is not int or str(stored_id) != hook_id:
            # another hook's record copied here: both would load as one hook
            try:
                shown = json.dumps(stored_id)
            except RecursionError:  # read, so it can be written: but for Python's limit
                shown = "a value nested too deeply to show"
            shown = shown if len(shown) <= SHOWN_CHARS else shown[:SHOWN_CHARS] + "…"
            raise HookError(f"stored hook {hook_id} holds id {shown}: its record is damaged "
                            f"(the record of a hook holds its id, {hook_id})")
        try:
            return parse_hook(data, self.catalogue, stored=True)
        except HookError as exc:  # stored valid: why not any more?
            raise HookError(f"stored hook {hook_id} no longer validates"
                            f"{_invalid_hint(exc)}: {exc}") from None


def other_account(hook: Hook, delivery: Delivery) -> str:
    """Why ``delivery`` is not sent to ``hook``, the hook stored under its hook id, when
    the hook is another account's (its id given to a new hook: the hook id counter lost
    or restored older than the hooks, or a record written from outside): an account's
    messages go to none of another account's destinations."""
    return (f"hook {delivery.hook_id} now belongs to account {hook.account_id}, not the "
            f"delivery's account {delivery.account_id}")


def hook_etag(hook: Hook) -> str:
    """The HTTP ETag of a hook's settings as a read shows them (secrets masked: a digest
    of a secret would let its holder test guesses of it offline). A change of a secret
    alone keeps it, and loses nothing: an update that shows the redacted value keeps
    the secret stored when it is made, not the one read."""
    shown = json.dumps(hook.display(), sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(shown.encode()).hexdigest()[:32] + '"'


# pydantic's message for a key the model does not have (extra="forbid")
_UNKNOWN_KEY = "Extra inputs are not permitted"


def _invalid_hint(exc: HookError) -> str:
    """What may have made a stored hook invalid, judged by its problems: an action the
    engine no longer knows (the event types file changed), a key or target kind it
    does not know (a record of another hookray version, rolled back from); else none."""
    hints = []
    if any(field == "actions" or field.startswith("actions.") for field, _ in exc.issues):
        hints.append("was EVENT_TYPES_FILE changed?")
    if any(reason == _UNKNOWN_KEY for _, reason in exc.issues):
        hints.append("written by another hookray version?")
    return f" ({' '.join(hints)})" if hints else ""


def _key_id(key: bytes) -> int | None:
    """The hook id a field of ``{p}:hooks`` stands for (the decimal number the engine
    writes for it), None when it is none: only such a field can be read, changed or
    deleted by the id."""
    if not key.isdigit() or (key.startswith(b"0") and key != b"0"):
        return None
    return int(key)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def stored_account(raw: bytes) -> int | None:
    """The ``account_id`` of a stored hook record, read without validating the hook:
    from its JSON object or, when the record is damaged (cut short, edited by hand),
    from the members of its object that can still be read before the damage. None
    when it names none (not an object, or damaged before its ``account_id``)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = _leading_members(raw.decode("utf-8", "replace"))
    account = data.get("account_id") if isinstance(data, dict) else None
    return account if isinstance(account, int) and not isinstance(account, bool) else None


def _leading_members(text: str) -> dict[str, Any]:
    """The members of the JSON object ``text`` that come before what cannot be read."""
    decoder = json.JSONDecoder()
    members: dict[str, Any] = {}
    at = _space(text, 0)
    if text[at:at + 1] != "{":
        return members
    at += 1
    while True:
        try:
            at = _space(text, at)
            key, at = decoder.raw_decode(text, at)
            at = _space(text, at)
            if not isinstance(key, str) or text[at:at + 1] != ":":
                return members
            at = _space(text, at + 1)
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return members
        members[key] = value
        at = _space(text, at)
        if text[at:at + 1] != ",":
            return members
        at += 1


def _space(text: str, at: int) -> int:
    """Where the JSON whitespace at ``at`` in ``text`` ends."""
    found = _JSON_SPACE.match(text, at)
    return found.end() if found else at


def check_new_hook(fields: Mapping[str, Any], catalogue: EventCatalogue | None,
                   deny: str = "") -> Hook:
    """The hook ``fields`` would create (its id 0), or HookError naming each bad field:
    what ``HookRegistry.create`` of an engine with DESTINATION_DENY ``deny`` refuses,
    checked where no registry is at hand (a hooks file, all or none, before anything
    is created)."""
    hook = _no_mask(parse_hook({**fields, "id": 0}, catalogue))
    refuse_denied(hook, deny)
    return hook


def refuse_denied(hook: Hook, deny: str) -> None:
    """HookError naming each field of the target written as an address DESTINATION_DENY
    ``deny`` refuses (a name is judged when a delivery connects)."""
    if not deny:
        return
    from engine.transports.guard import guard_for

    guard = guard_for(deny)
    issues = [(field, f"{reason}: no delivery may connect there")
              for field, host in destination_hosts(hook)
              if guard and (reason := guard.reason(host)) is not None]
    if issues:
        raise HookError(f"invalid hook: {issues[0][0]}: {issues[0][1]}", issues)


def _no_mask(hook: Hook) -> Hook:
    """``hook``, or HookError naming each secret that is the redacted value itself."""
    masked = masked_secrets(hook)
    if masked:
        reason = f"the redacted value {MASK} is no secret; give the secret itself"
        raise HookError(f"invalid hook: {', '.join(masked)}: {reason}",
                        [(path, reason) for path in masked])
    return hook


class NameStore:
    """Names for the custom_data parameters, as a NameCatalogue."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.k = r, keys

    def upsert(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Upsert ``{"account_id", "kind", "id", "name", ...}`` records, each one's
        fields merged into the object's stored ones (a field given "" is cleared);
        returns the count. A bad record raises ValueError naming its index, the field
        and the reason, and nothing of the call is stored."""
        if isinstance(records, Mapping | str | bytes) or not isinstance(records, Iterable):
            raise ValueError("upsert_names: records must be a list of records (mappings), "
                             f"got {type(records).__name__}")
        check = NameCatalogue()
        fields: dict[str, str] = {}
        for n, rec in enumerate(records):
            try:
                account_id, kind, obj_id, texts = _name_record(rec)
                check.upsert(account_id, kind, obj_id, **texts)
            except ValueError as exc:
                raise ValueError(f"upsert_names: record {n}: {exc}; nothing stored") from None
        for rec in check.to_records():
            key = f"{rec.pop('account_id')}:{rec.pop('kind')}:{rec.pop('id')}"
            if problem := not_utf8(rec):  # no message could carry it
                raise ValueError(f"upsert_names: {key}: {problem}; nothing stored")
            fields[key] = json.dumps(rec)
        # the version moves only when a record changed: every partition reloads every
        # name when it does (a nightly sync of the same names costs none); a script per
        # NAMES_CHUNK records, Redis held up by none for long, each moving the version
        # with its own writes (a call tried again after a lost reply finds nothing to
        # change: the version must have moved already)
        items = list(fields.items())
        for at in range(0, len(items), NAMES_CHUNK):
            self.r.eval(_UPSERT_NAMES, 4, self.k.names, self.k.names_version,
                        self.k.names_changes, self.k.names_logged, _KINDS, CHANGES_KEPT,
                        *(x for kv in items[at:at + NAMES_CHUNK] for x in kv))
        return len(fields)

    def delete(self, account_id: int, objects: Iterable[Mapping[str, Any]]) -> int:
        """Forget the names of ``objects`` (``{"kind", "id"}`` each) of an account: a
        campaign, template... deleted on the platform, whose names no message needs any
        more; returns how many were stored. A bad record raises ValueError naming its
        index, and nothing is deleted."""
        if not is_account_id(account_id):
            raise ValueError(f"delete_names: account_id {account_id!r} is not an integer "
                             f"from 0 to {MAX_ID}")
        if isinstance(objects, Mapping | str | bytes) or not isinstance(objects, Iterable):
            raise ValueError("delete_names: objects must be a list of {\"kind\", \"id\"} "
                             f"records, got {type(objects).__name__}")
        keys = []
        for n, rec in enumerate(objects):
            if not isinstance(rec, Mapping) or set(rec) != {"kind", "id"}:
                raise ValueError(f"delete_names: record {n}: expected {{\"kind\", \"id\"}}, "
                                 f"got {rec!r:.100}; nothing deleted")
            try:
                _, kind, obj_id, _ = _name_record({**rec, "account_id": account_id})
            except ValueError as exc:
                raise ValueError(f"delete_names: record {n}: {exc}; nothing deleted") from None
            if kind not in KIND_FIELDS:
                raise ValueError(f"delete_names: record {n}: kind {kind!r} is not one of "
                                 f"{', '.join(KIND_FIELDS)}; nothing deleted")
            keys.append(f"{account_id}:{kind}:{obj_id}")
        # HDEL takes some thousands at most; the version moves with the chunk's own
        # deletions, as in upsert
        return sum(int(self.r.eval(_DELETE_LOGGED, 4, self.k.names, self.k.names_version,
                                   self.k.names_changes, self.k.names_logged, CHANGES_KEPT,
                                   "", *keys[at:at + NAMES_CHUNK]))
                   for at in range(0, len(keys), NAMES_CHUNK))

    def version(self) -> int:
        return _version(self.r, self.k.names_version)

    def load(self) -> NameCatalogue:
        """Every stored name. A record that cannot be read (written by hand, damaged)
        is left out with a warning, its names then empty as for an unknown object,
        rather than failing every round of every worker."""
        names = NameCatalogue()
        raw: dict[bytes, bytes] = self.r.hgetall(self.k.names)  # type: ignore[assignment]
        for key, value in raw.items():
            _load_name(names, key, value)
        return names

    def since(self, names: NameCatalogue, version: int, log: bytes) -> Changed[NameCatalogue]:
        """``names`` as loaded at ``version`` with ``log`` (the change log's token, as
        this returned it last), with the records changed since read again (a copy:
        ``names`` is left as it is); None when the log cannot say what changed (``load``
        then): a reload reads what changed, not every name (1,000,000 names took
        4.6-8.6 s and 630 MB a partition to load). With the log's token and the version
        as they are now, read together."""
        changes = ChangeLog(self.r, self.k.names_changes, self.k.names_logged,
                            self.k.names_version).since(version, log)
        changed = changes.what
        if changed is None:
            return Changed(None, changes.token, changes.version)
        out = names.copy()
        for at in range(0, len(changed), NAMES_CHUNK):
            part = changed[at:at + NAMES_CHUNK]
            values = cast(list[bytes | None], self.r.hmget(self.k.names, part))
            for key, value in zip(part, values, strict=True):
                _load_name(out, key, value)
        return Changed(out, changes.token, changes.version)


def _load_name(names: NameCatalogue, key: bytes, value: bytes | None) -> None:
    """Put the stored record ``value`` of names field ``key`` into ``names`` in place of
    what it held (None: the record is gone). A record that cannot be read (written by
    hand, damaged) is left out with a warning, its names then empty as for an unknown
    object, rather than failing every round of every worker."""
    try:
        account, kind, obj_id = key.decode().split(":")
        target = (int(account), kind, int(obj_id))
        if key != f"{target[0]}:{kind}:{target[2]}".encode():
            # written by hand ("1:campaigns:07"): not the field the engine reads again
            # when that object changes, nor to be taken for the object's own
            raise ValueError("not as the engine writes its field: account:kind:id, in "
                             "decimal digits")
    except ValueError as exc:
        log.warning("names: stored record %r left out, it cannot be read: %s", key[:200], exc)
        return
    names.remove(*target)
    if value is None:
        return
    try:
        fields = json.loads(value)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        names.upsert(*target, **fields)
    except (ValueError, TypeError) as exc:
        log.warning("names: stored record %r left out, it cannot be read: %s", key[:200], exc)


T = TypeVar("T")


class Changed(NamedTuple, Generic[T]):
    """What changed since a worker's version (None: the log cannot say), the change log's
    token and the version, as they are now."""

    what: T | None
    token: bytes
    version: int


class ChangeLog:
    """Which records changed since a version, as the scripts that change them log it
    (``_CHANGE_LOG``: a zset of records by the version of their last change, and its
    mark): a worker reads those again instead of every record."""

    def __init__(self, r: redis.Redis, log_key: str, mark_key: str, version_key: str) -> None:
        self.r, self.log_key, self.mark_key, self.version_key = r, log_key, mark_key, \
            version_key

    def since(self, version: int, token: bytes) -> Changed[list[bytes]]:
        """The records changed after ``version`` of the log of ``token`` (as this
        returned it last; b"": none); None when the log cannot say: another log (it
        started again since: the version moved back, or the log's mark was lost), one
        that keeps no change that far back, one that does not hold what its mark says
        (the version moved on without it, the log lost), or a version beyond it. With
        the log's token and the version now, read with them: a worker keeps the two
        together (a version read before, with a token of a log started since, would
        pass the changes between them over)."""
        got = cast(list[Any], self.r.eval(_CHANGES_SINCE, 3, self.log_key, self.mark_key,
                                          self.version_key, version, token))
        now = got[1] if isinstance(got[1], bytes) else b""
        at = version_number(self.version_key, got[2] or None)
        return Changed(cast(list[bytes], got[3]) if got[0] == 1 else None, now, at)


class ProfileStore:
    """Profile fields by (account, profile_id), for hooks that copy them into custom_data."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.k = r, keys
        self._unreadable = _Unreadable("profile")

    def upsert(self, account_id: int, profiles: Mapping[str, Mapping[str, Any]]) -> int:
        """Store the fields of ``profiles`` (by profile id), over what each held. A
        script per ONCE_CHUNK profiles moves the version with its writes, and logs
        which changed (a worker forgets those it cached, not every profile)."""
        if not profiles:
            return 0
        encoded = list(_json_values(profiles, "upsert_profiles: the fields of profile").items())
        for at in range(0, len(encoded), ONCE_CHUNK):
            self.r.eval(_UPSERT_PROFILES, 4, self.k.profiles(account_id),
                        self.k.profiles_version, self.k.profiles_changes,
                        self.k.profiles_logged, CHANGES_KEPT, account_id,
                        *(x for kv in encoded[at:at + ONCE_CHUNK] for x in kv))
        return len(profiles)

    def delete(self, account_id: int, profile_ids: list[str]) -> int:
        """Forget the fields of ``profile_ids`` (profiles deleted on the platform: their
        data is not kept, nor copied into later messages); how many there were."""
        return sum(int(self.r.eval(_DELETE_LOGGED, 4, self.k.profiles(account_id),
                                   self.k.profiles_version, self.k.profiles_changes,
                                   self.k.profiles_logged, CHANGES_KEPT, f"{account_id}:",
                                   *profile_ids[at:at + ONCE_CHUNK]))
                   for at in range(0, len(profile_ids), ONCE_CHUNK))

    def changed_since(self, version: int, log: bytes) -> Changed[list[tuple[int, str]]]:
        """(account, profile id) of the profiles changed after ``version`` of change log
        ``log`` (``ChangeLog.since``)."""
        changes = ChangeLog(self.r, self.k.profiles_changes, self.k.profiles_logged,
                            self.k.profiles_version).since(version, log)
        if changes.what is None:
            return Changed(None, changes.token, changes.version)
        out = []
        for member in changes.what:
            account, _, pid = member.decode("utf-8", "surrogateescape").partition(":")
            if not (account.isascii() and account.isdigit()):
                return Changed(None, changes.token, changes.version)  # written by something else
            out.append((int(account), pid))
        return Changed(out, changes.token, changes.version)

    def version(self) -> int:
        return _version(self.r, self.k.profiles_version)

    def get_many(self, wanted: Mapping[int, list[str]]) -> dict[tuple[int, str], dict[str, Any]]:
        """Profiles for ``{account_id: [profile_id, ...]}``, one round trip."""
        accounts = [(a, ids) for a, ids in wanted.items() if ids]
        with self.r.pipeline(transaction=False) as pipe:
            for account, ids in accounts:
                pipe.hmget(self.k.profiles(account), ids)
            replies = pipe.execute()
        found: dict[tuple[int, str], dict[str, Any]] = {}
        for (account, ids), values in zip(accounts, replies, strict=True):
            for pid, raw in zip(ids, values, strict=True):
                if raw is None:
                    continue
                try:
                    found[(account, pid)] = _json_object(raw)
                except ValueError as exc:
                    # as an unknown profile: the other events of its entry, and the
                    # hooks copying no profile field, are not held back by it
                    self._unreadable.warn(f"{self.k.profiles(account)} field {quoted(pid)}",
                                          exc, "its fields are copied into no message; "
                                          "upsert the profile again or delete it")
        return found


def _json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object a stored record holds; ValueError saying why it holds none (not
    JSON, nested too deeply to read, or JSON of another kind)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("not JSON that can be read: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"JSON, but not an object: a {type(value).__name__}")
    return value


UNREADABLE_LOG_SEC = 60.0  # at most one warning a minute per kind of record left out


class _Unreadable:
    """Warns of stored records of one kind left out because they cannot be read
    (damaged, or written by hand): the first at once, then at most one every
    UNREADABLE_LOG_SEC, with how many more were left out meanwhile (a partition
    reading one in every round would flood the log)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.said_at = -math.inf  # when one was last logged
        self.unsaid = 0  # left out since, not logged

    def warn(self, where: str, why: Exception | str, then: str) -> None:
        """One record, named by ``where`` (its key, and field), left out for ``why``;
        ``then``: what that means and what to do."""
        now = time.monotonic()
        if now - self.said_at < UNREADABLE_LOG_SEC:
            self.unsaid += 1
            return
        more = f" ({self.unsaid} more {self.kind} record(s) left out since the last " \
               "such warning)" if self.unsaid else ""
        shown = where if len(where) <= 300 else where[:300] + "…"
        log.warning("%s record %s cannot be read (%s), taken as absent: %s%s",
                    self.kind, shown, str(why)[:200], then, more)
        self.said_at, self.unsaid = now, 0


def _json_values(values: Mapping[str, Mapping[str, Any]], what: str) -> dict[str, str]:
    """Each mapping of ``values`` as JSON text, by key; ValueError "``what`` 'key': not
    JSON: ..." for one that is not (NaN included), or that holds text that is not
    valid UTF-8 (a lone surrogate: no message could carry it), before anything is
    stored."""
    encoded = {}
    for key, value in values.items():
        try:
            encoded[key] = json.dumps(dict(value), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{what} {quoted(key)}: not JSON: {exc}; nothing stored") from None
        if problem := not_utf8(key):
            raise ValueError(f"{what} {quoted(key)}: the id is {problem}; nothing stored")
        if problem := not_utf8(dict(value)):
            raise ValueError(f"{what} {quoted(key)}: {problem}; nothing stored")
    return encoded


NAMES_CHUNK = 1000  # name records per script or command
# the most changes a change log keeps (ChangeLog): a worker further behind loads all
CHANGES_KEPT = 100_000
# Keeps a change log (ChangeLog): logged(log, its mark, the version the changes moved
# the data to, the changed members, how many records the log keeps). The mark's
# ``from``: the log holds every change made after that version; ``to``: the version
# its last change moved the data to; ``n``: how many records the log holds; ``token``:
# made anew each time the log starts again, which it does here when it is not as its
# mark says (the version moved by something else, the log or its mark lost or
# damaged): a worker's version of another log says nothing of this one.
_CHANGE_LOG = """
local function logged(log, mark, version, members, keep)
  if redis.call('TYPE', mark).ok ~= 'hash' then redis.call('DEL', mark) end
  if redis.call('TYPE', log).ok ~= 'zset' then redis.call('DEL', log) end
  local was = redis.call('HMGET', mark, 'to', 'n', 'token')
  if tonumber(was[1]) ~= version - 1 or tonumber(was[2]) ~= redis.call('ZCARD', log) or
     not was[3] then
    -- another log, under another token, even where the version only moved on (a name
    -- written by hand): a worker's version may be of a moment between a hand's INCR
    -- and its HSET, or the version may have moved on and back
    local t = redis.call('TIME')
    redis.call('DEL', log)
    redis.call('HSET', mark, 'from', version - 1, 'token', t[1] .. '.' .. t[2])
  end
  for _, member in ipairs(members) do redis.call('ZADD', log, version, member) end
  local over = redis.call('ZCARD', log) - keep
  if over > 0 then
    local cut = redis.call('ZRANGE', log, over - 1, over - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', log, 0, over - 1)
    if tonumber(cut[2]) > tonumber(redis.call('HGET', mark, 'from')) then
      redis.call('HSET', mark, 'from', cut[2])
    end
  end
  redis.call('HSET', mark, 'to', version, 'n', redis.call('ZCARD', log))
end
"""
# KEYS: a change log, its mark, the version it logs; ARGV: a worker's version, the
# token of the log it is of. {1, the log's token, the version now, the records changed
# after the worker's version}, or {0, the token, the version} when the log cannot say
# (ChangeLog.since): the reads of one moment (another writer's trim between them would
# hide changes). Versions from 2^53 on are not told apart by a Lua number: never said.
_CHANGES_SINCE = """
local now = redis.call('GET', KEYS[3]) or ''
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' then return {0, '', now} end
local mark = redis.call('HMGET', KEYS[2], 'from', 'to', 'n', 'token')
local token = mark[4] or ''
local kind = redis.call('TYPE', KEYS[1]).ok
if token ~= ARGV[2] or mark[2] ~= now or (kind ~= 'zset' and kind ~= 'none') or
   tonumber(mark[3]) ~= redis.call('ZCARD', KEYS[1]) then
  return {0, token, now}
end
local from, to, version = tonumber(mark[1]), tonumber(mark[2]), tonumber(ARGV[1])
if not (from and to and version) or version < from or version > to or to >= 2^53 then
  return {0, token, now}
end
return {1, token, now, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')}
"""
# KEYS: the names hash, its version, its change log and the log's mark; ARGV: key,
# record JSON, ... Writes the records that differ from the stored ones; returns how
# many did.
# each record's fields merged into the stored ones (a field given "" is cleared): a
# record of the subid alone kept no name. Of a stored record, what the engine would not
# load (a field its kind has not, a value that is no text or number) is left out, and
# one that cannot be read at all is replaced. The version moves only when a record
# changed, and the log names those that did. ARGV: the fields of each kind
# (KIND_FIELDS, JSON), how many changes the log keeps, then key, record pairs
_UPSERT_NAMES = _CHANGE_LOG + """
local kinds = cjson.decode(ARGV[1])
local changed = {}
for i = 3, #ARGV, 2 do
  local allowed = {}
  for _, f in ipairs(kinds[string.match(ARGV[i], '^[^:]*:([^:]*):') or ''] or {}) do
    allowed[f] = true
  end
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  local merged, differs = {}, true
  if stored and string.sub(stored, 1, 1) == '{' then
    local ok, old = pcall(cjson.decode, stored)
    if ok and type(old) == 'table' then
      differs = false
      for k, v in pairs(old) do
        if allowed[k] and (type(v) == 'string' or type(v) == 'number') then
          merged[k] = v
        else
          differs = true
        end
      end
    end
  end
  for k, v in pairs(cjson.decode(ARGV[i + 1])) do
    if merged[k] ~= v then merged[k], differs = v, true end
  end
  if differs then
    redis.call('HSET', KEYS[1], ARGV[i], next(merged) == nil and '{}' or cjson.encode(merged))
    changed[#changed + 1] = ARGV[i]
  end
end
if #changed > 0 then
  logged(KEYS[3], KEYS[4], redis.call('INCR', KEYS[2]), changed, tonumber(ARGV[2]))
end
return #changed
"""

_KINDS = json.dumps(KIND_FIELDS)

# KEYS: an account's profiles, the profiles version, its change log and the log's
# mark; ARGV: how many changes the log keeps, the account, then profile id, fields
# JSON pairs. Stores them, moves the version and logs them.
_UPSERT_PROFILES = _CHANGE_LOG + """
local changed = {}
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  changed[#changed + 1] = ARGV[2] .. ':' .. ARGV[i]
end
logged(KEYS[3], KEYS[4], redis.call('INCR', KEYS[2]), changed, tonumber(ARGV[1]))
return #changed
"""
# KEYS: a hash of names or of an account's profiles, its version, its change log and
# the log's mark; ARGV: how many changes the log keeps, what the log's members put
# before a field ("" for names, "{account}:" for profiles), then the fields. Deletes
# those, and moves the version and logs them if any was stored; returns how many were.
_DELETE_LOGGED = _CHANGE_LOG + """
local removed = {}
for i = 3, #ARGV do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    removed[#removed + 1] = ARGV[2] .. ARGV[i]
  end
end
if #removed > 0 then
  logged(KEYS[3], KEYS[4], redis.call('INCR', KEYS[2]), removed, tonumber(ARGV[1]))
end
return #removed
"""


def _name_record(rec: Any) -> tuple[int, str, int, dict[str, Any]]:
    """(account_id, kind, id, fields) of one names record, or ValueError naming the
    field and the reason (names are text: a number is taken as its digits)."""
    if not isinstance(rec, Mapping):
        raise ValueError(f"expected a mapping, got {type(rec).__name__}")
    rec = dict(rec)
    for key in ("account_id", "kind", "id"):
        if key not in rec:
            raise ValueError(f"{key} is missing")
    account_id, kind, obj_id = rec.pop("account_id"), rec.pop("kind"), rec.pop("id")
    ids = []
    for key, value in (("account_id", account_id), ("id", obj_id)):
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)  # as a CSV file or JSON of strings holds it
        if not is_account_id(value):  # the same range as an account's id
            raise ValueError(f"{key}: expected an integer from 0 to {MAX_ID}, got {value!r}")
        ids.append(value)
    account_id, obj_id = ids
    if not isinstance(kind, str):
        raise ValueError(f"kind: expected a string, got {kind!r}")
    for key, value in rec.items():
        if not isinstance(key, str):
            raise ValueError(f"{key!r}: a field's name is a string")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"{key}: expected a string, got {value!r}")
    return account_id, kind, obj_id, rec


class ContentStore:
    """Message content by account and send id, kept for HOOK_CONTENT_CLEANUP_HOURS.
    An account's events only ever carry its own content: a send id another account
    uses (by chance or on purpose) names another key."""

    def __init__(self, r: redis.Redis, keys: Keys, ttl_sec: int) -> None:
        self.r, self.k, self.ttl_sec = r, keys, ttl_sec
        self._unreadable = _Unreadable("content")

    def put(self, account_id: int, contents: Mapping[str, Mapping[str, Any]],
            ttl_sec: int | None = None) -> int:
        if not is_account_id(account_id):
            raise ValueError(f"store_content: account_id {account_id!r} is not an integer "
                             f"from 0 to {MAX_ID}")
        if ttl_sec is not None and (isinstance(ttl_sec, bool) or not isinstance(ttl_sec, int)
                                    or not 1 <= ttl_sec <= MAX_TTL_SEC):
            raise ValueError(f"ttl_sec: expected whole seconds from 1 to {MAX_TTL_SEC:,} "
                             f"(10 years), got {ttl_sec!r}")
        if not isinstance(contents, Mapping) or not all(
                isinstance(sid, str) and sid and isinstance(content, Mapping)
                for sid, content in contents.items()):
            raise ValueError("store_content: contents must map each send id (a non-empty "
                             "string) to its content (a mapping)")
        encoded = _json_values(contents, "store_content: content of send id")
        with self.r.pipeline(transaction=False) as pipe:
            for send_id, data in encoded.items():
                pipe.set(self.k.content(account_id, send_id), data, ex=ttl_sec or self.ttl_sec)
            pipe.execute()
        return len(contents)

    def get_many(self, wanted: list[tuple[int, str]]) -> dict[tuple[int, str], dict[str, Any]]:
        """Content still stored for ``[(account_id, send_id), ...]`` (expired content is
        simply absent, as is content that cannot be read: with a warning), one MGET."""
        if not wanted:
            return {}
        names = [self.k.content(a, s) for a, s in wanted]
        values = cast(list[bytes | None], self.r.mget(names))
        found: dict[tuple[int, str], dict[str, Any]] = {}
        for key, name, raw in zip(wanted, names, values, strict=True):
            if raw is None:
                continue
            try:
                found[key] = _json_object(raw)
            except ValueError as exc:
                # as expired content: the other events of its entry are not held back
                self._unreadable.warn(name, exc, "no message carries it; store it again "
                                      "or delete it")
        return found


class Stats:
    """Per-hook counters: accepted, delivered, retried, dead_lettered, discarded (in
    messages)."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.k = r, keys

    def add(self, pipe: Any, hook_id: int, field: str, n: int) -> None:
        if n:
            pipe.hincrby(self.k.stats(hook_id), field, n)

    def get(self, hook_id: int) -> dict[str, int]:
        return self._counters(self.r.hgetall(self.k.stats(hook_id)), hook_id)

    def get_many(self, hook_ids: list[int]) -> list[dict[str, int]]:
        """The counters of each of ``hook_ids``, read in one round trip."""
        with self.r.pipeline(transaction=False) as pipe:
            for hook_id in hook_ids:
                pipe.hgetall(self.k.stats(hook_id))
            return [self._counters(raw, hook_id)
                    for hook_id, raw in zip(hook_ids, pipe.execute(), strict=True)]

    def _counters(self, raw: Any, hook_id: int) -> dict[str, int]:
        counts = _counts(raw, self.k.stats(hook_id))
        return {f: counts.get(f, 0) for f in STAT_FIELDS}

    def engine(self) -> dict[str, int]:
        """The engine's counters, every one of ENGINE_STAT_FIELDS (0 until first
        counted: a reader finds each key on a fresh engine too)."""
        raw: dict[bytes, bytes] = self.r.hgetall(self.k.engine_stats)  # type: ignore[assignment]
        return {**dict.fromkeys(ENGINE_STAT_FIELDS, 0), **_counts(raw, self.k.engine_stats)}


def _counts(raw: dict[bytes, bytes], key: str) -> dict[str, int]:
    """The counters of the hash ``key``; ConfigError naming a field that no HINCRBY
    wrote (a damaged record: the engine leaves its counts out, with a warning)."""
    counts = {}
    for field, value in raw.items():
        name = field.decode("utf-8", "replace")
        try:
            counts[name] = int(value)
        except ValueError:
            raise DamagedRecord(f"{key} field {name} holds {value[:40]!r}, not a count: a "
                                "damaged record (the engine's counts of it are not made); set "
                                "it right (HSET) or delete the field",
                                "a counter holds something other than a number") from None
    return counts


Once = tuple[str, str]  # a booking worker's last token key, and this booking's token


SKIPPED_COUNT_LOG_SEC = 60.0  # at most one warning of counts a booking left out a minute
ONCE_CHUNK = 1000  # ids per XACK/XDEL command: unpack in a script takes some thousands


class _Commands:
    """The commands of a booking, as book_once.lua takes them (the pipeline methods
    bookings and acknowledgements use)."""

    def __init__(self) -> None:
        self.words: list[Any] = []

    def _add(self, *words: Any) -> None:
        self.words += [len(words), *words]

    def xack(self, stream: str, group: str, *ids: str) -> None:
        for n in range(0, len(ids), ONCE_CHUNK):
            self._add("XACK", stream, group, *ids[n:n + ONCE_CHUNK])

    def xdel(self, stream: str, *ids: str) -> None:
        for n in range(0, len(ids), ONCE_CHUNK):
            self._add("XDEL", stream, *ids[n:n + ONCE_CHUNK])

    def hset(self, key: str, field: str, value: Any) -> None:
        self._add("HSET", key, field, value)

    def hdel(self, key: str, *fields: str) -> None:
        for n in range(0, len(fields), ONCE_CHUNK):
            self._add("HDEL", key, *fields[n:n + ONCE_CHUNK])

    def hincrby(self, key: str, field: str, n: int) -> None:
        self._add("HINCRBY", key, field, n)

    def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        self._add("ZADD", key, *(w for member, score in mapping.items()
                                 for w in (score, member)))

    def zrem(self, key: str, *members: str) -> None:
        for n in range(0, len(members), ONCE_CHUNK):
            self._add("ZREM", key, *members[n:n + ONCE_CHUNK])


class DataLost(redis.RedisError):
    """A booking refused, nothing of it carried out: the data's epoch in Redis is not
    the one its work was built under (Redis lost the engine's data since, and a new
    hook may have taken the hook id it books under). Its outcome goes with the data."""


class Booking:
    """Runs a booking's commands (``with booking(once, epoch) as pipe: pipe.hset(...)``)
    in book_once.lua: with ``once`` (a worker's token key, this booking's token), a
    booking sent again after its reply was lost is carried out at most once; with
    ``epoch`` (the data's epoch the worker read, ``Keys.epoch``, with the work booked),
    only into that data, else DataLost. ``epoch`` None (the worker read none: no
    engine wrote one yet) books unchecked; with neither, the commands go in a MULTI."""

    def __init__(self, r: redis.Redis, epoch_key: str) -> None:
        self.r = r
        self.epoch_key = epoch_key
        self._script = r.register_script(
            resources.files("engine").joinpath("book_once.lua").read_text("utf-8"))
        self._said_at = -SKIPPED_COUNT_LOG_SEC  # when counts left out were last logged

    @contextmanager
    def __call__(self, once: Once | None, epoch: bytes | None = None) -> Iterator[Any]:
        if once is None and epoch is None:
            with self.r.pipeline() as pipe:
                yield pipe
                commands = [args for args, _ in pipe.command_stack]
                # a MULTI is not undone by a failing command either: a count that
                # cannot be made does not fail what was booked beside it
                replies = pipe.execute(raise_on_error=False)
            skipped = []
            for args, reply in zip(commands, replies, strict=True):
                if isinstance(reply, Exception):
                    if args[0] != "HINCRBY" or not damaged_count(reply):
                        raise reply
                    skipped.append(f"{args[1]} {args[2]}: {reply}")
            self._skipped(skipped)
            return
        words = _Commands()
        yield words
        keys, token = [self.epoch_key], ""
        if once is not None:
            keys.append(once[0])
            token = once[1]
        reply = self._script(keys=keys, args=[b"" if epoch is None else epoch, token,
                                              *words.words])
        if reply[0] == 2:
            raise DataLost(f"{self.epoch_key} is not the epoch this booking's work was "
                           "read under (Redis lost the engine's data since): nothing booked")
        self._skipped([b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
                       for b in reply[1:]])

    def _skipped(self, counts: list[str]) -> None:
        """Warn of counts a booking could not make (a counter damaged from outside,
        not an integer), at most once every SKIPPED_COUNT_LOG_SEC: the rest of the
        booking was made."""
        if counts and time.monotonic() - self._said_at >= SKIPPED_COUNT_LOG_SEC:
            self._said_at = time.monotonic()
            log.warning("%d count(s) not made, their fields not integers (a damaged "
                        "record: set it right with HSET or delete the field): %s",
                        len(counts), "; ".join(counts[:5])[:1000])


class _KeyPlaces:
    """KEYS of a script, each once, with its (1-based) place for the script's ARGV."""

    def __init__(self, fixed: list[str]) -> None:
        self.keys = list(fixed)
        self._places = {key: n for n, key in enumerate(self.keys, 1)}

    def place(self, key: str) -> int:
        if key not in self._places:
            self.keys.append(key)
            self._places[key] = len(self.keys)
        return self._places[key]


_Id = TypeVar("_Id", str, bytes)


def _by_bytes(ids: Sequence[_Id], sizes: list[int], limit: int) -> Iterator[list[_Id]]:
    """``ids`` in order, in chunks whose ``sizes`` add up to ``limit`` at most (one
    larger than that alone)."""
    chunk: list[_Id] = []
    total = 0
    for delivery_id, size in zip(ids, sizes, strict=True):
        if chunk and total + size > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(delivery_id)
        total += size
    if chunk:
        yield chunk


# KEYS: the dead letters' payloads, their set, the engine's stats; ARGV: the id, the
# payload read (another written meanwhile, dead again: left alone)
_DROP_UNREADABLE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.pcall('HINCRBY', KEYS[3], 'dead_letters_unreadable_discarded', 1)  -- damaged: not made
return 1
"""


# KEYS: as _INDEXED, then the deleted hooks zset; ARGV: the id, its account's index
# and its account ('' when its record names none). Deleted and marked so (by Redis'
# clock) at once: a crash between the two kept its counters.
_DELETE_HOOK = _INDEXED + """
local whole = indexed() and ARGV[3] ~= '' and marked(ARGV[2], ARGV[3])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local version = redis.call('INCR', KEYS[2])
logged(version, '-', ARGV[1], ARGV[3] ~= '' and ARGV[3] or '-')
local t = redis.call('TIME')
redis.call('ZADD', KEYS[5], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
if whole and redis.call('SREM', ARGV[2], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[3], 'a:' .. ARGV[3], -1) <= 0 then
    redis.call('HDEL', KEYS[3], 'a:' .. ARGV[3])
  end
  redis.call('HSET', KEYS[3], 'version', version, 'count', redis.call('HLEN', KEYS[1]))
else
  spoil()
end
return 1
"""

def _redis_ms(r: redis.Redis) -> int:
    """Redis' clock, in milliseconds."""
    seconds, micros = cast(tuple[int, int], r.time())
    return int(seconds) * 1000 + int(micros) // 1000


CLOCK_READ_SEC = 60.0  # how long RedisClock carries Redis' time on before reading it again


class RedisClock:
    """Redis' clock in milliseconds, read (TIME) at most every CLOCK_READ_SEC and
    carried on by this process's monotonic clock between. The retry schedule's due
    times and leases are written by partitions and retry workers on any machine, and
    compared by whichever claims: by each machine's own clock, one set minutes apart
    sent its re-sends at once or minutes late, and one stepped moved every lease."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._read: tuple[float, int] | None = None  # (monotonic, Redis ms) when read

    def now_ms(self) -> int:
        mono = time.monotonic()
        if self._read is None or mono - self._read[0] >= CLOCK_READ_SEC:
            self._read = (mono, _redis_ms(self.r))
            return self._read[1]
        return self._read[1] + int((mono - self._read[0]) * 1000)


GONE_CHUNK = 500  # deleted hooks looked at per forget_gone_stats call
# KEYS: the deleted hooks zset, the hooks hash; ARGV: the latest score looked at, now
# (ms), the chunk, the prefix. A hook stored again is let go; one with dead letters is
# looked at again later; the others' counters are deleted.
_FORGET_GONE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local gone = 0
for _, id in ipairs(ids) do
  if redis.call('HEXISTS', KEYS[2], id) == 1 then
    redis.call('ZREM', KEYS[1], id)
  elseif redis.call('EXISTS', ARGV[4] .. ':dead:hook:' .. id) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
  else
    gone = gone + redis.call('DEL', ARGV[4] .. ':stats:' .. id)
    redis.call('ZREM', KEYS[1], id)
  end
end
return gone
"""


# KEYS: the dead letters' payloads, an account's or hook's index of them; ARGV: ids
# read from the index without a payload. Each one still without one leaves the index:
# an undecodable letter discarded or expired (its owner, unknown, kept its entries),
# never one dead again meanwhile. Returns how many left.
_PRUNE_INDEX = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    n = n + redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return n
"""


# KEYS: retry:unreadable, retry payloads, the schedule, the engine's stats; ARGV: ids.
# Each moved only by the call that removes it, due at once (score 0: before any due
# time), its hand-over count long gone (its outcome set it aside)
_REQUEUE_RESENDS = """
local n = 0
for _, id in ipairs(ARGV) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    redis.call('HSET', KEYS[2], id, raw)
    redis.call('ZADD', KEYS[3], 0, id)
    redis.call('HDEL', KEYS[1], id)
    n = n + 1
  end
end
redis.pcall('HINCRBY', KEYS[4], 'retries_requeued', n)  -- a damaged count: not made
return n
"""

# KEYS: retry:unreadable, the engine's stats; ARGV: the ids to delete
_DISCARD_RESENDS = """
local n = redis.call('HDEL', KEYS[1], unpack(ARGV))
redis.pcall('HINCRBY', KEYS[2], 'retries_discarded', n)  -- a damaged count: not made
return n
"""


class _Head(msgspec.Struct):
    """What of a delivery's payload names its hook, read from one that may not decode
    as a whole."""

    hook_id: int | None = None


_head = msgspec.msgpack.Decoder(_Head)


def _head_hook(raw: bytes) -> int | None:
    try:
        return _head.decode(raw).hook_id
    except (msgspec.DecodeError, ValueError):
        return None


def _decode_error(raw: bytes) -> str | None:
    """Why a re-send's payload cannot be decoded by this version (None: it can)."""
    try:
        unpack_delivery(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# KEYS: the unanswered hand-overs hash; ARGV: delivery ids. Counts a hand-over of each:
# one whose count is damaged (written from outside: not an integer, or at its limit)
# counts from 1 again, rather than failing the others claimed with it (handed back
# whole, due again together: none would ever be sent). Returns {the counts, {id, error,
# ...} of those counted again}.
_HANDED_OVER = """
local counts, reset = {}, {}
for i, id in ipairs(ARGV) do
  local n = redis.pcall('HINCRBY', KEYS[1], id, 1)
  if type(n) == 'table' and n.err then
    if not (string.find(n.err, 'not an integer', 1, true) or
            string.find(n.err, 'overflow', 1, true)) then
      return n  -- the hash itself of another type, out of memory: the caller's error
    end
    redis.call('HSET', KEYS[1], id, 1)
    reset[#reset + 1] = id
    reset[#reset + 1] = n.err
    n = 1
  end
  counts[i] = n
end
return {counts, reset}
"""


def _decoded(payload: bytes) -> Delivery | None:
    """The delivery of a payload; None when it cannot be decoded."""
    try:
        return unpack_delivery(payload)
    except (msgspec.DecodeError, ValueError):
        return None


def _decodes(payload: bytes) -> bool:
    return _decoded(payload) is not None


def _undecodable(delivery_id: str) -> NotFound:
    return NotFound(f"dead letter {delivery_id} cannot be decoded; it is left where it is")


def _not_found(missing: list[str]) -> NotFound:
    shown = ", ".join(named(i) for i in missing[:20])
    more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
    return NotFound(f"dead letter(s) {shown}{more} do not exist")


# KEYS: the dead letters' index watermark, the recent kills; ARGV: a time of death
# (ms). Moved there unless already later (passes running at once never move it back);
# one that is no number (damaged) is replaced. The kills below the mark are forgotten
# (a pass reads only above it).
_RAISE_MARK = """
local mark = tonumber(redis.call('GET', KEYS[1]))
-- nan, inf: no time of death either
if mark and (mark ~= mark or mark == math.huge or mark == -math.huge) then mark = nil end
if not mark or mark < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  mark = tonumber(ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. mark)
return 0
"""
# how far behind Redis' clock a worker's may be, that scores a dead letter by its own
# (an earlier version's ``kill``): an index pass looks this far back before its start
DEAD_INDEX_SKEW_MS = 60_000
REPLAY_TRIES = 5  # replay attempts while dead letters change under it
DEAD_READ_CHUNK = 500  # dead letters read per round trip
DEAD_MOVE_CHUNK = 500  # dead letters replayed or discarded per script
# payload bytes one script copies at most (one payload larger than this alone): a
# delivery may hold MAX_BATCH_BYTES, and hundreds of those would hold Redis for seconds
CLAIM_BYTES = 8 * 1024 * 1024  # re-sends claimed at once
DEAD_MOVE_BYTES = 8 * 1024 * 1024  # dead letters replayed or discarded per script
PAST = {"replay": "replayed", "discard": "discarded"}


def _score_text(score: float) -> str:
    return str(int(score)) if score.is_integer() else repr(score)


def cursor_of(score: float, delivery_id: bytes) -> str:
    """A dead letter's place in its sorted set, as a paging cursor: "<died ms>:<id>"."""
    return f"{_score_text(score)}:{delivery_id.decode()}"


# what ``_score_text`` writes, in ASCII digits only: float() would also take "1_0",
# " 1", "inf" and other scripts' digits ("\uff11")
_CURSOR_SCORE = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_cursor(cursor: str) -> tuple[float, bytes]:
    """(score, member) of a cursor made by ``cursor_of``; ValueError if it is not one."""
    score, sep, member = cursor.partition(":")
    value = float(score) if _CURSOR_SCORE.fullmatch(score) else math.nan
    try:
        encoded = member.encode()
    except UnicodeEncodeError:  # a lone surrogate: no id holds one
        encoded = b""
    if not sep or not encoded or not math.isfinite(value):
        raise ValueError(f"{cursor[:100]!r} is not a dead-letter cursor (<died ms>:<id>, as "
                         "given with each dead letter)")
    return value, encoded


class RetryStore:
    """The retry schedule (sorted set by due time) and the dead letters."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.k = r, keys
        scripts = resources.files("engine")
        self._claim = r.register_script(scripts.joinpath("retry_claim.lua").read_text("utf-8"))
        self._replay = r.register_script(  # replays and discards
            scripts.joinpath("dead_move.lua").read_text("utf-8"))
        self._index = r.register_script(scripts.joinpath("dead_index.lua").read_text("utf-8"))
        self._page = r.register_script(scripts.joinpath("dead_page.lua").read_text("utf-8"))
        self._handed_back = r.register_script(
            scripts.joinpath("retry_handed_back.lua").read_text("utf-8"))
        self._handed_over = r.register_script(_HANDED_OVER)
        self._uncounted = _Unreadable("hand-over count")
        self._booking = Booking(r, keys.epoch)
        self.clock = RedisClock(r)  # the schedule's: due times and leases (claim_due)
        self.stats = Stats(r, keys)
        self._indexed = False  # dead letters known to be indexed by account and hook

    def schedule(self, delivery: Delivery, due_ms: int, error: str, delivered: int = 0,
                 once: Once | None = None, epoch: bytes | None = None) -> None:
        """Keep ``delivery`` for a re-send at ``due_ms``; ``delivered``: messages of the
        attempt that were delivered (and are no longer in ``delivery``), counted.
        ``once``, ``epoch``: see ``Booking`` (DataLost: nothing kept)."""
        with self._booking(once, epoch) as pipe:
            self._schedule_into(pipe, delivery, due_ms, error)
            if delivered:
                self.stats.add(pipe, delivery.hook_id, "delivered", delivered)

    def schedule_settling(self, items: list[tuple[Delivery, int, str]], once: Once,
                          settle: Callable[[Any], None], epoch: bytes | None) -> None:
        """Keep each ``(delivery, due_ms, error)`` for a re-send and, in the same
        booking, add ``settle(pipe)``'s commands (acknowledging the intake entries
        these deliveries settle): all of it or none of it (none: DataLost, ``epoch``
        not the data's; see ``Booking``)."""
        with self._booking(once, epoch) as pipe:
            for delivery, due_ms, error in items:
                self._schedule_into(pipe, delivery, due_ms, error)
            settle(pipe)

    def _schedule_into(self, pipe: Any, delivery: Delivery, due_ms: int,
                       error: str) -> None:
        delivery.last_error = writable(error[:LAST_ERROR_CHARS])
        pipe.hset(self.k.retry_payload, delivery.id, pack_delivery(delivery))
        pipe.hdel(self.k.retry_unanswered, delivery.id)
        pipe.zadd(self.k.retry, {delivery.id: due_ms})
        self.stats.add(pipe, delivery.hook_id, "retried", delivery.count)

    def claim_due(self, limit: int = 100, now: int | None = None,
                  max_bytes: int = CLAIM_BYTES, epoch: bytes | None = None
                  ) -> list[Delivery]:
        """Up to ``limit`` due re-sends, leased: of at most ``max_bytes`` of payloads
        together, or one larger than that; none while the data's epoch is not
        ``epoch`` (the claimer's hooks are of lost data: its next refresh says)."""
        # by Redis' clock, read in the script: exact, where RedisClock may lag it by a
        # millisecond or two (a replay due "now" would wait for the next claim)
        pairs = self._claim(keys=[self.k.retry, self.k.retry_payload, self.k.epoch],
                            args=["" if now is None else now, RETRY_LEASE_MS, limit,
                                  max_bytes, epoch or b""])
        out = []
        for delivery_id, raw in zip(pairs[::2], pairs[1::2], strict=True):
            if raw is None:  # never the engine's doing: it writes both or neither
                log.warning("scheduled re-send %s had no payload (removed from outside the "
                            "engine: a Redis that evicts keys?); dropped from the schedule",
                            delivery_id.decode())
                continue
            try:
                out.append(unpack_delivery(raw))
            except (msgspec.DecodeError, ValueError) as exc:  # would stall every claim
                self._set_aside(delivery_id.decode(), raw, exc)
        return out

    def _set_aside(self, delivery_id: str, raw: bytes, exc: Exception) -> None:
        """A payload that cannot be decoded (damaged, or written by an incompatible
        version) leaves the schedule for ``retry:unreadable``, with a warning and the
        ``retries_unreadable`` count, instead of being claimed again and again."""
        log.warning("retry payload %s cannot be decoded, set aside: %s: %s",
                    delivery_id, type(exc).__name__, exc)
        with self.r.pipeline() as pipe:
            pipe.zrem(self.k.retry, delivery_id)
            pipe.hdel(self.k.retry_payload, delivery_id)
            pipe.hdel(self.k.retry_unanswered, delivery_id)
            pipe.hset(self.k.retry_unreadable, delivery_id, raw)
            pipe.hincrby(self.k.engine_stats, "retries_unreadable", 1)
            pipe.execute()

    def set_aside(self, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """The re-sends set aside undecoded (``retry:unreadable``), by id, the first
        ``limit`` after the one of id ``after``: ``{"id", "hook_id", "bytes",
        "error"}``, ``hook_id`` as far as it can be read (else None), ``error`` why it
        cannot be decoded now (None: it can, by this version; it may be put back)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**31:
            raise ValueError(f"set_aside_retries: limit must be a whole number from 1 to "
                             f"2**31, got {limit!r}")
        if after is not None and not isinstance(after, str):
            raise ValueError(f"set_aside_retries: after: expected a re-send's id, got "
                             f"{after!r}")
        ids = sorted(i.decode("utf-8", "replace")
                     for i in cast(list[bytes], self.r.hkeys(self.k.retry_unreadable)))
        if after is not None and re.fullmatch(r"[0-9a-f]{32}", after) is None \
                and after not in ids:  # a mistyped cursor would page from anywhere
            raise ValueError(f"set_aside_retries: after: expected a set-aside re-send's "
                             f"id (32 hex digits, as listed), got {after[:80]!r}")
        page = [i for i in ids if after is None or i > after][:limit]
        out = []
        # each may hold MAX_BATCH_BYTES: read DEAD_MOVE_BYTES at a time
        for chunk in _by_bytes(page, self._sizes(self.k.retry_unreadable, page),
                               DEAD_MOVE_BYTES):
            raws = cast(list[bytes | None], self.r.hmget(self.k.retry_unreadable, chunk))
            for delivery_id, raw in zip(chunk, raws, strict=True):
                if raw is None:  # put back or discarded meanwhile
                    continue
                out.append({"id": delivery_id, "hook_id": _head_hook(raw),
                            "bytes": len(raw), "error": _decode_error(raw)})
        return out

    def requeue_set_aside(self, ids: list[str] | None = None) -> int:
        """Put re-sends set aside undecoded back into the schedule, due now (``ids``,
        all or none; None: every one this version decodes), each by the one script
        that removes it (two runs at once put it back once), counted as
        ``retries_requeued``; how many. An unknown id, or one that still cannot be
        decoded, raises ValueError naming it, and nothing is moved."""
        if ids is None:  # each read (to be judged) DEAD_MOVE_BYTES at a time, not all
            # at once: every one may hold MAX_BATCH_BYTES
            every = sorted(k.decode("utf-8", "replace") for k in cast(
                list[bytes], self.r.hkeys(self.k.retry_unreadable)))
            wanted = []
            for chunk in _by_bytes(every, self._sizes(self.k.retry_unreadable, every),
                                   DEAD_MOVE_BYTES):
                raws = cast(list[bytes | None], self.r.hmget(self.k.retry_unreadable, chunk))
                wanted += [i for i, raw in zip(chunk, raws, strict=True)
                           if raw is not None and _decode_error(raw) is None]
        else:
            wanted = list(dict.fromkeys(ids))
            if not wanted:
                return 0
            sizes = self._set_aside_found(wanted, "requeued")
            undecodable = []
            for chunk in _by_bytes(wanted, sizes, DEAD_MOVE_BYTES):
                raws = cast(list[bytes | None], self.r.hmget(self.k.retry_unreadable, chunk))
                undecodable += [i for i, raw in zip(chunk, raws, strict=True)
                                if raw is not None and _decode_error(raw) is not None]
            if undecodable:
                raise ValueError(f"set-aside re-send(s) {', '.join(undecodable[:20])} still "
                                 "cannot be decoded (they would be set aside again); "
                                 "nothing requeued")
        moved = 0
        # a script copies each payload: DEAD_MOVE_BYTES of them at most (1,000 at once
        # of MAX_BATCH_BYTES each held Redis for many seconds)
        for chunk in _by_bytes(wanted, self._sizes(self.k.retry_unreadable, wanted),
                               DEAD_MOVE_BYTES):
            for start in range(0, len(chunk), 1000):
                moved += int(cast(int, self.r.eval(
                    _REQUEUE_RESENDS, 4, self.k.retry_unreadable, self.k.retry_payload,
                    self.k.retry, self.k.engine_stats, *chunk[start:start + 1000])))
        return moved

    def discard_set_aside(self, ids: list[str]) -> int:
        """Delete re-sends set aside undecoded for good (``ids``, all or none), counted
        as ``retries_discarded``; how many. An unknown id raises ValueError naming it,
        and nothing is deleted."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0
        self._set_aside_found(wanted, "discarded")
        done = 0
        for start in range(0, len(wanted), 1000):
            done += int(cast(int, self.r.eval(
                _DISCARD_RESENDS, 2, self.k.retry_unreadable, self.k.engine_stats,
                *wanted[start:start + 1000])))
        return done

    def _set_aside_found(self, ids: list[str], done: str) -> list[int]:
        """The payload size of each set-aside re-send of ``ids`` (not the payloads:
        each may hold MAX_BATCH_BYTES); ValueError naming those that do not exist
        (``done``: what did not happen to any)."""
        sizes = self._sizes(self.k.retry_unreadable, ids)
        empty = [i for i, size in zip(ids, sizes, strict=True) if not size]
        if empty:  # absent, or an empty payload (damaged: it is there)
            with self.r.pipeline(transaction=False) as pipe:
                for delivery_id in empty:
                    pipe.hexists(self.k.retry_unreadable, delivery_id)
                unknown = [i for i, there in zip(empty, pipe.execute(), strict=True)
                           if not there]
        else:
            unknown = []
        if unknown:
            raise ValueError(f"set-aside re-send(s) {', '.join(unknown[:20])} do not exist; "
                             f"nothing {done}")
        return sizes

    def handed_over(self, delivery_ids: list[str]) -> list[int]:
        """Count a re-send of each of ``delivery_ids`` about to be handed to a
        transport: how many were handed over since its last outcome, this one
        included. Any outcome (``schedule``, ``complete``, ``kill``) resets it; a count
        that keeps growing means the worker died during each send."""
        if not delivery_ids:
            return []
        counts, reset = self._handed_over(keys=[self.k.retry_unanswered], args=delivery_ids)
        for delivery_id, error in zip(reset[::2], reset[1::2], strict=True):
            self._uncounted.warn(f"{self.k.retry_unanswered} field "
                                 f"{delivery_id.decode('utf-8', 'replace')}",
                                 error.decode("utf-8", "replace"),
                                 "counted again from 1 with this hand-over")
        return [int(n) for n in counts]

    def handed_back(self, delivery_ids: list[str]) -> None:
        """Take back one hand-over of each of ``delivery_ids`` (its worker stopped
        before an outcome: not a crash)."""
        if delivery_ids:
            self._handed_back(keys=[self.k.retry_unanswered], args=delivery_ids)

    def complete(self, delivery: Delivery, once: Once | None = None,
                 epoch: bytes | None = None) -> None:
        """A re-sent delivery succeeded: forget it and count it delivered (``once``,
        ``epoch``: see ``Booking``)."""
        with self._booking(once, epoch) as pipe:
            pipe.zrem(self.k.retry, delivery.id)
            pipe.hdel(self.k.retry_payload, delivery.id)
            pipe.hdel(self.k.retry_unanswered, delivery.id)
            self.stats.add(pipe, delivery.hook_id, "delivered", delivery.count)

    def kill(self, delivery: Delivery, error: str, delivered: int = 0,
             once: Once | None = None, hook_gone: bool = False,
             epoch: bytes | None = None) -> None:
        """Move a delivery out of the schedule into the dead letters; ``delivered``,
        ``once`` and ``epoch`` as in ``schedule``. ``hook_gone``: its hook was deleted
        (its counters, written again here, go once it has no dead letter:
        ``forget_gone_stats``)."""
        delivery.last_error = writable(error[:LAST_ERROR_CHARS])
        # a replayed letter killed unsent (its hook deleted) shows no -1 re-sends
        delivery.resends = max(delivery.resends, 0)
        # its time of death by Redis' clock, as replay_all's cutoff is: a letter
        # replayed and dead again is then never older than the cutoff of the run that
        # replayed it, however far this worker's clock lags Redis' (one round trip
        # more per dead delivery, a batch: not per message)
        died = self._redis_ms()
        with self._booking(once, epoch) as pipe:
            # the writes that a key damaged from outside (of another type) can fail
            # first, each done again alike by a booking tried again; then what removes
            # it from the schedule; the counts last: a booking that failed half-way
            # (not undone) neither leaves it half-moved nor counts it again each try
            pipe.hset(self.k.dead_payload, delivery.id, pack_delivery(delivery))
            pipe.zadd(self.k.dead, {delivery.id: died})
            pipe.zadd(self.k.dead_of_account(delivery.account_id), {delivery.id: died})
            pipe.zadd(self.k.dead_of_hook(delivery.hook_id), {delivery.id: died})
            # indexed by this version: an index pass need not read its payload
            pipe.zadd(self.k.dead_recent, {delivery.id: died})
            if hook_gone:
                pipe.zadd(self.k.hooks_gone, {str(delivery.hook_id): died})
            pipe.zrem(self.k.retry, delivery.id)
            pipe.hdel(self.k.retry_payload, delivery.id)
            pipe.hdel(self.k.retry_unanswered, delivery.id)
            if delivered:
                self.stats.add(pipe, delivery.hook_id, "delivered", delivered)
            self.stats.add(pipe, delivery.hook_id, "dead_lettered", delivery.count)

    def forget_gone_stats(self, keep_ms: int) -> int:
        """Delete the counters of hooks deleted (or last touched while deleted) over
        ``keep_ms`` ago that have no dead letter left; one that still has some is
        looked at again ``keep_ms`` later. ``keep_ms`` must cover a re-send's wait
        (HOOK_RETRY_PERIOD_SEC): a re-send of a deleted hook, killed when due, marks it
        again. Returns how many counters went (a chunk of GONE_CHUNK hooks at most per
        call)."""
        # dead letters an earlier version kept (also after this one ran): in the hook
        # index first, so that a hook that has some keeps its counters
        self._ensure_index(again=True)
        now = self._redis_ms()
        return int(self.r.eval(_FORGET_GONE, 2, self.k.hooks_gone, self.k.hooks,
                               now - keep_ms, now, GONE_CHUNK, self.k.p))

    def pending(self) -> int:
        return int(self.r.zcard(self.k.retry))

    def _redis_ms(self) -> int:
        """Redis' clock, in milliseconds."""
        return _redis_ms(self.r)

    def dead_letters(self, account_id: int | None = None, hook_id: int | None = None,
                     limit: int = 100, after: str | None = None) -> list[Delivery]:
        """Dead letters, oldest first, optionally of one account or hook, after the
        cursor ``after`` (see ``dead_page``)."""
        return [d for d, _ in self.dead_page(account_id, hook_id, limit, after)]

    def dead_page(self, account_id: int | None = None, hook_id: int | None = None,
                  limit: int = 100, after: str | None = None) -> list[tuple[Delivery, str]]:
        """Dead letters, oldest first, each with its cursor: the next page starts
        after the last one's (``after``), whether or not it is still a dead letter.
        Reads only that account's or hook's index (``{p}:dead:account:*``,
        ``{p}:dead:hook:*``), never the other accounts' dead letters, and only as
        many as ``limit`` takes. A cursor that is not one raises ValueError."""
        start = parse_cursor(after) if after is not None else None
        key = self._dead_index(account_id, hook_id)
        out: list[tuple[Delivery, str]] = []
        for page in self._pages(key, min(max(limit, 50), DEAD_READ_CHUNK), start):
            scores = dict(page)
            ids = [delivery_id for delivery_id, _ in page]
            # a payload may hold MAX_BATCH_BYTES: read DEAD_MOVE_BYTES at a time, and no
            # more than the page needs (one HMGET of a page's payloads held Redis for
            # seconds, every other client waiting)
            for chunk in _by_bytes(ids, self._sizes(self.k.dead_payload, ids),
                                   DEAD_MOVE_BYTES):
                payloads: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
                    self.k.dead_payload, chunk)
                self._prune(key, [i for i, raw in zip(chunk, payloads, strict=True)
                                  if raw is None])
                for delivery_id, raw in zip(chunk, payloads, strict=True):
                    if raw is None:  # replayed meanwhile, or an index entry left behind
                        continue
                    d = self._unpacked(delivery_id, raw)
                    if d is not None and (account_id is None or d.account_id == account_id) \
                            and (hook_id is None or d.hook_id == hook_id):
                        out.append((d, cursor_of(scores[delivery_id], delivery_id)))
                        if len(out) >= limit:
                            return out
        return out

    def _sizes(self, key: str, fields: Sequence[str | bytes]) -> list[int]:
        """The byte sizes of the hash ``key``'s ``fields`` (0: absent), in one round
        trip: what a read of their values would copy."""
        with self.r.pipeline(transaction=False) as pipe:
            for name in fields:
                pipe.hstrlen(key, name)
            return [int(n) for n in pipe.execute()]

    def _prune(self, key: str, ids: list[bytes]) -> None:
        """Of ``ids`` read from the index ``key`` without a payload, those that still
        have none leave it (``_PRUNE_INDEX``): an undecodable dead letter, discarded or
        expired, left its account's and hook's entries, which no read could place."""
        if ids and key != self.k.dead:
            self.r.eval(_PRUNE_INDEX, 2, self.k.dead_payload, key, *ids)

    def _dead_index(self, account_id: int | None, hook_id: int | None) -> str:
        """The sorted set of the hook's dead letters, else the account's, else all
        (those no ``kill`` of this version indexed, indexed first: ``_ensure_index``)."""
        self._ensure_index()
        if hook_id is not None:
            return self.k.dead_of_hook(hook_id)
        if account_id is not None:
            return self.k.dead_of_account(account_id)
        return self.k.dead

    def _pages(self, key: str, size: int, after: tuple[float, bytes] | None = None
               ) -> Iterator[list[tuple[bytes, float]]]:
        """The members of the sorted set ``key`` with their scores, in pages of
        ``size``, oldest first, after (score, member) ``after``: each page starts
        after the last member of the one before (``dead_page.lua``), so members
        removed meanwhile (a replay) make no page skip or repeat others, and many
        members of one score are read once each."""
        while True:
            args: list[str | bytes | int] = [_score_text(after[0]), after[1], size] \
                if after is not None else ["", b"", size]
            flat: list[bytes] = self._page(keys=[key], args=args)
            page = [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]
            if not page:
                return
            yield page
            if len(page) < size:
                return
            after = (page[-1][1], page[-1][0])

    @staticmethod
    def _unpacked(delivery_id: bytes, raw: bytes) -> Delivery | None:
        """A dead letter's delivery; None (with a warning) for a payload that cannot
        be decoded, which is left where it is for inspection."""
        try:
            return unpack_delivery(raw)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("dead letter %s cannot be decoded, skipped: %s",
                        delivery_id.decode(errors="replace"), exc)
            return None

    def _ensure_index(self, again: bool = False) -> None:
        """Index by account and hook the dead letters that no ``kill`` of this version
        indexed: those kept by a version without these indexes, also one run after
        this one (a roll-back, then this version again). ``{p}:dead:indexed`` holds a
        watermark: a time of death (ms) up to which every dead letter is indexed. A
        pass indexes those that died after it, then moves it to the pass's start by
        Redis' clock less DEAD_INDEX_SKEW_MS (one written meanwhile by a worker whose
        clock lags Redis' less than that is above it: the next pass takes it). A pass
        runs at a process's first read and, ``again``, at each call (the retry
        worker's, every minute: ``forget_gone_stats``), so it reads the dead letters
        of the last minutes, not all of them (but the first: none marked, or an
        earlier version's mark, ``1``)."""
        if self._indexed and not again:
            return
        started = self._redis_ms()
        mark = self._watermark()
        if mark is None and (total := int(self.r.zcard(self.k.dead))):
            log.info("indexing %d dead letters by account and hook", total)
        added = 0
        for scored in self._pages(self.k.dead, DEAD_READ_CHUNK,
                                  None if mark is None else (mark, b"")):
            ids = [delivery_id for delivery_id, _ in scored]
            if mark is not None:  # those this version's ``kill`` indexed: not read
                known = cast(list[float | None], self.r.zmscore(self.k.dead_recent, cast(Any, ids)))
                ids = [i for i, died in zip(ids, known, strict=True) if died is None]
                if not ids:
                    continue
            with self.r.pipeline(transaction=False) as pipe:  # sizes, not payloads
                for delivery_id in ids:
                    pipe.hstrlen(self.k.dead_payload, delivery_id)
                sizes = [int(n) for n in pipe.execute()]
            # a payload may hold MAX_BATCH_BYTES: read DEAD_MOVE_BYTES at a time
            for chunk in _by_bytes([i.decode() for i in ids], sizes, DEAD_MOVE_BYTES):
                payloads: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
                    self.k.dead_payload, chunk)
                keys = _KeyPlaces([self.k.dead])
                args: list[Any] = []
                for letter, raw in zip(chunk, payloads, strict=True):
                    # one that cannot be decoded is skipped by the listings (with a
                    # warning there), not indexed
                    if raw is not None and (d := _decoded(raw)) is not None:
                        args += [letter, keys.place(self.k.dead_of_account(d.account_id)),
                                 keys.place(self.k.dead_of_hook(d.hook_id))]
                if args:  # only those still dead letters: a replay may have run meanwhile
                    added += int(self._index(keys=keys.keys, args=args))
        if added and mark is not None:
            log.warning("indexed %d dead letter(s) by account and hook that were not (kept "
                        "by a hookray version without these indexes, run since this one?)",
                        added)
        self.r.eval(_RAISE_MARK, 2, self.k.dead_indexed, self.k.dead_recent,
                    started - DEAD_INDEX_SKEW_MS)
        self._indexed = True

    def _watermark(self) -> float | None:
        """The time of death up to which every dead letter is indexed (``1``, an earlier
        version's mark that they were once: all are looked at again); None when none
        is kept, or what is kept is no number."""
        raw = cast(bytes | None, self.r.get(self.k.dead_indexed))
        try:
            mark = float(raw) if raw is not None else None
        except ValueError:
            return None
        return mark if mark is not None and math.isfinite(mark) else None

    def _move_args(self, mode: str, letters: list[tuple[str, bytes, Delivery]],
                   latest: float | None = None) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``dead_move.lua`` for dead letters (id, payload read, its
        delivery), those that died after ``latest`` (when given) left where they are:
        each id with its payload's SHA-1, its new payload (replay: re-sends reset),
        the places in KEYS of its account's and hook's index and its hook's stats, its
        message count and its hook's id (a replay marks a deleted one again)."""
        if mode not in PAST:
            raise ValueError(f"mode: {mode!r} is neither 'replay' nor 'discard'")
        keys = _KeyPlaces([self.k.dead, self.k.dead_payload, self.k.retry, self.k.retry_payload,
                           self.k.hooks, self.k.hooks_gone])
        # replayed due now by Redis' clock, which the claims go by (a machine the
        # operator replays from may run an hour ahead)
        args: list[Any] = [mode, self._redis_ms() if mode == "replay" else 0,
                           "" if latest is None else _score_text(float(latest))]
        for delivery_id, raw, delivery in letters:
            # the replay's send is not a re-send: as a new delivery, it is sent once,
            # then up to HOOK_RETRY_TIMES times again (with 0 resends, it was one less)
            delivery.resends = -1
            delivery.restarts = 0  # and its transport restarts, as a new delivery's
            args += [delivery_id, hashlib.sha1(raw).hexdigest(),
                     pack_delivery(delivery) if mode == "replay" else b"",
                     keys.place(self.k.dead_of_account(delivery.account_id)),
                     keys.place(self.k.dead_of_hook(delivery.hook_id)),
                     keys.place(self.k.stats(delivery.hook_id)), delivery.count,
                     str(delivery.hook_id)]
        return keys.keys, args

    def replay(self, ids: Iterable[str]) -> int:
        """Put dead letters back on the schedule, due now, sent as a new delivery is
        (once, then up to HOOK_RETRY_TIMES re-sends).
        An unknown id raises NotFound before anything is moved. The move is one
        script per DEAD_MOVE_BYTES of payloads (one, unless the letters are large)
        that first checks every payload is still the one read: a replay of the same
        ids running meanwhile moves them once, and the other finds them gone."""
        return self._move("replay", list(dict.fromkeys(ids)))

    def discard(self, ids: Iterable[str]) -> int:
        """Delete dead letters for good; their messages are counted as ``discarded``
        in their hooks' stats. The same rules as ``replay``: an unknown id raises
        NotFound and nothing is discarded; one script, that checks every payload is
        still the one read. One that cannot be decoded (damaged, or of another
        version: no replay can send it) is deleted too, counted as the engine's
        ``dead_letters_unreadable_discarded`` (its hook is unknown), after the others."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0
        with self.r.pipeline(transaction=False) as pipe:  # sizes, not payloads
            for delivery_id in wanted:
                pipe.hstrlen(self.k.dead_payload, delivery_id)
            sizes = [int(n) for n in pipe.execute()]
        missing = [i for i, size in zip(wanted, sizes, strict=True) if not size]
        if missing:
            raise _not_found(missing)
        # those no replay could send, found a chunk of DEAD_MOVE_BYTES at a time
        unreadable: dict[str, bytes] = {}
        for chunk in _by_bytes(wanted, sizes, DEAD_MOVE_BYTES):
            raw: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
                self.k.dead_payload, chunk)
            unreadable.update((i, payload) for i, payload in zip(chunk, raw, strict=True)
                              if payload is not None and not _decodes(payload))
        done = self._move("discard", [i for i in wanted if i not in unreadable])
        for delivery_id, payload in unreadable.items():
            done += self._drop_unreadable(delivery_id, payload)
        return done

    def _drop_unreadable(self, delivery_id: str, payload: bytes,
                         why: str = "asked") -> int:
        """Delete an undecodable dead letter if its payload is still ``payload`` (its
        account's and hook's index entries, unknown here, leave at the next read of
        those indexes: ``_prune``)."""
        log.warning("dead letter %s cannot be decoded; discarded: %s", delivery_id, why)
        return int(self.r.eval(_DROP_UNREADABLE, 3, self.k.dead_payload, self.k.dead,
                               self.k.engine_stats, delivery_id, payload))

    def replay_all(self, account_id: int | None = None, hook_id: int | None = None,
                   progress: Callable[[int], None] | None = None) -> int:
        """``replay`` every dead letter (of an account, of a hook) kept when it
        starts, in chunks of DEAD_MOVE_CHUNK letters and DEAD_MOVE_BYTES of payloads,
        each chunk one script: Redis is never held up by one long script, and nothing
        is read whole into memory. One
        dead-lettered again meanwhile is not taken twice. ``progress(n)`` is called
        after each chunk with the number moved so far."""
        return self._move_all("replay", account_id, hook_id, progress)

    def discard_all(self, account_id: int | None = None, hook_id: int | None = None,
                    progress: Callable[[int], None] | None = None) -> int:
        """``discard`` every dead letter (of an account, of a hook) kept when it
        starts, in chunks as ``replay_all``."""
        return self._move_all("discard", account_id, hook_id, progress)

    def expire(self, retention_ms: int, budget_sec: float) -> tuple[int, bool]:
        """Discard the dead letters that died more than ``retention_ms`` ago by Redis'
        clock (DEAD_LETTER_RETENTION_HOURS), oldest first, counted as ``discarded`` in
        their hooks' stats (one that cannot be decoded: as
        ``dead_letters_unreadable_discarded``), in chunks as ``discard_all``, for about
        ``budget_sec`` at most: (how many, whether none past the retention is left)."""
        cutoff = self._redis_ms() - retention_ms
        deadline = time.monotonic() + budget_sec
        done = 0
        for page in self._pages(self.k.dead, DEAD_MOVE_CHUNK):
            due = [m.decode() for m, score in page if score <= cutoff]
            if due:
                unreadable: list[tuple[str, bytes]] = []
                # one replayed and dead again since the page was read is kept
                done += self._move("discard", due, strict=False, unreadable=unreadable,
                                   latest=cutoff)
                for delivery_id, payload in unreadable:
                    done += self._drop_unreadable(delivery_id, payload, "it is past "
                                                  "DEAD_LETTER_RETENTION_HOURS")
            if len(due) < len(page):
                return done, True
            if time.monotonic() >= deadline:
                return done, False
        return done, True

    def _move_all(self, mode: str, account_id: int | None, hook_id: int | None,
                  progress: Callable[[int], None] | None) -> int:
        key = self._dead_index(account_id, hook_id)
        # those dead when it starts, by Redis' clock: one dead-lettered again after its
        # replay dies later than this (kill reads Redis' clock too) and is not taken
        # again (the run ends). Letters that died before kill did so were scored by
        # their worker's clock: the newest one's counts too, so a worker clock ahead of
        # Redis' leaves none of those dead at the start behind
        started = self._redis_ms()
        newest = cast(list[tuple[bytes, float]], self.r.zrange(key, -1, -1, withscores=True))
        cutoff = max(started, newest[0][1] if newest else 0)
        # nothing moves within the millisecond of the start: one this run moves, dead
        # again within that millisecond, would score no later than the cutoff (a few
        # tries at most: a Redis clock set back does not hold the run)
        for _ in range(20):
            if self._redis_ms() > started:
                break
            time.sleep(0.0005)
        done = 0
        # a cursor walk (dead_page.lua): ids moved meanwhile by another run, and
        # those left where they are (undecodable, another account's), are passed
        # over, never read again: each script takes at most DEAD_MOVE_CHUNK
        for page in self._pages(key, DEAD_MOVE_CHUNK):
            due = [(m, score) for m, score in page if score <= cutoff]
            if due and key != self.k.dead:  # entries without a letter, left behind
                with self.r.pipeline(transaction=False) as pipe:
                    for m, _ in due:
                        pipe.hexists(self.k.dead_payload, m)
                    self._prune(key, [m for (m, _), there in zip(due, pipe.execute(),
                                                                 strict=True) if not there])
            if due:
                done += self._move(mode, [m.decode() for m, _ in due], account_id,
                                   hook_id, strict=False, before=done, latest=cutoff)
                if progress is not None:
                    progress(done)
            if len(due) < len(page):
                return done
        return done

    def _move(self, mode: str, ids: list[str], account_id: int | None = None,
              hook_id: int | None = None, strict: bool = True, before: int = 0,
              unreadable: list[tuple[str, bytes]] | None = None,
              latest: float | None = None) -> int:
        """How many of ``ids`` ``dead_move.lua`` moved, a script per DEAD_MOVE_BYTES
        of payloads. ``strict``: a missing or undecodable id raises NotFound and
        nothing moves; else such ids, and those not of ``account_id``/``hook_id``,
        are left where they are, as are those that died after ``latest``. An error
        after a chunk moved (one changing meanwhile, REPLAY_TRIES times) says how many
        moved (``before``: how many the caller moved before this call), as they stay
        so."""
        if not ids:
            return 0
        with self.r.pipeline(transaction=False) as pipe:
            for delivery_id in ids:
                pipe.hstrlen(self.k.dead_payload, delivery_id)
            sizes = [int(n) for n in pipe.execute()]
        if strict:
            missing = [i for i, size in zip(ids, sizes, strict=True) if not size]
            if missing:
                raise _not_found(missing)
        chunks = list(_by_bytes(ids, sizes, DEAD_MOVE_BYTES))
        if strict and len(chunks) > 1:  # all or none: each one decodes before any moves
            self._check_decodable(chunks)
        done = 0
        for chunk in chunks:
            try:
                done += self._move_chunk(mode, chunk, account_id, hook_id, strict,
                                         unreadable, latest)
            except (NotFound, Conflict) as exc:
                if before + done:
                    raise type(exc)(f"{exc} ({before + done} dead letter(s) {PAST[mode]} "
                                    "before this stay so)") from None
                raise
        return done

    def _check_decodable(self, chunks: list[list[str]]) -> None:
        """NotFound for the first dead letter of ``chunks`` that is gone or cannot be
        decoded (read a chunk at a time, none kept)."""
        for chunk in chunks:
            payloads: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
                self.k.dead_payload, chunk)
            for delivery_id, raw in zip(chunk, payloads, strict=True):
                if raw is None:  # gone meanwhile
                    raise _not_found([delivery_id])
                try:
                    unpack_delivery(raw)
                except (msgspec.DecodeError, ValueError):
                    raise _undecodable(delivery_id) from None

    def _move_chunk(self, mode: str, ids: list[str], account_id: int | None,
                    hook_id: int | None, strict: bool,
                    unreadable: list[tuple[str, bytes]] | None = None,
                    latest: float | None = None) -> int:
        """``_move`` of ids whose payloads one script may copy, tried again while some
        change between the read and the script; (id, payload) of those that cannot be
        decoded go to ``unreadable`` (not strict)."""
        for _ in range(REPLAY_TRIES):
            bad: list[tuple[str, bytes]] = []
            payloads: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
                self.k.dead_payload, ids)
            if strict:
                missing = [i for i, raw in zip(ids, payloads, strict=True) if raw is None]
                if missing:
                    raise _not_found(missing)
            good: list[tuple[str, bytes, Delivery]] = []
            for delivery_id, raw in zip(ids, payloads, strict=True):
                try:
                    d = unpack_delivery(raw) if raw is not None else None
                except (msgspec.DecodeError, ValueError):
                    if strict:
                        raise _undecodable(delivery_id) from None
                    bad.append((delivery_id, cast(bytes, raw)))
                    d = None
                if d is not None and (account_id is None or d.account_id == account_id) \
                        and (hook_id is None or d.hook_id == hook_id):
                    good.append((delivery_id, cast(bytes, raw), d))
            if not good:
                if unreadable is not None:
                    unreadable += bad
                return 0
            keys, args = self._move_args(mode, good, latest)
            moved, *changed = self._replay(keys=keys, args=args)
            if not changed:  # else nothing moved: read them again
                if unreadable is not None:
                    unreadable += bad
                return int(moved)
        raise Conflict(f"dead letters changed during {REPLAY_TRIES} {mode} attempts "
                       f"(dead-lettered again meanwhile?): {len(changed)} of them; try again")
