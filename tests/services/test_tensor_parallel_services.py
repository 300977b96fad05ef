"""A tensor-parallel replica on real processes: `pagedserve up --tensor-parallel-size 2`
(redis-server, scheduler, two executor ranks in a real gloo group, gateway) serving a small
random GQA Llama saved as an HF folder, in float64.

One test, in the order a user would meet it: the admin JSON shows the group with both
ranks (device, capacity, heartbeat); a greedy stream gives the text of an undisturbed run;
rank 1 SIGKILLed by PID mid-stream loses the group, `up` restarts both ranks, and the
stream resumes and finishes with exactly the undisturbed text, no KV block leaked.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Up, save_random_gqa_llama, wait_until
from tests.services.test_faults import Streamer, completion_body, stream

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-tp"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("tensor-parallel")
    model = workdir / "random-gqa-llama"
    save_random_gqa_llama(model)
    launcher = Up(workdir, [
        "--model", str(model), "--tensor-parallel-size", "2", "--dtype", "float64", "--max-num-batched-tokens", "32",
        "--heartbeat-timeout", "2", "--executor-timeout", "180",
    ], admin_key=ADMIN_KEY)
    try:
        launcher.wait_healthy()
        yield launcher
    finally:
        launcher.stop()


def group_serving(up: Up, min_joined: int) -> bool:
    snapshot = up.admin()
    joined = [e for e in snapshot["executor_events"] if e["event"] == "joined"]
    return len(joined) >= min_joined and len(snapshot["executors"]) == 2 and all(e["alive"] for e in snapshot["executors"])


def test_rank_killed_mid_stream_restarts_the_group_and_the_stream_finishes_undisturbed(up: Up) -> None:
    snapshot = up.admin()
    ranks = snapshot["executors"]
    assert [(e["group_id"], e["rank"], e["world_size"]) for e in ranks] == [("executor-0", 0, 2), ("executor-0", 1, 2)]
    # Beating: "alive" is the scheduler's own verdict (a heartbeat within its timeout).
    assert all(e["device"] == "cpu" and e["num_blocks"] > 0 and e["alive"] and e["last_heartbeat_age_s"] >= 0 for e in ranks)
    assert snapshot["block_pool"]["num_blocks"] == min(e["num_blocks"] for e in ranks)
    assert "2 tensor-parallel ranks" in snapshot["executor_events"][-1]["detail"]
    page = httpx.get(f"{up.base_url}/admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    assert page.status_code == 200 and "e.group_id" in page.text  # a group column, a row per rank

    body = completion_body("The history of the bicycle begins", max_tokens=160)
    undisturbed = stream(up, body)
    assert undisturbed["error"] is None and undisturbed["usage"]["completion_tokens"] == 160

    streamer = Streamer(up, body, num_chunks=4)
    streamer.wait_streaming()
    rank1 = up.pid_of("executor-rank1")
    os.kill(rank1, signal.SIGKILL)
    wait_until(lambda: up.admin()["num_executors_lost"] >= 1, 60, "the scheduler to lose the group", interval_s=0.1)
    lost = [e for e in up.admin()["executor_events"] if e["event"] == "lost"][-1]
    assert lost["executor_id"] == "executor-0" and lost["num_requeued"] == 1, lost

    # `up` restarts the whole group: both ranks are new processes.
    wait_until(lambda: up.pid_of("executor-rank1") != rank1, 30, "up to restart rank 1", interval_s=0.2)
    assert len(re.findall(r"started executor-rank0 \(pid", up.log())) == 2
    result = streamer.join()
    assert result["error"] is None and result["done"], result
    assert result["text"] == undisturbed["text"]
    assert result["usage"]["completion_tokens"] == 160 and result["finish_reason"] == "length"

    wait_until(lambda: group_serving(up, 2), 30, "the restarted group serving", interval_s=0.2)

    def no_request_and_all_blocks_free() -> bool:
        snapshot = up.admin()
        pool = snapshot["block_pool"]
        return not snapshot["running"] and not snapshot["waiting"] and pool["num_free_blocks"] == pool["num_blocks"]

    wait_until(no_request_and_all_blocks_free, 10, "every block free")
