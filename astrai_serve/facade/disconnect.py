"""Waiting on the core while watching the HTTP client: a disconnect cancels the wait.

A client that hangs up mid-request must not keep its generation running in the engine; every
route that awaits the core races the await against the ASGI disconnect message.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected while we waited for the core."""


async def wait_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI receive() only returns on disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """The awaitable's result; ClientGone (and the awaitable cancelled) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    raise ClientGone()
