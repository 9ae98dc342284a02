"""Closing a RabbitMQ connection ignores the close's own errors, never the cancellation
of the task closing it."""

from __future__ import annotations

import asyncio

from engine.transports.rabbitmq import _quietly


def test_a_cancelled_close_stays_cancelled() -> None:
    async def scenario() -> tuple[bool, bool]:
        hung: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(_quietly(hung))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled(), hung.cancelled()

    assert asyncio.run(scenario()) == (True, True)


def test_the_closes_own_errors_and_cancellations_are_ignored() -> None:
    async def cancelled_inside() -> None:  # as aiormq's futures, cancelled at a close
        raise asyncio.CancelledError

    async def failing() -> None:
        raise ConnectionResetError("reset by peer")

    async def scenario() -> list[None]:
        return [await _quietly(cancelled_inside()), await _quietly(failing())]

    assert asyncio.run(scenario()) == [None, None]
