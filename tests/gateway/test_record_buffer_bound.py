"""The gateway's request records while Redis is down (issue #26): buffered up to a bound
in bytes as well as in keys (10,000 requests each carrying a 1 MiB grammar in their
sampling parameters could have held 10 GB), the rest dropped and counted; what was kept
is written once a real Redis answers on that port."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import redis

from pagedserve.services.gateway.request_records import RequestRecorder
from pagedserve.services.launcher import free_port, redis_server_binary

MIB = 1 << 20


def test_records_buffered_while_redis_is_down_are_bounded_in_bytes() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    store = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(store.ping())
        except redis.ConnectionError:
            return False

    async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)  # polling interval of a condition wait

    async def main() -> None:
        recorder = RequestRecorder(url, ttl_s=60)
        await recorder.start()
        try:
            recorder.record("first", {"status": "waiting"})  # nothing listens on that port yet
            await until(lambda: not recorder._healthy, "the writer's first (failed) attempt")
            grammar = "x" * MIB
            for i in range(100):  # 100 MiB of records
                recorder.record(f"big-{i}", {"status": "waiting", "sampling_params": grammar})
            assert recorder.num_buffered_bytes <= 64 * MIB, recorder.num_buffered_bytes
            assert 30 <= recorder.num_dropped <= 40 and recorder.num_buffered == 101 - recorder.num_dropped
            kept = recorder.num_buffered
            process = subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                await until(answers, "redis-server to start")
                # (A batch leaves the buffer when its write starts: count what Redis holds.)
                await until(lambda: len(store.keys("req:*")) == kept, "the buffered records to be written")
                assert recorder.num_buffered == 0 and recorder.num_buffered_bytes == 0
                assert store.hstrlen("req:big-0", "sampling_params") == MIB
            finally:
                process.terminate()
                process.wait(timeout=10)
        finally:
            await recorder.close()

    asyncio.run(main())
    store.close()
