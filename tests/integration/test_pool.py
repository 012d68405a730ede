"""The warm pool on real VMs: fast hand-over, refill, no double hand-out, no leaks."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from novasandbox import AsyncPool, ConfigError, Pool, PoolClosed, Sandbox, TemplateNotFound

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration


def wait_ready(pool: Pool, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready < n:
        assert time.monotonic() < deadline, f"pool has {pool.ready} of {n} ready"
        time.sleep(0.02)


def test_pool_hands_over_ready_sandboxes_and_refills(state_root: Path) -> None:
    acquired: list[Sandbox] = []
    try:
        with Pool("python", size=2, env={"FROM_POOL": "1"}) as pool:
            wait_ready(pool, 2)
            sb = pool.acquire()
            acquired.append(sb)
            assert sb.is_running() and sb.restored
            assert sb.commands.run('echo "$FROM_POOL"').stdout == "1\n"
            wait_ready(pool, 2)  # refilled in the background
            acquired.append(pool.acquire())
            assert acquired[0].id != acquired[1].id
        # closing the pool kills what it still held, not what was handed out
        assert all(s.is_running() for s in acquired)
    finally:
        for s in acquired:
            s.kill()
    assert_no_leftovers(state_root)


def test_no_sandbox_is_handed_out_twice(state_root: Path) -> None:
    got: list[Sandbox] = []
    lock = threading.Lock()
    try:
        with Pool("python", size=3, parallel=3) as pool:
            wait_ready(pool, 3)

            def take() -> None:
                sb = pool.acquire(timeout=120)
                with lock:
                    got.append(sb)

            threads = [threading.Thread(target=take) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert len({s.id for s in got}) == 6
    finally:
        for s in got:
            s.kill()
    assert_no_leftovers(state_root)


def test_closing_while_filling_leaks_nothing(state_root: Path) -> None:
    async def main() -> None:
        pool = AsyncPool("python", size=4, parallel=4)
        await pool.start()
        await asyncio.sleep(0.05)  # creations are under way
        await pool.close()
        with pytest.raises(PoolClosed):
            await pool.acquire()

    asyncio.run(main())
    assert_no_leftovers(state_root)


def test_acquired_sandbox_gets_the_pools_lifetime(state_root: Path) -> None:
    with Pool("python", size=1, timeout=120) as pool:
        sb = pool.acquire(timeout=120)
        try:
            deadline = time.monotonic() + 10
            while (sb.deadline or 0) - time.time() > 130:  # still the idle lifetime
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert sb.deadline is not None and 100 < sb.deadline - time.time() <= 120
        finally:
            sb.kill()
    assert_no_leftovers(state_root)


def test_pool_bad_input() -> None:
    with pytest.raises(ConfigError):
        Pool("python", size=0)
    with pytest.raises(TemplateNotFound):
        Pool("no-such-template")
