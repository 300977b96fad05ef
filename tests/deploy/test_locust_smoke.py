"""load_tests/locustfile.py against `pagedserve up` (redis, scheduler, executor, gateway as
local processes, exactly as `make run` starts them): a short headless run must stream from both endpoints without a failure and
write TTFT and ITL entries to the CSV stats, which is what `make loadtest` and the compose
`locust` service rely on. An API key is set so that the locustfile's key handling is
exercised too (without it every request would be a 401 failure)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import httpx

from pagedserve.services.launcher import free_port, pagedserve_command
from tests.cluster import port_open, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
API_KEY = "smoke-test-key"


@dataclass
class Up:
    base_url: str
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`pagedserve up` on a free port; torn down with SIGTERM, which must stop every
    service cleanly (exit code 0, the port closed)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("up") / "up.log"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*pagedserve_command(), "up", "--port", str(port), "--api-key", API_KEY,
             "--kv-cache-memory", str(256 << 20)],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            def healthy() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"pagedserve up exited:\n{log_path.read_text()[-4000:]}")
                try:
                    return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(healthy, 180, "pagedserve up to be healthy", interval_s=0.25)
            yield Up(base_url, process)
        finally:
            process.terminate()
            assert process.wait(timeout=60) == 0, log_path.read_text()[-4000:]
            assert not port_open(port)
    assert "pagedserve is up: " + base_url in log_path.read_text()


def test_headless_run_records_ttft_and_itl(up: Up, tmp_path: Path) -> None:
    prefix = tmp_path / "stats"
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO / "load_tests" / "locustfile.py"),
        "--headless", "-u", "4", "-r", "4", "-t", "15s", "--host", up.base_url, "--csv", str(prefix),
        # Four users: two of each class (locust splits users evenly by weight). Streams still running at the 15 s mark finish (and are counted) instead of being
        # cut off; on CPU one stream of up to 128 tokens takes a few seconds.
        "--stop-timeout", "120",
    ]
    env = dict(os.environ, PAGEDSERVE_API_KEY=API_KEY, LOADTEST_SEED="0")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout[-3000:] + result.stderr[-5000:]
    # Locust exits 1 when any request failed; the CSV below says which.
    stats_file = Path(f"{prefix}_stats.csv")
    assert stats_file.exists(), output
    with stats_file.open(newline="") as file:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}

    for path in ("/v1/chat/completions", "/v1/completions"):
        for entry in ("POST", "E2E", "TTFT", "ITL"):
            assert (entry, path) in rows, f"no {entry} {path} row in {sorted(rows)}\n{output}"
            assert int(rows[entry, path]["Request Count"]) > 0
        # Each finished stream gives one E2E and one TTFT sample, and ITL gaps between tokens.
        assert int(rows["TTFT", path]["Request Count"]) <= int(rows["POST", path]["Request Count"])
        assert float(rows["TTFT", path]["Median Response Time"]) > 0
    failures = {key: row["Failure Count"] for key, row in rows.items() if int(row["Failure Count"]) != 0}
    assert not failures, f"failures: {failures}\n{output}"
    assert result.returncode == 0, output
