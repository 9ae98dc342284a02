"""Redis losing the engine's data while it runs (a restart without persistence, a
flush, keys evicted): said as the loss it is, and no worker keeps hooks from before."""

from __future__ import annotations

import logging

import pytest
import redis

from engine.dispatch import CONSUMER_GROUP, PartitionWorker
from engine.intake import Intake
from engine.keys import Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from tests.integration.test_workers import InProcessSender, clicks, hook, one_intake
from tests.services import drop_prefix

pytestmark = pytest.mark.integration


def http_hook(url: str) -> dict[str, object]:
    return hook(target={"http_batch": {"url": url, "max_batch_size": 10,
                                       "flush_timeout_sec": 0.05}})


def test_hooks_made_again_after_redis_lost_its_data_are_loaded_though_versions_repeat(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str) -> None:
    """The versions start from 0 again: hooks made again as many times before a
    worker's next look gave the same version number, and the workers kept the hooks
    from before for good (new events sent to the old URLs, a new hook sent nothing).
    The data's epoch, written again with the engine's records, tells them apart."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    HookRegistry(redis_client, keys).create(http_hook("http://127.0.0.1:9/old"))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = InProcessSender()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    retry_worker = RetryWorker(settings, redis_client, InProcessSender())
    worker.step(block_ms=5)
    retry_worker._refresh()
    drop_prefix(redis_client, prefix)  # Redis back empty
    made = HookRegistry(redis_client, keys).create(http_hook("http://127.0.0.1:9/new"))
    assert made.id == 1 and HookRegistry(redis_client, keys).version() == 1  # as before
    intake.ensure_groups()
    intake.keep_records()  # the driver's claim renewer, after Redis came back
    intake.publish(clicks(3))
    for _ in range(5):
        worker.step(block_ms=5)
    worker.drain(5)
    assert {str(h.target.http_batch.url) for h in sender.hooks  # type: ignore[union-attr]
            } == {"http://127.0.0.1:9/new"}
    assert sum(d.count for d in sender.transport.sent) == 3
    retry_worker._refresh()
    assert str(retry_worker.hooks[1].target.http_batch.url  # type: ignore[union-attr]
               ) == "http://127.0.0.1:9/new"


def test_redis_losing_the_engines_data_while_it_runs_is_said_as_the_loss_it_is(
        redis_client: redis.Redis, keys: Keys, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    intake = one_intake(redis_client, keys, 10)
    with caplog.at_level(logging.ERROR, logger="hookray"):
        intake.keep_records()  # the start
        intake.keep_records()  # a renewal: nothing lost
        assert not caplog.records
        drop_prefix(redis_client, prefix)
        intake.keep_records()
        intake.keep_records()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(
        f"Redis lost the engine's data under REDIS_PREFIX {prefix!r} while it ran")
    assert "accepted events not yet delivered" in said[0]
    assert redis_client.exists(keys.epoch) and redis_client.hexists(keys.config, "partitions")


def running_partition(r: redis.Redis, settings: Settings, keys: Keys, name: str
                      ) -> tuple[HookRegistry, Intake, InProcessSender, PartitionWorker]:
    """The one partition of an engine with one hook (``name``), its hooks loaded and the
    data's epoch known."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(r, keys)
    registry.create(hook(name=name))
    intake = one_intake(r, keys, 10)
    intake.keep_records()
    sender = InProcessSender()
    worker = PartitionWorker(settings, r, 0, sender)
    worker.step(block_ms=5)
    return registry, intake, sender, worker


def lost_and_made_again(r: redis.Redis, prefix: str, registry: HookRegistry, intake: Intake,
                        hook_id: int) -> int:
    """Redis back empty, the engine's records written again, and a new hook that took
    ``hook_id``: returns it."""
    drop_prefix(r, prefix)
    intake.ensure_groups()
    intake.keep_records()
    assert registry.create(hook(name="new clicks")).id == hook_id
    return hook_id


def refresh_fails_once(monkeypatch: pytest.MonkeyPatch, worker: PartitionWorker) -> None:
    """The worker's next hook refresh fails, as with Redis down; the later ones pass."""
    refresh = worker.dispatcher.refresh

    def down(now: float) -> None:
        monkeypatch.setattr(worker.dispatcher, "refresh", refresh)
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(worker.dispatcher, "refresh", down)


def re_send_handed_over(r: redis.Redis, settings: Settings, keys: Keys, ok: bool = False
                        ) -> tuple[HookRegistry, Intake, Later, RetryWorker]:
    """A hook's re-send, claimed by a retry worker and handed to a sender whose outcome
    (delivered if ``ok``, else failed) waits until released."""
    from engine.transports.base import Delivery

    registry = HookRegistry(r, keys)
    old = registry.create(hook(name="old clicks"))
    intake = one_intake(r, keys, 10)
    intake.keep_records()
    RetryStore(r, keys).schedule(
        Delivery(id="d" * 32, hook_id=old.id or 0, account_id=1, kind="http_batch",
                 parts=[b'{"x":1}'], message_ids=["m1"]), 0, "HTTP 500")
    sender = Later(ok=ok)
    worker = RetryWorker(settings, r, sender)  # type: ignore[arg-type]
    assert worker.step() == 1 and list(worker.handed)
    return registry, intake, sender, worker


class Later:
    """A sender whose outcomes (failures, else deliveries if ``ok``) wait until
    released."""

    def __init__(self, ok: bool = False) -> None:
        from engine.hooks import Hook
        from engine.transports.base import Delivery, Outcome

        self.waiting: list[tuple[Delivery, Outcome]] = []
        self.sent: list[tuple[Hook, Delivery]] = []
        self.release = False
        self.ok = ok

    def submit(self, hook: object, delivery: object) -> None:
        from engine.transports.base import Outcome

        self.sent.append((hook, delivery))  # type: ignore[arg-type]
        outcome = Outcome(ok=True) if self.ok else Outcome(ok=False, error="ConnectError",
                                                           detail="refused")
        self.waiting.append((delivery, outcome))  # type: ignore[arg-type]

    def poll(self, timeout: float) -> list[object]:
        if not self.release:
            return []
        out, self.waiting = self.waiting, []
        return out  # type: ignore[return-value]

    def inflight(self) -> int:
        return len(self.waiting)

    def holds(self, delivery_id: str) -> bool:
        return False


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_batch_held_when_redis_lost_its_data_goes_to_no_new_hook_of_its_id(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        in_flight: bool) -> None:
    """The hook id counter goes with the data: the next hook made gets id 1 again. A
    batch of an event from before the loss, open or in flight (its failure coming
    after), went to that new hook, which never captured the event; it is dropped with
    the rest of the data now."""
    settings = settings.model_copy(update={"PARTITIONS": 1, "HOOK_RETRY_PERIOD_SEC": 0.001})
    flush = 0.001 if in_flight else 3600
    registry = HookRegistry(redis_client, keys)
    old = registry.create(hook(name="old clicks", target={"http_batch": {
        "url": "http://127.0.0.1:9/old", "max_batch_size": 50, "flush_timeout_sec": flush}}))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = Later()
    worker = PartitionWorker(settings, redis_client, 0, sender)  # type: ignore[arg-type]
    retry_sender = InProcessSender()
    retry_worker = RetryWorker(settings, redis_client, retry_sender)
    retry_worker._refresh()
    intake.publish(clicks(1))
    for _ in range(3):
        worker.step(block_ms=5)
    assert (len(sender.sent), worker.dispatcher.open_messages()) == \
        ((1, 0) if in_flight else (0, 1))
    drop_prefix(redis_client, prefix)  # Redis back empty
    intake.ensure_groups()
    intake.keep_records()  # the driver's claim renewer
    new = registry.create(hook(name="new opens", actions=["open"]))
    assert new.id == old.id
    sender.release = True
    for _ in range(3):
        worker.step(block_ms=5)
        retry_worker.step()
    worker.drain(0.1)
    retry_worker.step()
    assert [h.name for h, _ in sender.sent] == (["old clicks"] if in_flight else [])
    assert [h.name for h in retry_sender.hooks] == []
    assert RetryStore(redis_client, keys).pending() == 0


def test_a_refused_batch_is_not_handed_over_before_the_hooks_are_loaded_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch the sender refused waits for the next round; that round's hook refresh
    failing, it went for its hook as it was (deleted since: to the destination the
    hook was deleted to stop); now it waits for hooks loaded again."""
    from tests.integration.test_round_failures import refused_batch, steps

    registry, hook_id, sender, worker = refused_batch(redis_client, settings, keys)
    registry.delete(hook_id)
    refresh_fails_once(monkeypatch, worker)
    assert [type(e) for e in steps(worker, 1)] == [redis.ConnectionError]
    assert sender.transport.sent == []
    steps(worker, 3)
    worker.drain(5)
    assert sender.transport.sent == []


@pytest.mark.parametrize("made_again", [False, True])
def test_a_failed_rounds_entry_taken_up_after_the_loss_is_dropped_with_the_data(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        monkeypatch: pytest.MonkeyPatch, made_again: bool) -> None:
    """Redis goes down mid-round (the entry waits to be processed again), and comes back
    empty: the next round takes the entry up before its refresh finds the data lost.
    It was processed anyway, for a new hook that took the old one's id, and its count
    left the partition holding -1 messages for good."""
    registry, intake, sender, worker = running_partition(redis_client, settings, keys,
                                                          "old clicks")
    intake.publish(clicks(1))
    refresh_fails_once(monkeypatch, worker)
    with pytest.raises(redis.ConnectionError):
        worker.step(block_ms=5)
    assert len(worker.again) == 1 and worker.unsettled == 1
    drop_prefix(redis_client, prefix)  # Redis back empty
    intake.ensure_groups()
    intake.keep_records()
    if made_again:
        registry.create(hook(name="new clicks"))
    for _ in range(3):
        worker.step(block_ms=5)
    assert worker.drain(0.5) == 0
    assert worker.unsettled == 0 and not worker._holds_work()
    assert [h.name for h in sender.hooks] == []


def test_a_re_send_handed_over_before_the_loss_is_not_booked_for_a_new_hook(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str) -> None:
    """The retry worker's re-send in flight when Redis lost its data fails afterwards:
    its failure was scheduled under its hook id, which a new hook had taken, and sent
    to that hook."""
    import time

    settings = settings.model_copy(update={"PARTITIONS": 1, "HOOK_RETRY_PERIOD_SEC": 0.001})
    registry, intake, sender, worker = re_send_handed_over(redis_client, settings, keys)
    lost_and_made_again(redis_client, prefix, registry, intake,
                        sender.sent[0][1].hook_id)  # type: ignore[attr-defined]
    sender.release = True
    for _ in range(5):
        worker.step()
        time.sleep(0.01)
    assert [h.name for h, _ in sender.sent] == ["old clicks"]  # type: ignore[attr-defined]
    assert RetryStore(redis_client, keys).pending() == 0 and not worker.handed


def test_a_stop_whose_hooks_cannot_be_loaded_leaves_a_refused_batch_unsent(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.integration.test_round_failures import refused_batch

    registry, hook_id, sender, worker = refused_batch(redis_client, settings, keys)
    registry.delete(hook_id)

    def refused(now: float) -> None:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(worker.dispatcher, "refresh", refused)
    worker.drain(0.3)
    assert sender.transport.sent == []  # its entry is read again by the next start


def lost_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the workers said of the loss (the driver says it too, as an error)."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "Redis lost the engine's data" in r.getMessage()]


def nothing_booked_for(r: redis.Redis, keys: Keys, hook_id: int) -> None:
    """Nothing of the old data under ``hook_id``: no count, re-send or dead letter."""
    store = RetryStore(r, keys)
    assert not any(Stats(r, keys).get(hook_id).values())
    assert store.pending() == 0
    assert store.dead_letters() == [] and store.dead_letters(hook_id=hook_id) == []


@pytest.mark.parametrize("outcome", ["delivered", "failed", "dead"])
def test_a_stopping_retry_worker_books_no_outcome_of_a_re_send_from_before_the_loss(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        caplog: pytest.LogCaptureFixture, outcome: str) -> None:
    """Stopped in the moment between the loss and its next step, the retry worker's
    drain booked the outcome of a re-send handed over before (no refresh in between
    to find the loss): under its hook id, which a new hook had taken (counted in its
    stats, a re-send or a dead letter of it)."""

    settings = settings.model_copy(update={
        "PARTITIONS": 1, "HOOK_RETRY_TIMES": 0 if outcome == "dead" else 3})
    registry, intake, sender, worker = re_send_handed_over(
        redis_client, settings, keys, ok=outcome == "delivered")
    new = lost_and_made_again(redis_client, prefix, registry, intake,
                              sender.sent[0][1].hook_id)  # type: ignore[attr-defined]
    sender.release = True
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert worker.drain(1) == 0
    nothing_booked_for(redis_client, keys, new)
    assert not worker.handed and not worker.settling
    assert lost_said(caplog) == ["retry worker: Redis lost the engine's data; the outcomes "
                                 "of 1 re-send(s) handed over before are dropped with it"]


@pytest.mark.parametrize(("booked_by", "outcome"), [
    ("round", "failed"), ("round", "delivered"), ("stop", "failed"),
    ("stop", "delivered"), ("stop", "unanswered")])
def test_a_partition_whose_refresh_fails_after_the_loss_books_nothing_from_before(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        booked_by: str, outcome: str) -> None:
    """Redis loses its data while a batch is in flight; the round or the stop that
    books its outcome (or schedules it unanswered, at a stop) cannot refresh first
    (Redis failing it), so nothing found the loss: the outcome went into the new data,
    under the batch's hook id, which a new hook had taken."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    registry.create(hook(name="old clicks", target={"http_batch": {
        "url": "http://127.0.0.1:9/old", "max_batch_size": 50, "flush_timeout_sec": 0.001}}))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = Later(ok=outcome == "delivered")
    worker = PartitionWorker(settings, redis_client, 0, sender)  # type: ignore[arg-type]
    intake.publish(clicks(1))
    for _ in range(3):
        worker.step(block_ms=5)
    assert len(sender.sent) == 1 and worker.unsettled == 1  # in flight
    new = lost_and_made_again(redis_client, prefix, registry, intake,
                              sender.sent[0][1].hook_id)  # type: ignore[attr-defined]

    def down(now: float) -> None:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(worker.dispatcher, "refresh", down)
    sender.release = outcome != "unanswered"
    with caplog.at_level(logging.WARNING, logger="hookray"):
        if booked_by == "round":
            with pytest.raises(redis.ConnectionError):
                worker.step(block_ms=5)
        assert worker.drain(0.2) == 0
    nothing_booked_for(redis_client, keys, new)
    assert worker.unsettled == 0 and not worker._holds_work()
    held = {"failed": "1 message(s) in batches, 1 outcome(s) and 0 hook count(s)",
            "delivered": "0 message(s) in batches, 0 outcome(s) and 1 hook count(s)",
            "unanswered": "1 message(s) in batches, 0 outcome(s) and 0 hook count(s)"}
    assert lost_said(caplog) == [
        "partition 0: Redis lost the engine's data; what the partition held of events "
        f"from before is dropped with it: {held[outcome]} not booked yet"]


def test_a_round_whose_count_meets_the_loss_counts_and_sends_nothing_from_before(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Redis loses its data between a round's refresh and its count of the matches:
    the count went into the new data, under the hook id a new hook had taken, and
    the round's events were batched and sent for the hooks from before."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    old = registry.create(hook(name="old clicks"))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = InProcessSender()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    worker.step(block_ms=5)  # the hooks loaded, the epoch known
    intake.publish(clicks(2))
    refresh = worker.dispatcher.refresh

    def then_lost(now: float) -> None:
        refresh(now)
        monkeypatch.setattr(worker.dispatcher, "refresh", refresh)
        drop_prefix(redis_client, prefix)  # Redis back empty
        intake.ensure_groups()
        intake.keep_records()
        assert registry.create(hook(name="new clicks")).id == old.id

    monkeypatch.setattr(worker.dispatcher, "refresh", then_lost)
    with caplog.at_level(logging.WARNING, logger="hookray"):
        for _ in range(3):
            worker.step(block_ms=5)  # no round fails
        assert worker.drain(0.5) == 0
    assert sender.hooks == []
    nothing_booked_for(redis_client, keys, old.id or 0)
    assert lost_said(caplog) == [
        "partition 0: Redis lost the engine's data; what the partition held of events "
        "from before is dropped with it: 0 message(s) in batches, 0 outcome(s) and 1 hook "
        "count(s) not booked yet"]


def test_a_booking_goes_only_into_the_data_of_the_epoch_it_carries(
        redis_client: redis.Redis, keys: Keys) -> None:
    """book_once.lua refuses a booking of another epoch than the stored one, or of
    one where none is stored (Redis lost the data since): nothing of it is made, nor
    its token kept. One of the stored epoch is made once; one that carries none (its
    worker read none) is not checked."""
    from engine.stores import Booking, DataLost

    booking, stats, tokens = Booking(redis_client, keys.epoch), Stats(redis_client, keys), \
        keys.booked("retry")

    def book(once: tuple[str, str] | None, epoch: bytes | None) -> None:
        with booking(once, epoch) as pipe:
            stats.add(pipe, 1, "delivered", 1)

    redis_client.set(keys.epoch, "e2")
    for once in ((tokens, "t1"), None):
        with pytest.raises(DataLost, match=f"{keys.epoch} is not the epoch"):
            book(once, b"e1")
    redis_client.delete(keys.epoch)
    with pytest.raises(DataLost):
        book((tokens, "t1"), b"e2")
    assert stats.get(1)["delivered"] == 0 and redis_client.llen(tokens) == 0
    redis_client.set(keys.epoch, "e2")
    book((tokens, "t1"), b"e2")
    book((tokens, "t1"), b"e2")  # sent again after a lost reply
    assert stats.get(1)["delivered"] == 1
    book(None, b"e2")  # no token: checked, made each time
    book((tokens, "t2"), None)  # no epoch read: not checked
    book(None, None)  # neither: a MULTI
    assert stats.get(1)["delivered"] == 4
    assert redis_client.lrange(tokens, 0, -1) == [b"t2", b"t1"]


def test_an_entry_of_the_new_data_a_failed_round_held_is_taken_up_at_once(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round reads an entry of the new data after the loss, and its refresh fails: the
    next round finds the loss and drops what the partition held, that entry too. It is
    still pending (nothing lost), but only the minute-wise orphan check took it up
    again, 30-90 s late and out of order."""
    registry, intake, sender, worker = running_partition(redis_client, settings, keys,
                                                          "old")
    drop_prefix(redis_client, prefix)  # Redis back empty
    intake.ensure_groups()
    intake.keep_records()
    registry.create(hook(name="new", target={"http_batch": {
        "url": "http://127.0.0.1:9/in", "flush_timeout_sec": 0.001}}))
    intake.publish(clicks(1))  # an event of the new data
    refresh_fails_once(monkeypatch, worker)
    with pytest.raises(redis.ConnectionError):
        worker.step(block_ms=5)  # the entry read, its round failed: held for the next
    assert len(worker.again) == 1
    for _ in range(5):  # the loss found, what was held dropped; the entry taken up again
        worker.step(block_ms=5)
    assert worker.drain(1) == 0
    assert [h.name for h in sender.hooks] == ["new"]
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0


def test_a_re_send_of_the_new_data_is_claimed_for_no_hook_of_the_old(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis loses its data between the retry worker's refresh and its claim: a re-send
    of the new data, of the id a new hook took, went to the old hook's destination with
    its secrets. None is claimed then; the next step loads the new hooks."""
    from engine.transports.base import Delivery

    registry = HookRegistry(redis_client, keys)
    old = registry.create(http_hook("http://127.0.0.1:9/old"))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = Later(ok=True)
    worker = RetryWorker(settings, redis_client, sender)  # type: ignore[arg-type]
    assert worker.step() == 0  # the hooks and the epoch loaded
    store = worker.side.retry
    claim = store.claim_due

    def lost_then_claim(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(store, "claim_due", claim)
        drop_prefix(redis_client, prefix)  # Redis back empty, right after the refresh
        intake.keep_records()
        new = registry.create(http_hook("http://127.0.0.1:9/new"))
        assert new.id == old.id
        RetryStore(redis_client, keys).schedule(Delivery(
            id="n" * 32, hook_id=new.id or 0, account_id=new.account_id,
            kind="http_batch", parts=[b'{"new":1}'], message_ids=["m1"]), 0, "HTTP 500")
        return claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "claim_due", lost_then_claim)
    assert worker.step() == 0
    assert sender.sent == []
    assert worker.step() == 1  # the new hooks loaded: claimed for the new hook
    assert [h.target.settings.url for h, _ in sender.sent] == ["http://127.0.0.1:9/new"]
