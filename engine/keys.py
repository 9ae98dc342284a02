"""Every Redis key hookray uses, in one place. ``p`` is the REDIS_PREFIX setting.

==============================  =======  =============================================
key                             type     holds
==============================  =======  =============================================
{p}:intake:{n}                  stream   event batches of partition n, field ``e``
{p}:intake:unreadable           stream   entries a partition could not decode or process
{p}:intake:receipt:{uuid}       string   set by an append: an append is written at
                                         most once (see Intake._write); deleted by the
                                         intake's next append, else gone after 10 min
{p}:processing:{n}:{consumer}   hash     entry id -> how often partition n's worker began
                                         processing it, read again after a restart, and
                                         did not finish (its process ended): set aside
                                         past MAX_PROCESS_ENDS (a crash loop ends)
{p}:acked:{n}:{consumer}        list     the tokens of the last 32 acknowledgement
                                         rounds of partition n's worker (book_once.lua):
                                         a round sent again after a lost reply counts once
{p}:booked:{worker}             list     the tokens of the worker's last 32 booked
                                         outcomes (book_once.lua): ``partition:{n}:
                                         {consumer}``, ``retry``; a booking sent again
                                         after a lost reply counts once
{p}:config                      hash     ``partitions``: the engine's PARTITIONS (producers
                                         writing for another count are refused);
                                         ``checking``: a first record's streams not
                                         checked yet
{p}:epoch                       string   a token of the engine's data as a whole, written
                                         with its records where missing: another one
                                         (Redis lost the data, the versions starting
                                         from 0 again) makes workers load everything;
                                         every booking carries the one its worker read
                                         (book_once.lua refuses another, or none)
{p}:hooks                       hash     hook id -> hook JSON (secrets in clear)
{p}:hooks:seq                   string   last hook id handed out (missing, or at a
                                         stored or deleted-and-marked hook's id: the
                                         next id goes above every such hook's)
{p}:hooks:from_file             hash     the hooks ``run --hooks`` files created:
                                         JSON ``[account_id, name]`` (the file hook's
                                         identity) -> the id of the hook created (or
                                         ``creating {token} {ms}`` while a run creates
                                         it); a recorded hook is never created again
                                         (deleted or renamed since), until ``hookray
                                         hooks forget-file-record`` deletes the field
{p}:hooks:account:{account}     set      the ids of the account's hooks (an index, so
                                         that reading an account's hooks reads not every
                                         account's), whole while ``{p}:hooks:index``
                                         holds the hooks' version, field count and
                                         each set's size as they are: the engine's
                                         hook changes keep it so; after any other
                                         change a read builds it again
{p}:hooks:index                 hash     ``version``, ``count``, ``a:{account}``: the
                                         hooks' version and field count, and the size
                                         of each account's set, the index was last
                                         whole at (an edit of {p}:hooks from outside
                                         the engine moves the version on; one that
                                         sets it back, as a restore, deletes this:
                                         the version could come back to this one's)
{p}:hooks:index:log             list     the last 1,000 hook changes, "version op id
                                         account time": a build of the index catches up
                                         with those made while it read the hooks
{p}:version:hooks               string   bumped on every hook change
{p}:names                       hash     "account:kind:id" -> name fields JSON
{p}:version:names               string   bumped on every name upsert or delete that
                                         changed a name (never to be moved back)
{p}:version:names:log           zset     "account:kind:id" -> the names version its
                                         last upsert or delete moved to: a worker reads
                                         the records changed since its version again,
                                         not every name (the CHANGES_KEPT records
                                         changed last)
{p}:version:names:mark          hash     ``from``: the changes log holds every change
                                         after that version; ``to``: the version its
                                         last change moved to (another version: moved
                                         by something else, and every name is loaded);
                                         ``n``: how many records it holds; ``token``:
                                         made anew when the log starts again (a
                                         worker's version of another log says nothing)
{p}:profiles:{account}          hash     profile_id -> profile fields JSON
{p}:version:profiles            string   bumped on every profile upsert or delete
                                         (never to be moved back)
{p}:version:profiles:log        zset     "account:profile_id" -> the profiles version
                                         its last upsert or delete moved to: a worker
                                         forgets those it cached, not every profile
{p}:version:profiles:mark       hash     as ``{p}:version:names:mark``
{p}:content:{account}:{send_id} string   message content JSON, TTL content_ttl_sec
{p}:retry                       zset     delivery id scored by due time (unix ms)
{p}:retry:payload               hash     delivery id -> msgpack Delivery
{p}:retry:unanswered            hash     delivery id -> re-sends handed over since its
                                         last outcome (a worker died during each)
{p}:dead                        zset     delivery id scored by the time it died (ms)
{p}:dead:payload                hash     delivery id -> msgpack Delivery (last error)
{p}:dead:account:{account}      zset     the account's dead letters, as ``{p}:dead``
{p}:dead:hook:{hook_id}         zset     the hook's dead letters, as ``{p}:dead``
{p}:dead:indexed                string   a time of death (ms): every dead letter that
                                         died up to it is in the two indexes above;
                                         an index pass (each process's first read, the
                                         retry worker every minute) indexes those after
                                         it and moves it to its start less a minute
                                         (``1``: an earlier version's mark, taken as none)
{p}:dead:recent                 zset     dead letter id -> when it died, for those this
                                         version's kill indexed since the mark (a pass
                                         reads the payloads of the others only)
{p}:retry:unreadable            hash     delivery id -> a retry payload that could not
                                         be decoded (set aside by the retry worker)
{p}:stats:{hook_id}             hash     accepted, delivered, retried, dead_lettered,
                                         discarded
{p}:hooks:gone                  zset     deleted hook id scored by when it was deleted
                                         or last had a delivery killed (ms): its stats
                                         go once it has no dead letter, STATS_GONE_SEC
                                         on (RetryStore.forget_gone_stats)
{p}:alive:{worker}              string   a running worker's last round (ms), 15 s TTL:
                                         ``partition:{n}``, ``retry`` (health)
{p}:engine                      string   the running engine's claim on the prefix:
                                         its id, a space, JSON (host, pid, Ray
                                         cluster, started); ENGINE_LEASE_SEC TTL,
                                         renewed by its driver (engine/lease.py)
{p}:stats:engine                hash     events_accepted, events_rejected,
                                         entries_unreadable, entries_requeued,
                                         entries_discarded, retries_unreadable,
                                         dead_letters_unreadable_discarded
==============================  =======  =============================================
"""

from __future__ import annotations

# Words a REDIS_PREFIX may not hold after a ":", or its keys would be those of the
# prefix before that ":" (``x:stats``'s claim ``x:stats:engine`` is ``x``'s engine
# stats): as its last word, those whose keys end in a word of keys (``{p}:version:
# hooks``, ``{p}:stats:engine``, ``{p}:alive:retry``, ``{p}:booked:retry``); anywhere,
# ``content``, whose keys end in send ids an account chooses (``x:content:1``'s hooks
# would be account 1's content of send id ``hooks`` of ``x``)
PREFIX_LAST_CLASHES = frozenset({"alive", "booked", "stats", "version"})
PREFIX_CLASHES = frozenset({"content"})
CONSUMER_GROUP = "dispatch"
INTAKE_FIELD = b"e"
# A claimed retry is hidden for this long; if its sender dies it becomes due again.
RETRY_LEASE_MS = 60_000


MAX_PARTITIONS = 4096  # as the PARTITIONS setting allows


def recorded_partitions(raw: bytes | str | None, key: str) -> int | None:
    """The engine's PARTITIONS as recorded in ``{p}:config`` (``key``), None if none
    is; a value no engine writes (a damaged record) is a ConfigError naming it, not a
    traceback or a count of streams to read for ever."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PARTITIONS:
        return int(text)
    from engine.errors import DamagedRecord

    raise DamagedRecord(f"{key} field partitions holds {text[:40]!r}, not the engine's "
                        f"PARTITIONS (a whole number from 1 to {MAX_PARTITIONS}): a damaged "
                        "record; set it to the engine's count (HSET), or delete the field "
                        "while no engine runs",
                        "the engine's recorded PARTITIONS is no count")


class Keys:
    """Key names for one prefix."""

    def __init__(self, prefix: str = "hookray") -> None:
        self.p = prefix
        self.hooks = f"{prefix}:hooks"
        self.hooks_seq = f"{prefix}:hooks:seq"
        self.hooks_from_file = f"{prefix}:hooks:from_file"
        self.hooks_gone = f"{prefix}:hooks:gone"
        self.hooks_index = f"{prefix}:hooks:index"
        self.hooks_index_log = f"{prefix}:hooks:index:log"
        self.hooks_version = f"{prefix}:version:hooks"
        self.names = f"{prefix}:names"
        self.names_version = f"{prefix}:version:names"
        self.names_changes = f"{prefix}:version:names:log"
        self.names_logged = f"{prefix}:version:names:mark"
        self.profiles_changes = f"{prefix}:version:profiles:log"
        self.profiles_logged = f"{prefix}:version:profiles:mark"
        self.profiles_version = f"{prefix}:version:profiles"
        self.retry = f"{prefix}:retry"
        self.retry_payload = f"{prefix}:retry:payload"
        self.retry_unanswered = f"{prefix}:retry:unanswered"
        self.dead = f"{prefix}:dead"
        self.dead_payload = f"{prefix}:dead:payload"
        self.dead_indexed = f"{prefix}:dead:indexed"
        self.dead_recent = f"{prefix}:dead:recent"
        self.engine_stats = f"{prefix}:stats:engine"
        self.intake_unreadable = f"{prefix}:intake:unreadable"
        self.config = f"{prefix}:config"
        # a token of the engine's data as a whole, made again when Redis lost it (a
        # restart without persistence, a flush): the versions start from 0 again then,
        # and a cache of hooks, names or profiles kept by its version alone could meet
        # the same number with other data behind it (Intake.keep_records writes it)
        self.epoch = f"{prefix}:epoch"
        self.retry_unreadable = f"{prefix}:retry:unreadable"
        self.engine = f"{prefix}:engine"

    def intake(self, partition: int) -> str:
        return f"{self.p}:intake:{partition}"

    def processing(self, partition: int, consumer: str) -> str:
        return f"{self.p}:processing:{partition}:{consumer}"

    def last_ack(self, partition: int, consumer: str) -> str:
        return f"{self.p}:acked:{partition}:{consumer}"

    def booked(self, worker: str) -> str:
        return f"{self.p}:booked:{worker}"

    def profiles(self, account_id: int) -> str:
        return f"{self.p}:profiles:{account_id}"

    def content(self, account_id: int, send_id: str) -> str:
        return f"{self.p}:content:{account_id}:{send_id}"

    def dead_of_account(self, account_id: int) -> str:
        return f"{self.p}:dead:account:{account_id}"

    def dead_of_hook(self, hook_id: int) -> str:
        return f"{self.p}:dead:hook:{hook_id}"

    def alive(self, worker: str) -> str:
        return f"{self.p}:alive:{worker}"

    def stats(self, hook_id: int) -> str:
        return f"{self.p}:stats:{hook_id}"

    def hooks_of_account(self, account_id: int | str) -> str:
        return f"{self.p}:hooks:account:{account_id}"


def damaged_count(error: Exception) -> bool:
    """Whether a HINCRBY failed for its counter's own damage (a field that is not an
    integer, a key of another type, a count at its limit), as book_once.lua judges."""
    text = str(error)
    return any(sign in text for sign in ("not an integer", "WRONGTYPE", "overflow"))
