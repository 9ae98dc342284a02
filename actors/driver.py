"""Python driver API: start a local engine or connect to a running one.

    from actors.driver import Engine

    engine = Engine.start(config="main.json")          # local Ray + actors
    hook = engine.create_hook({...})                    # validated, id assigned
    engine.publish([{"event_type": "click", ...}])      # accepted once in Redis
    engine.stats(hook.id)
    engine.shutdown()

Most calls talk to Redis only (hooks, events, content, names, profiles, stats,
dead letters), so ``Engine.connect`` works from any process that reaches the
engine's Redis; starting and stopping actors needs Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from engine.catalogue import load_catalogue
from engine.errors import ConfigError, HookError, NotFound, PrefixTaken
from engine.events import MAX_ID, Event, is_account_id
from engine.health import (
    POLICY_UNREAD,
    cluster_mode,
    engine_health,
    eviction_risk,
    quick_client,
    read_policy,
    too_old,
)
from engine.hooks import Hook, not_utf8
from engine.intake import Intake, PublishResult, SetAside
from engine.keys import Keys, recorded_partitions
from engine.lease import EngineLease, Renewer
from engine.settings import (
    Settings,
    engine_redis,
    load_settings,
    ray_address_problem,
    with_overrides,
    without_retries,
)
from engine.stores import (
    STAT_FIELDS,
    ContentStore,
    HookRegistry,
    NameStore,
    ProfileStore,
    RetryStore,
    Stats,
    hook_etag,
)
from engine.testevent import send_test_event
from engine.transports.base import Delivery, Outcome, available_kinds

log = logging.getLogger("hookray")

# longest the driver waits for the Ray cluster of RAY_ADDRESS to answer (ray.init would
# try again for many minutes, silently, at an address where no Ray runs)
RAY_CONNECT_TIMEOUT_SEC = 10.0
# Engine.shutdown waits this long in all for its actors to stop (the API's requests,
# the workers' rounds, the transports' connections), then kills what is left: with
# Ray's own stop after it, within `ray job stop`'s 30 s (deploy/README.md)
STOP_SEC = 20.0
START_SEC = 120.0  # the actors' start may take this long (and 2 s more per actor)

# Ray started by an Engine of this process, and how many Engines use it: Ray is shut
# down with the last of them, not under the feet of the others
_ray = {"started_here": False, "users": 0}


@dataclass
class DeadLetter:
    id: str
    hook_id: int
    account_id: int
    kind: str
    messages: int
    resends: int
    last_error: str
    message_ids: list[str]
    cursor: str = ""  # its place: dead_letters(after=cursor) goes on after it
    created_ms: int = 0  # when its first attempt was made (unix ms), as the API gives it
    last_attempt_ms: int = 0  # when its last attempt failed (unix ms)

    @classmethod
    def of(cls, d: Delivery, cursor: str = "") -> DeadLetter:
        return cls(d.id, d.hook_id, d.account_id, d.kind, d.count, d.resends, d.last_error,
                   list(d.message_ids), cursor, d.created_ms, d.last_attempt_ms)


def _started(actors: list[Any]) -> None:
    """Wait for ``actors`` to answer, a few minutes at most (more for many): a process
    Ray cannot start (a node out of memory, a worker that cannot import the code) would
    otherwise hold the start, the prefix claimed, for ever."""
    import ray

    wait = START_SEC + 2 * len(actors)
    try:
        ray.get([a.ping.remote() for a in actors], timeout=wait)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"the engine's actors did not all answer within {wait:.0f} s of "
                          "their start: Ray could not start their processes? (`ray status`, "
                          "and the Ray logs of the workers, say why)") from None


def finish_all(refs: list[Any], timeout: float, what: str,
               results: list[Any] | None = None) -> int:
    """Wait up to ``timeout`` for every call of ``refs``, however many of them fail (a
    ``ray.get`` of the list returns at the first failure, and the others would be
    killed mid-call); each failure, and the calls still running, are logged. Returns
    how many finished without an error; their values go to ``results``."""
    import ray

    try:
        ready, running = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    except Exception as exc:  # Ray gone
        log.warning("%s: %s", what, _first_line(exc))
        return 0
    done = 0
    for ref in ready:
        try:
            value = ray.get(ref, timeout=0)
            done += 1
            if results is not None:
                results.append(value)
        except Exception as exc:  # the actor died, or its call raised
            log.warning("%s: %s", what, _first_line(exc))
    if running:
        log.warning("%s: %d of %d did not finish within %.0f s", what, len(running),
                    len(refs), timeout)
    return done


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``; of an error raised inside a call (RayTaskError, whose
    own first line is the task's name), the error raised there."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Engine:
    """A handle on one hookray engine (its Redis, and its actors when started here)."""

    def __init__(self, settings: Settings, r: redis.Redis | None = None) -> None:
        if r is None and not settings.REDIS_URL:
            raise ConfigError("REDIS_URL is empty: only `hookray demo` starts a Redis of its "
                              "own; set REDIS_URL to the engine's Redis")
        self.settings = settings
        # as the workers': a Redis gone from the network without a reset fails a call
        # after 30 s, not after the kernel's ~15 min (a REDIS_URL's own options win)
        self.redis = without_retries(r) if r is not None else engine_redis(
            settings.REDIS_URL, socket_timeout=30, health_check_interval=30)
        self.keys = Keys(settings.REDIS_PREFIX)
        self.catalogue = load_catalogue(settings.EVENT_TYPES_FILE)
        self.hooks = HookRegistry(self.redis, self.keys, self.catalogue,
                                  settings.DESTINATION_DENY, settings.MAX_HOOKS_PER_ACCOUNT)
        self.intake = Intake(self.redis, self.keys, settings.PARTITIONS,
                             settings.INTAKE_MAX_BATCH, self.catalogue,
                             settings.INTAKE_MAX_ENTRIES)
        self.retry = RetryStore(self.redis, self.keys)
        self._stats = Stats(self.redis, self.keys)
        self._names = NameStore(self.redis, self.keys)
        self._profiles = ProfileStore(self.redis, self.keys)
        self._content = ContentStore(self.redis, self.keys,
                                     settings.content_ttl_sec)
        self.actors: dict[str, Any] = {}
        # the prefix's claim while actors started here run, renewed by this process
        # (its actors live as long as it does: they are not detached)
        self.lease: EngineLease | None = None
        self._renewer: Renewer | None = None
        self._uses_ray = False  # counted in _ray["users"]
        self.api: Any = None  # the HTTP API actor, when started here
        self.api_url: str | None = None

    # --- life cycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, settings: Settings | None = None, *, config: str | None = None,
              ray_address: str | None = None, **overrides: Any) -> Engine:
        """Start the engine's actors on Ray (the cluster of ``ray_address`` or
        RAY_ADDRESS, else a local Ray), claiming REDIS_PREFIX; also the HTTP API when
        API_PORT is set."""
        settings = _settings(settings, config, overrides)
        engine = cls(settings)
        try:
            engine._check_redis()
            if (risk := eviction_risk(engine.redis)) is not None:
                log.warning("%s", risk)
            elif read_policy(engine.redis) is None:
                log.warning("%s", POLICY_UNREAD)
            engine._start_actors(ray_address or settings.RAY_ADDRESS)
        except BaseException:
            engine.redis.close()
            raise
        if settings.API_PORT is not None:
            try:
                engine.start_api()
            except BaseException:
                engine.shutdown()
                raise
        return engine

    @classmethod
    def connect(cls, settings: Settings | None = None, *, config: str | None = None,
                **overrides: Any) -> Engine:
        """A handle on a running engine through its Redis (no actors are started)."""
        engine = cls(_settings(settings, config, overrides))
        try:
            engine._check_redis()
        except BaseException:
            engine.redis.close()
            raise
        return engine

    def _check_redis(self) -> None:
        """The Redis answers, and is one the engine can use (ConfigError if not)."""
        self.redis.ping()
        for check in (cluster_mode, too_old):
            if (problem := check(self.redis)) is not None:
                raise ConfigError(
                    f"REDIS_URL {self.settings.redacted()['REDIS_URL']}: {problem}")

    def _start_actors(self, address: str | None) -> None:
        import ray

        from actors.transport import TransportActor
        from actors.workers import PartitionActor, RetryActor

        self._use_ray(address)
        try:  # the prefix is this engine's before it changes anything of it
            self.lease = self._claim_prefix()
            self.intake.ensure_groups()
            self.intake.record_partitions()  # producers with another count: refused
            self.intake.keep_records()  # and events or hooks of codes it lacks
            if self._renewer is not None:  # written again if Redis loses them, or
                # another engine replaced them while it held the lapsed claim
                self._renewer.also = self.intake.record_again
        except BaseException:
            self._release_prefix()
            self._release_ray()
            raise
        cfg = self.settings.model_dump()
        sizes = {"http_batch": self.settings.HTTP_POOL_SIZE,
                 "rabbitmq_queue": self.settings.RABBITMQ_POOL_SIZE,
                 "rabbitmq_exchange": self.settings.RABBITMQ_POOL_SIZE,
                 "kafka": self.settings.KAFKA_POOL_SIZE}
        prefix = self.settings.REDIS_PREFIX
        names = {kind: [f"{prefix}:{kind}:{i}" for i in range(sizes[kind])]
                 for kind in available_kinds()}
        created: list[Any] = []  # killed again if the start fails half-way
        try:
            pools: dict[str, list[Any]] = {}
            for kind, group in names.items():
                pools[kind] = []
                for name in group:
                    created.append(TransportActor.options(name=name).remote(kind, cfg))
                    pools[kind].append(created[-1])
            _started(created)
            parts = []
            for n in range(self.settings.PARTITIONS):
                created.append(PartitionActor.options(name=f"{prefix}:partition:{n}").remote(
                    cfg, n, names, self.lease.owner))
                parts.append(created[-1])
            created.append(RetryActor.options(name=f"{prefix}:retry").remote(
                cfg, names, self.lease.owner))
            _started(created)
        except BaseException as exc:
            for actor in created:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self._release_prefix()
            clash = self._already_runs("") if isinstance(
                exc, ray.exceptions.ActorAlreadyExistsError) else None
            self._release_ray()
            if clash is not None:
                raise clash from None
            raise
        self.actors = {"partitions": parts, "retry": created[-1], "pools": pools}

    def _claim_prefix(self) -> EngineLease:
        """Claim REDIS_PREFIX on the Redis (engine/lease.py) before any worker runs: an
        engine of the same prefix on another Ray cluster is refused too, once its claim
        did not lapse; one on this cluster at once, by its actor names."""
        import ray

        about = EngineLease.describe_here(ray.get_runtime_context().gcs_address)
        lease = EngineLease(self.redis, self.keys, self.settings.ENGINE_LEASE_SEC,
                            about=about)

        def on_this_cluster(_holder: Any) -> PrefixTaken | None:
            try:
                ray.get_actor(f"{self.settings.REDIS_PREFIX}:retry")
            except ValueError:
                return None
            return self._already_runs("")

        lease.claim_or_wait(self.settings.REDIS_PREFIX, on_this_cluster)
        self._renewer = Renewer(lease)
        return lease

    def _release_prefix(self, seconds: float | None = None) -> None:
        """Give up the claim on the prefix; ``seconds``: at most that long on Redis (a
        stop's time left: a hung Redis would hold it for the client's 30 s)."""
        lease, self.lease = self.lease, None
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
        if lease is not None:
            quick = None if seconds is None else quick_client(self.redis, seconds)
            try:
                lease.release(quick)
            except redis.RedisError as exc:  # it lapses by itself
                log.warning("releasing %s: %s: %s (the claim lapses by itself within "
                            "%g s)", lease.key, type(exc).__name__, exc, lease.ttl_ms / 1000)
            finally:
                if quick is not None:
                    quick.close()

    def _already_runs(self, what: str) -> PrefixTaken:
        """The error for actor names of this REDIS_PREFIX taken on this Ray cluster:
        another engine (or its HTTP API, ``what``) of the same prefix runs there."""
        import ray

        prefix = self.settings.REDIS_PREFIX
        namespace = ray.get_runtime_context().namespace
        return PrefixTaken(
            f"an engine with REDIS_PREFIX {prefix!r} already runs on this Ray cluster"
            f"{what} (its actors {prefix}:... in namespace {namespace!r}); stop it first, "
            f"or give this engine another REDIS_PREFIX")

    def start_api(self, port: int | None = None) -> str:
        """Start the HTTP API actor on this driver's node, on ``port`` (default: the
        API_PORT setting; 0: any free port); returns its base URL."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors.api import ApiActor

        if self.api is not None:
            raise ConfigError(f"the HTTP API of this engine runs already, on {self.api_url}")
        self._use_ray(self.settings.RAY_ADDRESS)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        try:
            api = ApiActor.options(name=f"{self.settings.REDIS_PREFIX}:api",
                                   scheduling_strategy=here).remote(
                self.settings.model_dump(), port)
        except ray.exceptions.ActorAlreadyExistsError:
            raise self._already_runs(" with its HTTP API") from None
        try:
            host, bound = ray.get(api.address.remote(), timeout=60)
        except ray.exceptions.RayError as exc:  # the port is taken, the host unknown...
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
            reason = str(cause) if cause is not None else str(exc).strip().splitlines()[-1]
            where = f"{self.settings.API_HOST}:{self.settings.API_PORT if port is None else port}"
            with contextlib.suppress(Exception):  # its name is free for the next try
                ray.kill(api)
            raise ConfigError(f"the HTTP API could not start on {where}: {reason[:300]}") \
                from None
        self.api = api
        self.api_url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
        return self.api_url

    def _use_ray(self, address: str | None) -> None:
        import ray

        if not ray.is_initialized():
            _init_ray(address or None)
            _ray.update(started_here=True, users=0)
        if not self._uses_ray:
            self._uses_ray = True
            _ray["users"] += 1

    def _release_ray(self) -> None:
        """This engine no longer uses Ray: shut down with the last engine that used the
        Ray an engine of this process started (never a Ray someone else started)."""
        if not self._uses_ray:
            return
        self._uses_ray = False
        _ray["users"] -= 1
        if _ray["started_here"] and _ray["users"] <= 0:
            import ray

            _ray.update(started_here=False, users=0)
            with contextlib.suppress(Exception):
                ray.shutdown()

    def shutdown(self) -> None:
        """Stop the actors started here (and Ray, when an engine of this process started
        it and this is the last engine using it), within STOP_SEC: what has not stopped
        by then is killed, so `ray job stop`'s wait (RAY_JOB_STOP_WAIT_TIME_S=30 in
        deploy/README.md) also sees the claim on the prefix given up. Tolerates Ray
        being gone already."""
        deadline = time.monotonic() + STOP_SEC

        def left(most: float) -> float:
            return max(0.5, min(most, deadline - time.monotonic()))

        try:
            if self.api is not None:
                import ray

                try:
                    ray.get(self.api.stop.remote(), timeout=left(15))
                except Exception as exc:  # dead already (its port was taken), Ray gone...
                    log.warning("API actor: %s", str(exc).splitlines()[0] if str(exc) else exc)
                with contextlib.suppress(Exception):
                    ray.kill(self.api)
                self.api = self.api_url = None
            if self.actors:
                import ray

                workers = [*self.actors["partitions"], self.actors["retry"]]
                transports = [a for pool in self.actors["pools"].values() for a in pool]
                # workers finish their round and drain (DRAIN_SEC: open batches sent,
                # outcomes of those in flight booked; the retry worker takes back the
                # hand-overs still unanswered); killed below in any case
                stopped: list[Any] = []
                finish_all([w.stop.remote() for w in workers], left(30), "stopping workers",
                           stopped)
                for answer in stopped:  # what each drain left, said here for certain
                    for said in answer["said"]:
                        log.warning("%s", said)
                # close connections and producers cleanly before the processes go
                finish_all([t.close.remote() for t in transports], left(10),
                           "closing transports")
                for actor in [*workers, *transports]:
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                self.actors = {}
        finally:  # whatever interrupted it: the renewal ends, the claim is given up
            self._release_prefix(left(5))
            self._release_ray()
            self.redis.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- hooks --------------------------------------------------------------------------

    def create_hook(self, data: Mapping[str, Any] | Hook) -> Hook:
        """Validate and store a hook (raises HookError naming each bad field)."""
        return self.hooks.create(_hook_fields(data))

    def update_hook(self, hook_id: int, data: Mapping[str, Any] | Hook,
                    expect: Hook | None = None) -> Hook:
        """Replace a hook's settings. ``expect``: the hook as read (``get_hook``) the
        change was made on: ``Stale`` if it changed since (the HTTP API's If-Match),
        rather than undoing that change (a stop, say)."""
        hook_id = _hook_id("update_hook", hook_id)
        fields = _hook_fields(data)
        return self.hooks.update(hook_id, fields.to_storage() if isinstance(fields, Hook)
                                 else fields, _expected("update_hook", expect))

    def get_hook(self, hook_id: int) -> Hook:
        """The stored hook (NotFound; HookError if it no longer validates)."""
        return self.hooks.get(_hook_id("get_hook", hook_id))

    def list_hooks(self, account_id: int | None = None) -> list[Hook]:
        """The hooks of one account, or of all; HookError if a stored one no longer
        validates (``hook_listing`` lists the others and names it)."""
        return self.hooks.all(_id("list_hooks", "account_id", account_id))

    def hook_listing(self, account_id: int | None = None
                     ) -> tuple[list[Hook], list[tuple[int, str]]]:
        """The hooks of one account, or of all, that validate, and (id, why) of each
        stored one that no longer does (as ``hookray hooks list`` shows them)."""
        return self.hooks.listing(_id("hook_listing", "account_id", account_id))

    def activate_hook(self, hook_id: int, expect: Hook | None = None) -> Hook:
        """Activate a hook (``expect`` as in ``update_hook``)."""
        return self.hooks.set_active(_hook_id("activate_hook", hook_id), True,
                                     _expected("activate_hook", expect))

    def stop_hook(self, hook_id: int, expect: Hook | None = None) -> Hook:
        """Stop a hook (``expect`` as in ``update_hook``)."""
        return self.hooks.set_active(_hook_id("stop_hook", hook_id), False,
                                     _expected("stop_hook", expect))

    def clone_hook(self, hook_id: int, name: str | None = None) -> Hook:
        """A stopped copy with a new id, named ``name`` (default "<its name> (copy)")."""
        if name is not None and not isinstance(name, str):
            raise ValueError(f"clone_hook: name must be a string, got {type(name).__name__}")
        return self.hooks.clone(_hook_id("clone_hook", hook_id), name)

    def delete_hook(self, hook_id: int) -> None:
        """Delete the hook (NotFound): nothing more is captured for it; its open batches
        and re-sends become dead letters, kept for replay, its counters kept while it
        has any."""
        self.hooks.delete(_hook_id("delete_hook", hook_id))

    # --- data in ------------------------------------------------------------------------

    def publish(self, events: bytes | str | Sequence[Event | Mapping[str, Any]],
                partial: bool = False) -> PublishResult:
        """Validate and append events to the intake. Bad events raise EventError (nothing
        accepted) unless ``partial=True``, which accepts the good ones and returns the
        issues. Backlogged (nothing accepted) while a partition the events would go to
        holds INTAKE_MAX_ENTRIES entries not yet processed: publish again later."""
        _flag("publish", "partial", partial)
        return self.intake.publish(events, partial=partial)  # type: ignore[arg-type]

    def store_content(self, account_id: int, contents: Mapping[str, Mapping[str, Any]],
                      ttl_sec: int | None = None) -> int:
        """Store an account's message content by send id, kept HOOK_CONTENT_CLEANUP_HOURS
        by default (``ttl_sec``: seconds instead). Messages of that account's events
        with the send id carry it; another account's events never do."""
        return self._content.put(account_id, contents, ttl_sec)

    def upsert_names(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Upsert names: ``{"account_id", "kind", "id", "name"[, "subid"|"subject"]}``."""
        return self._names.upsert(records)

    def delete_names(self, account_id: int, objects: Iterable[Mapping[str, Any]]) -> int:
        """Forget the names of an account's objects (``{"kind", "id"}`` each: a
        campaign, template... deleted on the platform); returns how many were stored.
        Every partition holds every name, so names no message needs are worth
        forgetting."""
        return self._names.delete(account_id, objects)

    def upsert_profiles(self, account_id: int, profiles: Mapping[str, Mapping[str, Any]]) -> int:
        """Upsert profile fields by profile id, for hooks that copy them into custom_data
        (each profile's fields stored whole; a call cut short by a Redis error may have
        stored some of them: it is safe to make again)."""
        if not is_account_id(account_id):
            raise ValueError(f"upsert_profiles: account_id {account_id!r} is not an integer "
                             f"from 0 to {MAX_ID}")
        if not isinstance(profiles, Mapping) or not all(
                isinstance(pid, str) and isinstance(fields, Mapping)
                for pid, fields in profiles.items()):
            raise ValueError("upsert_profiles: profiles must map each profile id (a string) "
                             "to its fields (a mapping)")
        return self._profiles.upsert(account_id, profiles)

    def delete_profiles(self, account_id: int, profile_ids: Iterable[str]) -> int:
        """Forget the stored fields of profiles deleted on the platform (their data is
        not kept, nor copied into later messages); returns how many were stored."""
        if not is_account_id(account_id):
            raise ValueError(f"delete_profiles: account_id {account_id!r} is not an integer "
                             f"from 0 to {MAX_ID}")
        ids = None if isinstance(profile_ids, str | bytes) or \
            not isinstance(profile_ids, Iterable) else list(profile_ids)
        if ids is None or not all(isinstance(pid, str) for pid in ids):
            raise ValueError("delete_profiles: profile_ids must be a list of profile ids "
                             "(strings)")
        if problem := not_utf8(ids):
            raise ValueError(f"delete_profiles: profile_ids: {problem}")
        return self._profiles.delete(account_id, ids)

    # --- test event, stats, dead letters ----------------------------------------------

    def test_event(self, hook: int | Hook, event_type: str) -> Outcome:
        """Send one synthetic event of ``event_type`` through the hook's target, now.
        Called inside a running event loop, it blocks that loop until the send ends."""
        hook = hook if isinstance(hook, Hook) else self.hooks.get(_hook_id("test_event", hook))
        if not isinstance(event_type, str):
            raise ValueError("test_event: event_type must be an event code (a string), got "
                             f"{type(event_type).__name__}")
        if event_type not in self.catalogue:
            raise HookError(f"unknown event type {event_type!r}; known: "
                             + ", ".join(self.catalogue.codes()))
        sending = send_test_event(hook, event_type, self._names.load(),
                                  catalogue=self.catalogue,
                                  **self.settings.transport_options(hook.target.kind))
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: the usual case
            return asyncio.run(sending)
        # called from a running loop (a notebook, an async app): sent on a loop of its
        # own in a thread, as asyncio.run cannot run inside a running loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, sending).result()

    def stats(self, hook_id: int | None = None) -> dict[Any, Any]:
        """Counters (messages) of one hook, or of every hook plus the engine's. NotFound
        for a hook that does not exist and never counted anything (a deleted hook keeps
        its counters while it has dead letters, which may still be replayed or
        discarded, and 15 minutes at least: engine.retrying.STATS_GONE_SEC)."""
        if hook_id is not None:
            return self._known_hook(_id("stats", "hook_id", hook_id))
        # every stored hook's, also one that no longer validates (its partitions wait:
        # see health()); read without validating the hooks
        out: dict[Any, Any] = {hook_id: self._stats.get(hook_id)
                               for hook_id in self.hooks.stored_ids()}
        out["engine"] = {**self._stats.engine(), "retry_scheduled": self.retry.pending(),
                         "dead_letters": int(self.redis.zcard(self.keys.dead)),
                         "intake_backlog": self.backlog()}
        return out

    def _known_hook(self, hook_id: int) -> dict[str, int]:
        """The counters of ``hook_id``; NotFound if it is not stored and never counted
        anything (a deleted hook keeps its counters, and its dead letters)."""
        counters = self._stats.get(hook_id)
        if not any(counters.values()) and \
                not self.redis.hexists(self.keys.hooks, str(hook_id)):
            raise NotFound(f"hook {hook_id} does not exist")
        return counters

    def backlog(self) -> int:
        """Intake entries not yet settled, over all partitions: the running engine's
        recorded PARTITIONS, which this driver's settings may not know."""
        recorded = recorded_partitions(self.redis.hget(self.keys.config, "partitions"),
                                       self.keys.config)
        partitions = max(self.settings.PARTITIONS, recorded or 0)
        with self.redis.pipeline(transaction=False) as pipe:
            for n in range(partitions):
                pipe.xlen(self.keys.intake(n))
            return sum(pipe.execute())

    def dead_letters(self, account_id: int | None = None, hook_id: int | None = None,
                     limit: int = 100, after: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, at most ``limit``; the next ones with ``after=``
        the last one's ``cursor`` (ValueError for a cursor that is not one, or a limit
        below 1; NotFound for a ``hook_id`` that is not stored and never counted
        anything, as in ``stats``, also for ``replay`` and ``discard``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"dead_letters: limit must be a whole number >= 1, got {limit!r}")
        if after is not None and not isinstance(after, str):
            raise ValueError(f"dead_letters: after must be a cursor (a string), got {after!r}")
        account_id = _id("dead_letters", "account_id", account_id)
        hook_id = _id("dead_letters", "hook_id", hook_id)
        if hook_id is not None:
            self._known_hook(hook_id)
        return [DeadLetter.of(d, cursor) for d, cursor in self.hooks.shown_dead_letters(
            self.retry.dead_page(account_id, hook_id, limit, after))]

    def replay(self, ids: Iterable[str] | None = None, hook_id: int | None = None, *,
               account_id: int | None = None,
               progress: Callable[[int], None] | None = None) -> int:
        """Send dead letters again: the given ids (all or none: an unknown id raises
        NotFound), or, without ids, every one (of a hook, of an account) kept when the
        call starts, in chunks; ``progress(n)`` after each chunk."""
        if ids is None:
            hook_id = _id("replay", "hook_id", hook_id)
            if hook_id is not None:
                self._known_hook(hook_id)
            return self.retry.replay_all(_id("replay", "account_id", account_id), hook_id,
                                         progress)
        if hook_id is not None or account_id is not None:
            raise ValueError("replay: hook_id and account_id select all of a hook's or an "
                             "account's dead letters; not with ids")
        return self.retry.replay(_ids("replay", ids))

    def discard(self, ids: Iterable[str] | None = None, *, everything: bool = False,
                hook_id: int | None = None, account_id: int | None = None,
                progress: Callable[[int], None] | None = None) -> int:
        """Delete dead letters for good (counted as ``discarded`` in their hooks'
        stats): the given ids (all or none: an unknown id raises NotFound), or, with
        ``everything=True``, every one (of a hook, of an account) kept when the call
        starts, in chunks; ``progress(n)`` after each chunk."""
        _flag("discard", "everything", everything)
        if (ids is None) == (not everything):
            raise ValueError("discard: give either ids or everything=True")
        if ids is None:
            hook_id = _id("discard", "hook_id", hook_id)
            if hook_id is not None:
                self._known_hook(hook_id)
            return self.retry.discard_all(_id("discard", "account_id", account_id), hook_id,
                                          progress)
        if hook_id is not None or account_id is not None:
            raise ValueError("discard: hook_id and account_id go with everything=True")
        return self.retry.discard(_ids("discard", ids))

    def set_aside(self, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """Intake entries the partitions set aside (undecodable, failing MAX_ENTRY_
        FAILURES times, or ending the partition's process MAX_PROCESS_ENDS times),
        oldest first: ``{"id", "partition", "entry", "error",
        "events"}`` (``events`` None: it cannot be decoded); the next ones with
        ``after=`` the last one's id."""
        return SetAside(self.redis, self.keys).page(limit, after)

    def requeue_set_aside(self, ids: Iterable[str] | None = None) -> int:
        """Put set-aside entries back into the intake (the given ids, all or none; by
        default every one that can be decoded), to be processed again once what failed
        them is fixed; returns how many."""
        listed = None if ids is None else _ids("requeue_set_aside", ids, "set-aside entry")
        try:
            return SetAside(self.redis, self.keys).requeue(listed, self.settings.PARTITIONS)
        except ValueError as exc:
            raise ValueError(f"requeue_set_aside: {exc}") from None

    def discard_set_aside(self, ids: Iterable[str]) -> int:
        """Delete set-aside entries for good (the given ids, all or none: an unknown id
        raises ValueError), counted as ``entries_discarded`` in the engine's stats;
        returns how many."""
        listed = _ids("discard_set_aside", ids, "set-aside entry")
        try:
            return SetAside(self.redis, self.keys).discard(listed)
        except ValueError as exc:
            raise ValueError(f"discard_set_aside: {exc}") from None

    def set_aside_retries(self, limit: int = 100,
                          after: str | None = None) -> list[dict[str, Any]]:
        """Re-sends the retry worker set aside because their stored payload could not
        be decoded (damaged, or written by another hookray version), by id: ``{"id",
        "hook_id", "bytes", "error"}`` (``error`` None: this version decodes it, and it
        may be put back; ``hook_id`` None: not readable either); the next ones with
        ``after=`` the last one's id."""
        return self.retry.set_aside(limit, after)

    def requeue_set_aside_retries(self, ids: Iterable[str] | None = None) -> int:
        """Put set-aside re-sends back into the retry schedule, due at once (the given
        ids, all or none; by default every one this version decodes), counted as
        ``retries_requeued``; returns how many."""
        listed = None if ids is None else _ids("requeue_set_aside_retries", ids,
                                               "set-aside re-send")
        try:
            return self.retry.requeue_set_aside(listed)
        except ValueError as exc:
            raise ValueError(f"requeue_set_aside_retries: {exc}") from None

    def discard_set_aside_retries(self, ids: Iterable[str]) -> int:
        """Delete set-aside re-sends for good (the given ids, all or none: an unknown
        id raises ValueError), counted as ``retries_discarded``; returns how many."""
        listed = _ids("discard_set_aside_retries", ids, "set-aside re-send")
        try:
            return self.retry.discard_set_aside(listed)
        except ValueError as exc:
            raise ValueError(f"discard_set_aside_retries: {exc}") from None

    def health(self) -> dict[str, Any]:
        """Which of the engine's workers run (``engine.health.engine_health``): its
        partitions (``expected``, ``running``, ``waiting`` with the reason, ``stopped``)
        and the retry worker (``retry_running``, ``retry_waiting``)."""
        return engine_health(self.redis, self.keys)

    def wait_idle(self, timeout: float = 60.0, include_retries: bool = False) -> bool:
        """Wait until every accepted event is settled (and, with ``include_retries``,
        until the retry schedule is empty: every re-send delivered or dead-lettered)."""
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
                or not 0 <= timeout < float("inf"):
            raise ValueError(f"wait_idle: timeout must be a number of seconds >= 0, got "
                             f"{timeout!r}")
        _flag("wait_idle", "include_retries", include_retries)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.backlog() == 0 and (not include_retries or self.retry.pending() == 0):
                return True
            time.sleep(0.05)
        return False

    def totals(self, also: Iterable[int] = ()) -> dict[str, int]:
        """Counters summed over every stored hook and the hooks ``also`` names (a
        deleted hook keeps its counters: a caller that saw it can still count it)."""
        if isinstance(also, str | bytes) or not isinstance(also, Iterable):
            raise ValueError(f"totals: also must be a list of hook ids, got {also!r:.80}")
        named = list(also)
        if not all(is_account_id(h) for h in named):
            raise ValueError(f"totals: also must be a list of hook ids, got {named!r:.80}")
        per_hook = self.stats()
        per_hook.pop("engine")
        gone = set(named).difference(per_hook)
        counted = [*per_hook.values(), *self._stats.get_many(sorted(gone))]
        return {f: sum(s[f] for s in counted) for f in STAT_FIELDS}


def _hook_fields(data: Any) -> Mapping[str, Any] | Hook:
    """``data`` if it can be a hook's fields (a mapping, as JSON's object, or a Hook);
    HookError otherwise."""
    if isinstance(data, Mapping | Hook):
        return data
    raise HookError(f"invalid hook: expected a mapping of hook fields (a JSON object), "
                    f"got {type(data).__name__}")


def _settings(settings: Settings | None, config: str | None, overrides: dict[str, Any]
              ) -> Settings:
    if config is not None and not isinstance(config, str | os.PathLike):
        raise ConfigError(f"config: expected the path of a main.json (a str or a path), "
                          f"got {type(config).__name__}")
    if settings is None:
        settings = load_settings(config if config is not None
                                 else os.environ.get("HOOKRAY_CONFIG") or None)
    elif not isinstance(settings, Settings):
        raise ConfigError(f"settings: expected an engine.settings.Settings (or config= a "
                          f"main.json path, or keyword settings), got {type(settings).__name__}")
    elif config is not None:
        raise ConfigError("give settings= or config=, not both: config would be ignored")
    return with_overrides(settings, overrides)


def _flag(call: str, name: str, value: Any) -> None:
    """ValueError naming the call unless ``value`` is True or False: "no" or 0 would be
    taken for what their truth says (discard(everything="no") discards everything)."""
    if not isinstance(value, bool):
        raise ValueError(f"{call}: {name} must be True or False, got {value!r}")


def _id(call: str, name: str, value: Any) -> Any:
    """``value`` if it is None or an id (an integer from 0 to MAX_ID), else ValueError
    naming the call and the argument: "23" for 23 would select nothing, silently."""
    if value is None or is_account_id(value):
        return value
    raise ValueError(f"{call}: {name} must be an integer from 0 to {MAX_ID}, got {value!r}")


def _hook_id(call: str, value: Any) -> int:
    """``value`` if it is a hook id (an integer from 0 to MAX_ID), else ValueError naming
    the call: "1" or True would otherwise reach the registry as another key."""
    if value is None or not is_account_id(value):
        raise ValueError(f"{call}: hook_id must be an integer from 0 to {MAX_ID}, "
                         f"got {value!r}")
    return int(value)


def _expected(call: str, hook: Hook | None) -> list[str] | None:
    """The ETag of the hook a change was made on (``expect=``), for the store to
    compare with the stored one's; None: no condition."""
    if hook is None:
        return None
    if not isinstance(hook, Hook):
        raise ValueError(f"{call}: expect must be the Hook as read (get_hook), got "
                         f"{type(hook).__name__}")
    return [hook_etag(hook)]


def _ids(call: str, ids: Iterable[str], of: str = "dead letter") -> list[str]:
    """Ids (of dead letters, or ``of`` what) as a list of strings, else ValueError: one
    id given as a string would be taken character by character."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise ValueError(f"{call}: ids must be a list of {of} ids, got {type(ids).__name__}")
    listed = list(ids)
    wrong = next((i for i in listed if not isinstance(i, str)), None)
    if wrong is not None:
        raise ValueError(f"{call}: each {of} id is a string, got {wrong!r}")
    unwritable = next((i for i in listed if not_utf8(i)), None)
    if unwritable is not None:  # Redis could not be asked for it
        raise ValueError(f"{call}: {of} id {unwritable!r}: {not_utf8(unwritable)}")
    return listed


def _init_ray(address: str | None) -> None:
    """``ray.init``, joining the cluster at ``address`` (None: RAY_ADDRESS of the
    environment, else a local Ray, as ray.init decides; "local": a local Ray whatever
    RAY_ADDRESS says). An address that names no
    cluster, or one that does not answer within RAY_CONNECT_TIMEOUT_SEC, is a
    ConfigError naming RAY_ADDRESS and the reason (not a traceback, nor a silent wait
    of many minutes)."""
    import ray

    env = os.environ.get("RAY_ADDRESS") or None  # what ray.init takes for None or auto
    given = env if env and address in (None, "auto") else address
    shown = f"RAY_ADDRESS={given!r}" if given else "RAY_ADDRESS (unset)"
    problem = ray_address_problem(given) or _ray_unreachable(given)
    if problem is not None:
        raise ConfigError(f"{shown}: {problem}")
    try:
        ray.init(address=address, namespace="hookray", log_to_driver=True,
                 include_dashboard=False if address in (None, "local") else None,
                 configure_logging=False)
    except (ValueError, ConnectionError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ConfigError(f"{shown}: Ray could not be joined: {reason}") from None


def _ray_unreachable(address: str | None) -> str | None:
    """Why the Ray cluster ray.init would join for ``address`` does not answer, or None
    (it answers, or ray.init starts a local Ray)."""
    _, sep, rest = (address or "").partition("://")
    try:  # ray:// is Ray Client's server; else the GCS, as ray.init finds it (None too)
        target = rest.split("/")[0] if sep else _bootstrap_address(address)
    except (ValueError, ConnectionError) as exc:  # "auto" with no Ray running, ...
        return str(exc).strip().splitlines()[0][:300]
    if target is None:
        return None  # a local Ray is started
    log.info("connecting to Ray at %s", target)
    host, _, port = target.rpartition(":")
    if not host or not port.isdecimal():
        return None  # Ray Client's default port: left to ray.init
    hint = "; start Ray there (`ray start --head`) or set RAY_ADDRESS to a running cluster"
    try:
        socket.create_connection((host.strip("[]"), int(port)), RAY_CONNECT_TIMEOUT_SEC).close()
    except socket.gaierror as exc:
        return f"no Ray cluster at {target}: host not known ({exc.strerror}){hint}"
    except OSError as exc:  # refused, no route, no answer in time
        why = exc.strerror or f"no answer within {RAY_CONNECT_TIMEOUT_SEC:g} s"
        return f"no Ray cluster at {target}: {why}{hint}"
    if not _speaks_grpc(target):
        return (f"{target} answers, but not as a Ray cluster (no gRPC within "
                f"{RAY_CONNECT_TIMEOUT_SEC:g} s){hint}")
    return None


def _bootstrap_address(address: str | None) -> str | None:
    """The GCS address ray.init would join for ``address`` ("auto", None, host:port),
    found as Ray finds it; None when a local Ray would be started, or when this Ray
    version finds it elsewhere (then ray.init's own check is the only one)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # moved in another Ray version
        return None
    return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]


def _speaks_grpc(target: str) -> bool:
    """Whether ``target`` completes an HTTP/2 (gRPC) handshake, as the GCS and Ray
    Client's server do, within RAY_CONNECT_TIMEOUT_SEC; assumed with TLS (Ray's
    RAY_USE_TLS), which ray.init checks itself."""
    if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
        return True
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=RAY_CONNECT_TIMEOUT_SEC)
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()
    return True
