"""serving.cancel: the flags that stop a generation, found by fal request id or set on disconnect."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

from serving.cancel import (
    CLIENT_DISCONNECTED,
    CancelFlag,
    InFlight,
    acquire_unless_cancelled,
    cancel_on_disconnect,
    cancel_request,
    request_id_of,
)


def test_a_flag_keeps_the_first_reason_it_was_given():
    flag = CancelFlag()
    assert not flag.is_set() and flag.reason is None
    flag.cancel("client disconnected")
    flag.cancel("cancelled through POST /cancel")
    assert flag.is_set() and flag.reason == "client disconnected"


def test_a_registered_request_is_cancelled_by_its_id_until_its_block_ends():
    in_flight = InFlight()
    with in_flight.register("req-1") as (request_id, flag):
        assert request_id == "req-1"
        assert in_flight.cancel("req-1", "test") is True
        assert flag.is_set() and flag.reason == "test"
    assert in_flight.cancel("req-1", "test") is False


def test_a_request_without_a_fal_id_gets_a_distinct_local_one():
    in_flight = InFlight()
    with in_flight.register(None) as (first, _), in_flight.register(None) as (second, _):
        assert (first, second) == ("local-1", "local-2")


def test_cancelling_an_unknown_request_reports_false():
    assert InFlight().cancel("nobody", "test") is False


def test_two_requests_in_flight_under_one_id_are_both_cancelled():
    in_flight = InFlight()
    with in_flight.register("dup") as (_, first), in_flight.register("dup") as (_, second):
        assert in_flight.cancel("dup", "test") is True
        assert first.is_set() and second.is_set()


def test_the_first_of_two_requests_under_one_id_stays_reachable_after_the_second_ends():
    in_flight = InFlight()
    with in_flight.register("dup") as (_, first):
        with in_flight.register("dup") as (_, second):
            pass
        assert in_flight.cancel("dup", "test") is True
        assert first.is_set() and not second.is_set()
    assert in_flight.cancel("dup", "test") is False


def test_the_second_of_two_requests_under_one_id_stays_reachable_after_the_first_ends():
    in_flight = InFlight()
    first_block = in_flight.register("dup")
    _, first = first_block.__enter__()
    with in_flight.register("dup") as (_, second):
        first_block.__exit__(None, None, None)
        assert in_flight.cancel("dup", "test") is True
        assert second.is_set() and not first.is_set()
    assert in_flight.cancel("dup", "test") is False


def cancel_call(request_id: str) -> SimpleNamespace:
    return SimpleNamespace(headers={"x-fal-request-id": request_id}, url=SimpleNamespace(path="/cancel"))


def test_the_404_for_an_unknown_request_echoes_its_id_cut_at_100_characters():
    with pytest.raises(HTTPException) as refused:
        cancel_request(InFlight(), cancel_call("x" * 100_000))
    assert refused.value.status_code == 404
    assert refused.value.detail == f"no request {'x' * 100!r}... is in flight (finished, or never started)"


def test_the_404_for_an_unknown_request_echoes_a_short_id_whole():
    with pytest.raises(HTTPException) as refused:
        cancel_request(InFlight(), cancel_call("no-such-request"))
    assert refused.value.detail == "no request 'no-such-request' is in flight (finished, or never started)"


def test_the_request_id_comes_from_falls_header():
    assert request_id_of({"x-fal-request-id": " abc "}) == "abc"
    assert request_id_of({"x-fal-request-id": " "}) is None
    assert request_id_of({}) is None


class FakeRequest:
    """An ASGI request whose client disconnects when ``gone`` is set."""

    def __init__(self):
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_a_client_disconnect_sets_the_flag_inside_the_block():
    async def scenario() -> CancelFlag:
        request, flag = FakeRequest(), CancelFlag()
        async with cancel_on_disconnect(request, flag):
            request.gone.set()
            while not flag.is_set():
                await asyncio.sleep(0)
        return flag

    assert asyncio.run(scenario()).reason == CLIENT_DISCONNECTED


def test_no_disconnect_leaves_the_flag_unset_and_the_watch_ends_with_the_block():
    async def scenario() -> tuple[CancelFlag, set]:
        request, flag = FakeRequest(), CancelFlag()
        async with cancel_on_disconnect(request, flag):
            await asyncio.sleep(0)
        return flag, {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    flag, left = asyncio.run(scenario())
    assert not flag.is_set() and left == set()


def test_the_lock_is_taken_when_free_and_given_up_when_cancelled_while_held():
    lock, flag = threading.Lock(), CancelFlag()
    assert acquire_unless_cancelled(lock, flag) is True  # free: taken
    flag.cancel("test")
    assert acquire_unless_cancelled(lock, flag) is False  # held, and cancelled while waiting
    lock.release()
    assert acquire_unless_cancelled(lock, flag) is False  # free, but cancelled: not taken
    assert not lock.locked()
