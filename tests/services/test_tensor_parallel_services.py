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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagedserve.services.launcher import free_port
from tests.cluster import wait_until
from tests.services.test_faults import Streamer, completion_body, stream

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-tp"


def save_random_gqa_llama(directory: Path) -> None:
    """8 query heads and 2 KV heads: one KV head per rank at T = 2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.shared.model_source import default_model_source
    from pagedserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_source())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(4321)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


class Up:
    """`pagedserve up` as a subprocess, its log in a file (it names each child's PID)."""

    def __init__(self, workdir: Path, flags: list[str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "up.log"
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.services.cli", "up", "--port", str(self.port), "--admin-key", ADMIN_KEY, *flags],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pid_of(self, service: str) -> int:
        """The PID of `service`'s latest start, as `up` logged it."""
        return int(re.findall(rf"started {re.escape(service)} \(pid (\d+)\)", self.log())[-1])

    def admin(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/admin/scheduler", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("tensor-parallel")
    model = workdir / "random-gqa-llama"
    save_random_gqa_llama(model)
    launcher = Up(workdir, [
        "--model", str(model), "--tensor-parallel-size", "2", "--dtype", "float64", "--max-num-batched-tokens", "32",
        "--heartbeat-timeout", "2", "--executor-timeout", "180",
    ])
    try:
        def healthy() -> bool:
            assert launcher.process.poll() is None, launcher.log()[-5000:]
            try:
                return httpx.get(f"{launcher.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 240, "the gateway's /health", interval_s=0.25)
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
    assert all(e["device"] == "cpu" and e["num_blocks"] > 0 and e["last_heartbeat_age_s"] < 2 for e in ranks)
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
    killed_at = time.monotonic()
    wait_until(lambda: up.admin()["num_executors_lost"] >= 1, 30, "the scheduler to lose the group", interval_s=0.1)
    lost = [e for e in up.admin()["executor_events"] if e["event"] == "lost"][-1]
    assert lost["executor_id"] == "executor-0" and lost["num_requeued"] == 1, lost
    assert time.monotonic() - killed_at < 10

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
