"""Vectorized hook matching: which active hooks capture which events (spec section b).

A hook matches an event iff the hook is active, the account ids are equal, the
hook's database is ``"all"`` or equals the event's ``list_id``, the event type
is one of the hook's actions, and every non-empty filter kind (resources,
campaigns, templates, segments, pixels) holds the event's value — for segments,
any one of the event's segment ids. An event with no value for a filtered
dimension does not match.

Algorithm (pure numpy; no loop over events x hooks)
---------------------------------------------------
*Account partitioning.* Hooks never see another account's events, so each
active hook gets a **slot**: its rank among the active hooks of its account.
A set of hooks of one account is a bitset of ``W = ceil(max hooks per
account / 64)`` uint64 words. ``W`` depends on the busiest account, not on the
total hook count, which keeps the per-event masks narrow.

*Dimensions.* Every condition is a "dimension" of the same shape: a hook
either leaves it unrestricted or lists the values it accepts. The database
scope is one (``"all"`` = unrestricted, an id = a one-value list), the event
type is one (the actions), and so are the five filter kinds. For each
dimension, :class:`_Dimension` holds a table of bitset rows:

* one *default* row per account: the account's hooks unrestricted in that
  dimension, which is what an event gets whose value is none or is listed by
  no hook;
* one row per distinct ``(account, value)`` listed by some hook: the default
  row plus the hooks that list the value;
* one all-zero row, for events of accounts without active hooks.

Dimensions no hook restricts are dropped at compile time.

*Id lookups.* :class:`_IdMap` maps ids (accounts, each dimension's listed
values, and ``(account, value)`` keys) to dense indices: a direct lookup table
when the ids span at most ``LUT_MAX`` values (auto-increment ids), else a
vectorized open-addressing hash table. Both are much faster than
``np.searchsorted``. When ``accounts x values`` is small the ``(account,
value)`` step is one more lookup table that yields the row directly.

*Matching a chunk of events* (``CHUNK_EVENTS`` at a time, to bound memory):
map account ids to account indices; for each dimension map each event's value
to its row, gather the rows (``np.take(rows, idx, axis=0)``) into an ``E x W``
mask and AND the masks of all dimensions. Segments are multi-valued (CSR): an
event gets the row of its first segment id (the default row if it has none),
then, round by round, the rows of its further segment ids are OR-ed in.

*Extraction.* Only the nonzero words of the final mask are visited; each round
peels off the lowest set bit of every word that still has one (``x & -x``, bit
index = ``popcount(lowest - 1)``) and writes it at the word's output offset
plus the round number, so the (event, slot) pairs come out ordered by event.
A slot becomes a hook position through the hooks grouped by account. A stable
16-bit radix argsort by hook (numpy picks radix sort for 16-bit keys) then
groups the pairs by hook with events still ascending, and the result is cut
into one array per hook.

*Costs.* Memory of the tables is about ``(accounts + distinct (account, value)
pairs) x W x 8`` bytes per restricted dimension, plus lookup tables of at most
``LUT_MAX`` int32 entries; a chunk needs a few ``CHUNK_EVENTS x W x 8`` byte
masks. ``W`` is set by the busiest account, so many small accounts next to one
account with thousands of hooks make every row that wide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter

import numpy as np

from engine.catalogue import EventCatalogue
from engine.events import Event
from engine.hooks import Hook

CHUNK_EVENTS = 65_536  # events matched at a time (bounds the E x W masks)
NONE = -1  # column value of an absent id
# event_type column value of an event whose code the catalogue lacks (removed from
# EVENT_TYPES_FILE after the event was accepted): no hook selects it, as a hook naming
# a code the catalogue lacks does not load
UNKNOWN_EVENT_TYPE = -1
LUT_MAX = 1 << 20  # largest dense lookup table (entries of int32: 4 MiB)

_U64 = np.dtype(np.uint64)
_I64 = np.dtype(np.int64)
_NO_EVENT_TYPE = np.iinfo(np.int64).min  # accepted event type of a hook without actions
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, for multiplicative hashing

# filter kind -> EventColumns attribute holding the event's value
FILTER_COLUMNS = {
    "resources": "resource_id",
    "campaigns": "campaign_id",
    "templates": "template_id",
    "pixels": "pixel_id",
}


# ---------------------------------------------------------------------------
# event columns


@dataclass
class EventColumns:
    """A batch of events as columns; ``-1`` stands for an absent id."""

    account_id: np.ndarray  # int64
    list_id: np.ndarray  # int64, -1 = none
    event_type: np.ndarray  # int32, catalogue index (EventCatalogue.index(code)), or
    # UNKNOWN_EVENT_TYPE for a code the catalogue lacks
    resource_id: np.ndarray  # int64, -1 = none
    campaign_id: np.ndarray  # int64, -1 = none
    template_id: np.ndarray  # int64, -1 = none  (Event.message_id)
    pixel_id: np.ndarray  # int64, -1 = none
    segment_values: np.ndarray  # int64, CSR values of each event's segment ids
    segment_offsets: np.ndarray  # int64, len E+1
    # codes the catalogue lacks -> how many of the events have each (``from_events``)
    unknown_types: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        n = len(self.account_id)
        for name in _SCALAR_COLUMNS:
            if np.ndim(getattr(self, name)) != 1 or len(getattr(self, name)) != n:
                raise ValueError(f"EventColumns.{name}: expected a 1-D array of {n} values")
        offsets = self.segment_offsets
        if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(self.segment_values):
            raise ValueError(
                f"EventColumns.segment_offsets: expected {n + 1} offsets from 0 to "
                f"{len(self.segment_values)} (len(segment_values))"
            )
        if n and np.any(np.diff(offsets) < 0):
            raise ValueError("EventColumns.segment_offsets: must not decrease")

    def __len__(self) -> int:
        return len(self.account_id)

    @classmethod
    def from_events(cls, events: Sequence[Event], catalogue: EventCatalogue) -> EventColumns:
        """Columns of ``events``. An event type not in ``catalogue`` (accepted before
        its code was removed from EVENT_TYPES_FILE) is UNKNOWN_EVENT_TYPE, which no
        hook selects; ``unknown_types`` counts such events by code."""
        # one pass per column through C-level iteration (map/attrgetter, fromiter):
        # several times cheaper than assigning array elements in a Python loop
        n = len(events)
        type_index = {code: catalogue.index(code) for code in catalogue.codes()}
        unknown: Counter[str] = Counter()
        try:
            etype = np.fromiter(map(type_index.__getitem__, map(_EVENT_TYPE, events)),
                                np.int32, n)
        except KeyError:  # rare: the same pass, a code the catalogue lacks mapped apart
            etype = np.fromiter(map(type_index.get, map(_EVENT_TYPE, events),
                                    repeat(UNKNOWN_EVENT_TYPE)), np.int32, n)
            unknown = Counter({code: k for code, k in Counter(map(_EVENT_TYPE, events)).items()
                               if code not in type_index})
        dims = {name: _id_column(attr, events) for name, attr in _EVENT_ATTRS.items()}
        segment_lists = [s or () for s in map(_SEGMENTS, events)]
        offsets = np.zeros(n + 1, _I64)
        np.cumsum(np.fromiter(map(len, segment_lists), _I64, n), out=offsets[1:])
        segments = np.fromiter(chain.from_iterable(segment_lists), _I64, int(offsets[-1]))
        return cls(
            account_id=np.fromiter(map(_ACCOUNT, events), _I64, n),
            event_type=etype,
            segment_values=segments,
            segment_offsets=offsets,
            unknown_types=unknown,
            **dims,
        )

    @classmethod
    def empty(cls) -> EventColumns:
        return cls.from_events([], EventCatalogue([]))

    def slice(self, start: int, stop: int) -> EventColumns:
        """Events ``start:stop`` (segment offsets rebased to 0)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        offsets = self.segment_offsets[start : stop + 1]
        return EventColumns(
            account_id=self.account_id[start:stop],
            list_id=self.list_id[start:stop],
            event_type=self.event_type[start:stop],
            resource_id=self.resource_id[start:stop],
            campaign_id=self.campaign_id[start:stop],
            template_id=self.template_id[start:stop],
            pixel_id=self.pixel_id[start:stop],
            segment_values=self.segment_values[offsets[0] : offsets[-1]],
            segment_offsets=offsets - offsets[0],
        )

    def segments_of(self, i: int) -> np.ndarray:
        return self.segment_values[self.segment_offsets[i] : self.segment_offsets[i + 1]]


_SCALAR_COLUMNS = ("account_id", "list_id", "event_type", *FILTER_COLUMNS.values())


def _id(value: int | None) -> int:
    return NONE if value is None else value


_ACCOUNT = attrgetter("account_id")
_EVENT_TYPE = attrgetter("event_type")
_SEGMENTS = attrgetter("segment_ids")
# EventColumns field -> Event attribute
_EVENT_ATTRS = {"list_id": "list_id", "resource_id": "resource_id",
                "campaign_id": "campaign_id", "template_id": "message_id",
                "pixel_id": "pixel_id"}


def _id_column(attr: str, events: Sequence[Event]) -> np.ndarray:
    try:  # every event has the id: the usual case, in one C-level pass
        return np.fromiter(map(attrgetter(attr), events), _I64, len(events))
    except TypeError:  # a None among them
        pass
    values = list(map(attrgetter(attr), events))
    if None in values:  # scans in C; a column is most often all set or all absent
        if values.count(None) == len(values):
            return np.full(len(values), NONE, _I64)
        values = [NONE if v is None else v for v in values]
    return np.array(values, _I64) if values else np.empty(0, _I64)


# ---------------------------------------------------------------------------
# compiled hooks


def _hook_restrictions(hook: Hook, catalogue: EventCatalogue) -> dict[str, list[int]]:
    """Per dimension, the values ``hook`` accepts (empty = unrestricted)."""
    return {
        "list_id": [] if hook.database == "all" else [int(hook.database)],
        # no actions (a hook saved before any was chosen) captures nothing. Every hook
        # restricts the event type, so a type no hook lists (UNKNOWN_EVENT_TYPE) gets
        # the account's default row, which is empty: such an event matches no hook
        "event_type": [catalogue.index(code) for code in hook.actions] or [_NO_EVENT_TYPE],
        **{FILTER_COLUMNS.get(kind, kind): values for kind, values in hook.filters.kinds().items()},
    }


class _IdMap:
    """Distinct int64 ids -> dense index ``0..n-1`` (in id order); any other value -> ``n``.

    A dense lookup table when the ids span at most ``LUT_MAX`` values (the usual
    case for auto-increment ids), else an open-addressing hash table (Fibonacci
    hashing, linear probing, load <= 1/4) probed for all values at once, round
    by round, each round only for the values that met another id's slot.
    """

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.unique(np.asarray(ids, _I64))
        self.n = len(self.ids)
        self._lo = self._span = 0
        self._lut: np.ndarray | None = None
        if self.n and int(self.ids[-1]) - int(self.ids[0]) < LUT_MAX:
            self._lo = int(self.ids[0])
            self._span = int(self.ids[-1]) - self._lo + 1
            self._lut = np.full(self._span + 1, self.n, np.int32)  # last entry: miss
            self._lut[self.ids - self._lo] = np.arange(self.n)
        else:
            self._build_hash()

    def _build_hash(self) -> None:
        bits = max(3, (4 * self.n - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self._mask = (1 << bits) - 1
        self._slot_key = np.zeros(1 << bits, _I64)
        self._slot_index = np.full(1 << bits, self.n, _I64)  # n = empty slot
        pending = np.arange(self.n)
        slot = self._hash(self.ids)
        while len(pending):  # insert in rounds: the first claimant of a free slot wins it
            free = np.take(self._slot_index, slot) == self.n
            claimed, first = np.unique(slot[free], return_index=True)
            winners = pending[free][first]
            self._slot_index[claimed] = winners
            self._slot_key[claimed] = self.ids[winners]
            lost = np.ones(len(pending), bool)
            lost[np.flatnonzero(free)[first]] = False
            pending, slot = pending[lost], (slot[lost] + 1) & self._mask

    def _hash(self, values: np.ndarray) -> np.ndarray:
        product = values.view(np.uint64) * _FIBONACCI  # wraps modulo 2**64
        return (product >> self._shift).astype(_I64)

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """Index of each of ``values`` (int64 array); an int32 or int64 array."""
        if not self.n:
            return np.zeros(len(values), _I64)
        if self._lut is not None:
            # modular arithmetic: values outside [lo, lo + span) land above span
            offset = (values - self._lo).view(np.uint64)
            np.minimum(offset, self._span, out=offset)
            return np.take(self._lut, offset.view(_I64))
        return self._probe(values)

    def _probe(self, values: np.ndarray) -> np.ndarray:
        slot = self._hash(values)
        found = np.take(self._slot_index, slot)
        todo = np.flatnonzero((found != self.n) & (np.take(self._slot_key, slot) != values))
        found[todo] = self.n
        slot = slot[todo]
        while len(todo):  # the slot holds another id: try the next one, until an empty slot
            slot = (slot + 1) & self._mask
            occupant = np.take(self._slot_index, slot)
            hit = (occupant != self.n) & (np.take(self._slot_key, slot) == values[todo])
            found[todo[hit]] = occupant[hit]
            keep = np.flatnonzero(~hit & (occupant != self.n))
            todo, slot = todo[keep], slot[keep]
        return found


class _Dimension:
    """Bitset rows of one dimension; see the module docstring.

    Row layout: ``0..A-1`` account default rows, ``A`` the zero row (unknown
    account), ``A+1..`` one row per distinct ``(account, value)`` key, in key order.
    A key is ``account index * (n + 1) + value index`` (``n`` distinct values;
    index ``n`` = a value no hook lists).
    """

    def __init__(
        self,
        restrictions: list[list[int]],
        acct: np.ndarray,
        slot: np.ndarray,
        n_accounts: int,
        words: int,
    ) -> None:
        per_hook = [np.unique(np.asarray(v, _I64)) for v in restrictions]
        counts = np.array([len(v) for v in per_hook], _I64)
        listed = np.concatenate(per_hook)
        hook_of = np.repeat(np.arange(len(per_hook)), counts)
        self._values = _IdMap(listed)
        self._stride = self._values.n + 1
        keys, key_row = np.unique(
            acct[hook_of] * self._stride + self._values.lookup(listed), return_inverse=True
        )
        self._n_accounts = n_accounts

        rows = np.zeros((n_accounts + 1 + len(keys), words), _U64)
        free = counts == 0
        _set_bits(rows, acct[free], slot[free])
        rows[n_accounts + 1 :] = rows[keys // self._stride]  # each key starts from its default
        _set_bits(rows, n_accounts + 1 + key_row.reshape(-1), slot[hook_of])
        self.rows = rows

        self._pair_lut: np.ndarray | None = None
        if (n_accounts + 1) * self._stride <= LUT_MAX:  # key -> row, defaults included
            lut = np.repeat(np.arange(n_accounts + 1, dtype=np.int32), self._stride)
            lut[keys] = n_accounts + 1 + np.arange(len(keys))
            self._pair_lut = lut
        else:
            self._keys = _IdMap(keys)

    def row_index(self, acct_idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Row of each (account index, value); misses fall back to the account's default."""
        key = acct_idx * self._stride + self._values.lookup(values)
        if self._pair_lut is not None:
            return np.take(self._pair_lut, key)
        ki = self._keys.lookup(key)
        return np.where(ki < self._keys.n, ki + self._n_accounts + 1, acct_idx)

    def mask(self, acct_idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.take(self.rows, self.row_index(acct_idx, values), axis=0)

    def multi_mask(
        self, acct_idx: np.ndarray, values: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray:
        """OR of the rows of each event's values (CSR); the default row when it has none.

        Round k ORs in the k-th value of the events that have more than k values
        (faster than ``np.bitwise_or.reduceat`` on wide rows).
        """
        if not len(values):
            return np.take(self.rows, acct_idx, axis=0)
        counts = np.diff(offsets)
        row = self.row_index(np.repeat(acct_idx, counts), values)
        first = np.where(counts > 0, np.take(row, np.minimum(offsets[:-1], len(row) - 1)), acct_idx)
        out = np.take(self.rows, first, axis=0)
        more = np.flatnonzero(counts > 1)
        k = 1
        while len(more):
            out[more] |= np.take(self.rows, np.take(row, offsets[more] + k), axis=0)
            k += 1
            more = more[counts[more] > k]
        return out


def _set_bits(rows: np.ndarray, row: np.ndarray, slot: np.ndarray) -> None:
    """rows[row, slot // 64] |= 1 << (slot % 64), duplicates included."""
    bits = np.left_shift(np.uint64(1), (slot % 64).astype(np.uint64))
    np.bitwise_or.at(rows, (row, slot // 64), bits)


class HookIndex:
    """The active hooks compiled into per-dimension bitset tables."""

    hooks: list[Hook]

    def __init__(
        self,
        hooks: list[Hook],
        accounts: _IdMap,
        by_account: np.ndarray,
        account_start: np.ndarray,
        dims: dict[str, _Dimension],
        all_rows: np.ndarray,
    ) -> None:
        self.hooks = hooks
        self._accounts = accounts  # account id -> account index; A when it has no active hook
        self._by_account = by_account  # hook positions grouped by account, in slot order
        self._account_start = account_start  # A + 1: an account's first entry in by_account
        self._dims = dims  # dimension name -> table, restricted dimensions only
        self._all_rows = all_rows  # (A + 1) x W: every hook of the account

    @classmethod
    def compile(cls, hooks: Iterable[Hook], catalogue: EventCatalogue) -> HookIndex:
        active = [h for h in hooks if h.active]
        account_ids = np.array([h.account_id for h in active], _I64)
        accounts = _IdMap(account_ids)
        n_acc = accounts.n
        acct = accounts.lookup(account_ids).astype(_I64)
        by_account = np.argsort(acct, kind="stable")
        per_account = np.bincount(acct, minlength=n_acc)
        account_start = np.r_[0, np.cumsum(per_account)].astype(_I64)
        slot = np.empty(len(active), _I64)  # rank of the hook among its account's hooks
        slot[by_account] = np.arange(len(active)) - account_start[acct[by_account]]
        words = max(1, -(-int(per_account.max(initial=0)) // 64))

        all_rows = np.zeros((n_acc + 1, words), _U64)
        _set_bits(all_rows, acct, slot)

        per_hook = [_hook_restrictions(h, catalogue) for h in active]
        dims: dict[str, _Dimension] = {}
        for name in ("event_type", "list_id", *FILTER_COLUMNS.values(), "segments"):
            restrictions = [r[name] for r in per_hook]
            if any(restrictions):
                dims[name] = _Dimension(restrictions, acct, slot, n_acc, words)
        return cls(active, accounts, by_account, account_start, dims, all_rows)

    def match(self, cols: EventColumns) -> dict[int, np.ndarray]:
        """Position in ``self.hooks`` -> sorted event indices it matches (no empty entries)."""
        if not self.hooks or not len(cols):
            return {}
        hook_parts, event_parts = [], []
        for start in range(0, len(cols), CHUNK_EVENTS):
            hook_pos, event_idx = self._match_chunk(cols.slice(start, start + CHUNK_EVENTS))
            hook_parts.append(hook_pos)
            event_parts.append(event_idx + start)
        return _group_by_hook(
            np.concatenate(hook_parts), np.concatenate(event_parts), len(self.hooks)
        )

    def _match_chunk(self, cols: EventColumns) -> tuple[np.ndarray, np.ndarray]:
        """(hook position, event index) pairs of one chunk, ordered by event."""
        acct_idx = self._accounts.lookup(np.asarray(cols.account_id, _I64)).astype(_I64)
        words = self._masks(cols, acct_idx).reshape(-1)
        where, count, bit = _set_bits_of(words)
        n_words = self._all_rows.shape[1]
        event = where // n_words
        # index in self._by_account of the hook of bit 0 of each nonzero word
        base = self._account_start[acct_idx[event]] + (where - event * n_words) * 64
        hook_pos = np.take(self._by_account, np.repeat(base, count) + bit)
        return hook_pos, np.repeat(event, count)

    def _masks(self, cols: EventColumns, acct_idx: np.ndarray) -> np.ndarray:
        """E x W bitsets of the hooks each event matches."""
        mask: np.ndarray | None = None
        for name, dim in self._dims.items():
            if name == "segments":
                offsets = np.asarray(cols.segment_offsets, _I64)
                values = np.asarray(cols.segment_values, _I64)
                part = dim.multi_mask(acct_idx, values, offsets)
            else:
                part = dim.mask(acct_idx, np.asarray(getattr(cols, name), _I64))
            if mask is None:
                mask = part
            else:
                mask &= part
        return np.take(self._all_rows, acct_idx, axis=0) if mask is None else mask


def _set_bits_of(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nonzero words of a uint64 array: their indices, bit counts and set bits.

    Returns ``(where, count, bit)``: ``bit`` lists the set bits of ``words[where[0]]``
    (ascending), then those of ``words[where[1]]``, and so on. Round r peels the
    lowest set bit off every word with more than r bits set and writes it at the
    word's output offset plus r.
    """
    where = np.flatnonzero(words)
    left = np.take(words, where)
    count = np.bitwise_count(left).astype(_I64)
    dest = np.cumsum(count) - count
    bit = np.empty(int(count.sum()), _I64)
    one = np.uint64(1)
    while len(left):
        lowest = left & (~left + one)
        bit[dest] = np.bitwise_count(lowest - one)  # trailing zeros
        left ^= lowest
        keep = np.flatnonzero(left)
        left, dest = left[keep], dest[keep] + 1
    return where, count, bit


def _group_by_hook(
    hook_pos: np.ndarray, event_idx: np.ndarray, n_hooks: int
) -> dict[int, np.ndarray]:
    """Split pairs ordered by event into sorted event arrays per hook."""
    if not len(hook_pos):
        return {}
    counts = np.bincount(hook_pos, minlength=n_hooks)
    keys = hook_pos.astype(np.uint16) if n_hooks <= 1 << 16 else hook_pos  # 16 bits: radix sort
    events = np.take(event_idx, np.argsort(keys, kind="stable"))
    present = np.flatnonzero(counts)
    ends = np.cumsum(counts[present]).tolist()
    starts = [0, *ends[:-1]]
    return {
        h: events[a:b] for h, a, b in zip(present.tolist(), starts, ends, strict=True)
    }


# ---------------------------------------------------------------------------
# reference


def reference_match(
    hooks: Sequence[Hook], cols: EventColumns, catalogue: EventCatalogue
) -> dict[int, np.ndarray]:
    """Plain double loop over events x active hooks; the oracle for tests and benchmarks.

    Same return shape as :meth:`HookIndex.match`: keys are positions among the
    active hooks, in input order.
    """
    active = [h for h in hooks if h.active]
    types = [{catalogue.index(code) for code in h.actions} for h in active]
    found: dict[int, list[int]] = {}
    columns = {name: getattr(cols, name).tolist() for name in (
        "account_id", "list_id", "event_type", *FILTER_COLUMNS.values())}
    for e in range(len(cols)):
        event = {name: column[e] for name, column in columns.items()}
        event["segments"] = cols.segments_of(e).tolist()
        for h, hook in enumerate(active):
            if event["event_type"] in types[h] and _reference_accepts(hook, event):
                found.setdefault(h, []).append(e)
    return {h: np.array(events, _I64) for h, events in found.items()}


def _reference_accepts(hook: Hook, event: dict) -> bool:
    if event["account_id"] != hook.account_id:
        return False
    if hook.database != "all" and event["list_id"] != hook.database:
        return False
    for kind, accepted in hook.filters.kinds().items():
        if not accepted:
            continue
        if kind == "segments":
            if not any(s in accepted for s in event["segments"]):
                return False
        elif event[FILTER_COLUMNS[kind]] not in accepted:
            return False
    return True
