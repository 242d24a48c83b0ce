"""Fixtures shared by the router's unit tests."""

from __future__ import annotations

import pytest_asyncio

from support.router_stubs import StubReplica


@pytest_asyncio.fixture(loop_scope="function")
async def stub():
    """One stub vLLM replica `a` serving adapter `v1` (a test module may define its own `stub` instead)."""
    r = await StubReplica("a", adapters={"v1"}).start()
    yield r
    await r.stop()
