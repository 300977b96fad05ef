"""The executor process's typed config: its engine (services/engine/config.py) and how
it reaches its scheduler. Torch-free: the CLI builds it in every process."""

from __future__ import annotations

import msgspec

from pagedserve.services.engine.config import EngineConfig


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True):
    """An executor process: its engine, and how it reaches its scheduler."""

    engine: EngineConfig
    scheduler_address: str = "tcp://127.0.0.1:5556"
    executor_id: str = ""  # "": a fresh random id
    heartbeat_interval_s: float = 1.0  # the scheduler counts it lost after its heartbeat timeout
    curve_keys_dir: str | None = None  # CURVE-secure the link to the scheduler (shared/zmq_security.py)
    # Tensor parallel: this process's rank among engine.tensor_parallel_size, and the
    # group's rendezvous (tcp://host:port; None: torch's MASTER_ADDR/MASTER_PORT env vars).
    rank: int = 0
    dist_init_address: str | None = None
