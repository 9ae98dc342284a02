"""Whether the engine's workers are running, seen from Redis alone.

Each partition worker and the retry worker mark ``{p}:alive:<worker>`` with the time
of a round at most every BEAT_SEC seconds, the mark expiring after ALIVE_SEC: a
worker whose mark is there ran a round lately. A worker that loops but processes
nothing until an operator acts (a stored hook that no longer validates) says why in
its mark (``<ms> <reason>``), at once when that starts or ends. ``engine_health``
reads the marks of the partitions the engine recorded (``{p}:config``) and of the
retry worker, so the HTTP API and the driver can say whether accepted events are
being processed without asking Ray.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, cast

import redis

from engine.errors import HookError, PrefixTaken
from engine.keys import Keys, recorded_partitions
from engine.settings import without_retries

log = logging.getLogger("hookray")

def quick_client(r: redis.Redis, seconds: float) -> redis.Redis:
    """A client of the same Redis as ``r`` whose calls (and connects) give up after
    ``seconds``: a probe, or a stop's last writes, must not wait on a hung Redis for
    ``r``'s own timeout. Close it after use."""
    pool = r.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": seconds,
              "socket_connect_timeout": seconds}
    return without_retries(redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **kwargs)))


BEAT_SEC = 1.0  # a running worker marks itself at most this often
ALIVE_SEC = 15  # and counts as running for this long after
REASON_CHARS = 500  # of a waiting worker's reason, kept in its mark
# failed rounds in a row after which a worker is shown waiting, with the last error
FAILING_ROUNDS = 10  # more than MAX_ENTRY_FAILURES: a poison entry is set aside first
REPEAT_SEC = 60.0  # a log line said again within this long is counted, not said
REPEATS_KEPT = 1_000  # lines remembered by one Repeats (distinct lines past it: forgotten)


class Heartbeat:
    """One worker's mark; ``beat`` after each round (errors are the caller's)."""

    def __init__(self, r: redis.Redis, keys: Keys, worker: str) -> None:
        self.r = r
        self.key = keys.alive(worker)
        self.last = 0.0
        self.waiting = ""  # as last marked

    def beat(self, waiting: str = "") -> None:
        """Mark a round; ``waiting``: why the worker processes nothing now ("" when it
        does). A change of that is marked at once, not BEAT_SEC later."""
        now = time.monotonic()
        waiting = " ".join(waiting.split())[:REASON_CHARS]
        # an error's text may hold what no UTF-8 holds (a lone surrogate): Redis would
        # refuse the mark, and the worker's loop end on it
        waiting = waiting.encode("utf-8", "backslashreplace").decode()
        if now - self.last >= BEAT_SEC or waiting != self.waiting:
            mark = f"{int(time.time() * 1000)} {waiting}".rstrip()
            self.r.set(self.key, mark, ex=ALIVE_SEC)
            self.last, self.waiting = now, waiting


class Repeats:
    """Which log lines were said lately, so that one cause is not said over and over:
    a loop that fails twice a second, or an API answering hundreds of requests a second
    while Redis is down, would otherwise fill the log with the same line. ``due(key)``
    for each line about to be said, keyed by what it says (an error's type and
    message): the first is said, the same again at most once every ``every`` seconds,
    with how often it came meanwhile. Thread-safe (the API's requests run on several
    threads)."""

    def __init__(self, every: float = REPEAT_SEC) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (said at, unsaid since)
        self._lock = threading.Lock()

    def due(self, key: str) -> int | None:
        """None: leave the line unsaid (said less than ``every`` seconds ago; counted).
        Else say it: 0 when new (or not seen since it was last said), else how many
        times it came, unsaid, since it was last said."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.every:
                self._seen[key] = (seen[0], seen[1] + 1)
                return None
            if seen is None and len(self._seen) >= REPEATS_KEPT:
                # lines of many causes (each naming an id): those said long ago go first
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every}
                if len(self._seen) >= REPEATS_KEPT:
                    self._seen.clear()
            self._seen[key] = (now, 0)
            return 0 if seen is None else seen[1]


def repeated(times: int) -> str:
    """What a line said again adds: how often its cause came, unsaid, since it was last
    said (``Repeats.due``)."""
    return f" (also {times} time{'s' * (times != 1)} since it was last logged, not logged)" \
        if times else ""


class RoundFailures:
    """What a worker's loop makes of its failed rounds: the reason its heartbeat
    gives for processing nothing (``waiting``) and the log. A hook that does not
    validate, or a claim on the prefix another engine took, makes it wait at once;
    any other error, once FAILING_ROUNDS rounds in a row failed (``hookray health``
    shows the error): a worker that fails every round does not run, whatever its
    loop. Only a round that passes ends the waiting.

    The log is this class's alone (the actor running the loop says nothing more):
    each error, by type and message, is said once (with its traceback, unless it is
    a Redis error or a wait for an operator), then at most once every REPEAT_SEC
    with how often it came since: a loop fails twice a second for as long as its
    cause lasts."""

    def __init__(self, who: str, waits_for: str) -> None:
        self.who = who  # "partition 3", "retry worker"
        self.waits_for = waits_for  # "no event is processed", "nothing is re-sent"
        self.in_a_row = 0
        self.waiting = ""
        self.said = Repeats()

    def passed(self) -> None:
        self.in_a_row = 0
        self.waiting = ""

    def failed(self, exc: Exception) -> None:
        self.in_a_row += 1
        times = self.said.due(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, HookError | PrefixTaken):
            if times is not None:
                log.error("%s: waiting, %s until this is fixed: %s%s", self.who,
                          self.waits_for, exc, repeated(times))
            self.waiting = str(exc)
            return
        if times is None:
            pass
        elif isinstance(exc, redis.RedisError):  # its traceback says nothing more
            log.warning("%s: a round failed, Redis: %s: %s (retrying)%s", self.who,
                        type(exc).__name__, exc, repeated(times))
        elif times == 0:
            log.error("%s: a round failed", self.who, exc_info=exc)
        else:  # its traceback was logged with its first
            log.error("%s: a round failed again, %s: %s%s", self.who, type(exc).__name__,
                      exc, repeated(times))
        if self.in_a_row >= FAILING_ROUNDS:
            self.waiting = (f"every round fails ({FAILING_ROUNDS} or more in a row), the "
                            f"last with {type(exc).__name__}: {exc}")
        # else: what it waited for still holds until a round passes


def _reason(mark: bytes | str) -> str:
    """The waiting reason in a mark ("" for a worker that processes)."""
    text = mark.decode("utf-8", "replace") if isinstance(mark, bytes) else mark
    return text.partition(" ")[2]


def engine_health(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """``{"partitions": {"expected", "running", "waiting": [{"partition", "reason"}],
    "stopped": [n, ...]}, "retry_running", "retry_waiting"}``: ``expected`` is the
    engine's recorded PARTITIONS (None before an engine first started on this prefix);
    a worker runs when it marked itself in the last ALIVE_SEC seconds; ``running``
    counts the partitions that run and process events, ``waiting`` those that run but
    wait for an operator (why: ``reason``), ``stopped`` those that do not run.
    ``retry_waiting``: why the running retry worker re-sends nothing, else null."""
    expected = recorded_partitions(r.hget(keys.config, "partitions"), keys.config)
    names = [f"partition:{n}" for n in range(expected or 0)] + ["retry"]
    marks = r.mget([keys.alive(name) for name in names])
    stopped = [n for n, mark in enumerate(marks[:-1]) if mark is None]
    waiting = [{"partition": n, "reason": reason} for n, mark in enumerate(marks[:-1])
               if mark is not None and (reason := _reason(mark))]
    retry = marks[-1]
    return {"partitions": {"expected": expected,
                           "running": (expected or 0) - len(stopped) - len(waiting),
                           "waiting": waiting, "stopped": stopped},
            "retry_running": retry is not None,
            "retry_waiting": (_reason(retry) or None) if retry is not None else None}


def redis_full(r: redis.Redis) -> str | None:
    """What to say of a Redis at its maxmemory (its refusals include the workers' marks
    that they run: they may be running, and delivering, all the same), or None (also
    when the server does not say)."""
    try:
        memory = cast(dict[str, Any], r.info("memory"))
        used, most = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    except (redis.RedisError, ValueError, TypeError):
        return None
    if not most or used < most:
        return None
    return (f"Redis is at its maxmemory ({most} bytes): it refuses the "
            "workers' marks that they run (those shown stopped may be delivering: they "
            "make room as they acknowledge), the hooks' counts wait, and nothing new is "
            "accepted; give Redis more memory")


def cluster_mode(r: redis.Redis) -> str | None:
    """Why the engine cannot use this Redis, or None: a Redis Cluster node answers only
    for its own hash slots, and the engine's transactions and scripts span keys of many
    slots (a partition's stream, its bookkeeping, the retry schedule). None too when
    the server does not say (INFO disabled)."""
    try:
        enabled = r.info("cluster").get("cluster_enabled")
    except redis.ResponseError:
        return None
    if enabled in (1, "1"):
        return ("this Redis is a Redis Cluster node (cluster_enabled:1): hookray needs a "
                "standalone Redis (a primary, with replicas if wanted), as its scripts and "
                "transactions span keys of many hash slots")
    return None


MIN_REDIS_VERSION = (6, 2)  # XPENDING's IDLE (the orphan check), LPOS (bookings)


def too_old(r: redis.Redis) -> str | None:
    """Why the engine cannot use this Redis's version, or None (also when the server
    does not say: INFO disabled, or a version that is no dotted number)."""
    try:
        version = str(r.info("server").get("redis_version", ""))
    except redis.ResponseError:
        return None
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdecimal() for p in parts[:2]):
        return None
    if (int(parts[0]), int(parts[1])) < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        return (f"this Redis is version {version}: hookray needs {need} or later (its "
                "intake reads use XPENDING's IDLE option and its bookings LPOS)")
    return None


POLICY_UNREAD = (
    "could not read Redis' maxmemory-policy (INFO and CONFIG are refused to the engine's "
    "user, or renamed): make sure it is noeviction, else Redis may drop accepted events, "
    "retries and dead letters when it runs out of memory")


def read_policy(r: redis.Redis) -> str | None:
    """This Redis' ``maxmemory-policy``, or None when the server does not say. Read
    from ``INFO memory`` (which managed services keep), else from CONFIG."""
    policy: Any = None
    with contextlib.suppress(redis.ResponseError):  # INFO renamed or denied
        policy = cast(dict[str, Any], r.info("memory")).get("maxmemory_policy")
    if policy is None:
        try:
            policy = r.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG disabled, as on managed services
            return None
    if isinstance(policy, bytes):
        policy = policy.decode("utf-8", "replace")
    return policy if isinstance(policy, str) else None


def eviction_policy(r: redis.Redis) -> str | None:
    """This Redis' ``maxmemory-policy`` when it is not ``noeviction`` (Redis may then
    evict keys on its own), else None; None too when the server does not say
    (``read_policy``)."""
    policy = read_policy(r)
    return policy if policy != "noeviction" else None


def eviction_risk(r: redis.Redis) -> str | None:
    """Why this Redis may drop accepted work on its own, or None: a ``maxmemory-policy``
    other than ``noeviction`` evicts keys when memory runs short (``allkeys-*`` any:
    intake streams, retry schedules, dead letters, hooks; ``volatile-*`` those with a
    TTL: message content, sent without it then, the engine's claim on its prefix, and
    publish receipts). None too when the server does not say (neither INFO nor CONFIG
    answers: ``POLICY_UNREAD`` is for the engine's start to say then)."""
    policy = eviction_policy(r)
    if policy is None:
        return None
    if policy.startswith("allkeys-"):
        return (f"Redis evicts any key when it runs out of memory (maxmemory-policy "
                f"{policy}): accepted events, retries and dead letters could be dropped; "
                "use noeviction for the engine's Redis")
    return (f"Redis evicts keys with a TTL when it runs out of memory (maxmemory-policy "
            f"{policy}): stored message content could be dropped (messages then go "
            "without it), and so could the engine's claim on its REDIS_PREFIX (another "
            "engine could take it meanwhile) and publish receipts (a publish tried again "
            "after its reply was lost could be written twice); use noeviction for the "
            "engine's Redis")


EVICTIONS_READ_SEC = 60.0  # how often the retry worker reads Redis' count of evictions


class EvictionWatch:
    """Redis' count of keys it evicted (``INFO stats``: ``evicted_keys``), read at most
    every EVICTIONS_READ_SEC: an ERROR when it grew. The policy is warned of at the
    engine's start (``eviction_risk``); this says that Redis did evict, which may have
    dropped accepted events, re-sends or dead letters (``allkeys-*``), or message
    content, the prefix claim and publish receipts (``volatile-*``)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.seen: int | None = None  # the count last read
        self.read_at = -float("inf")

    def check(self) -> str | None:
        """What was logged, if anything."""
        now = time.monotonic()
        if now - self.read_at < EVICTIONS_READ_SEC:
            return None
        self.read_at = now
        try:
            count = cast(dict[str, Any], self.r.info("stats")).get("evicted_keys")
        except redis.RedisError:  # down, or INFO refused (warned of at the start)
            return None
        if not isinstance(count, int):
            return None
        before, self.seen = self.seen, count
        if before is None or count <= before:  # (less: Redis restarted, or CONFIG RESETSTAT)
            return None
        policy = read_policy(self.r) or "unknown"
        said = (f"Redis evicted {count - before} key(s) since it was last asked, "
                f"{EVICTIONS_READ_SEC:g} s or more ago (maxmemory-policy {policy}, at its "
                "maxmemory): if they were the engine's, "
                + ("accepted events, re-sends, dead letters or hooks may be lost"
                   if policy.startswith("allkeys-") else
                   "message content may be gone (messages go without it), and the "
                   "engine's claim on its REDIS_PREFIX or publish receipts")
                + "; give Redis more memory and use maxmemory-policy noeviction")
        log.error("%s", said)
        return said
