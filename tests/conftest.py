"""Test-wide set-up.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process,
so it is set here, the first file pytest imports, and only where no GPU is: on a GPU
the kernels run compiled, as they serve. Only the kernel tests import triton.

Hypothesis runs derandomised (the same examples every run: a red CI run is red again on
a laptop) and keeps nothing in the checkout: no example database, its cache directory
under the system's temporary directory instead of `.hypothesis/`. Its per-example
deadline is off: a loaded machine must not fail a correct test.
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings

from tests.cluster import SHARED_ADMIN_KEY, SHARED_API_KEY, Cluster

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

hypothesis_configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pagedserve-hypothesis")
settings.register_profile("pagedserve", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("pagedserve")


@pytest.fixture(scope="session")
def hf_model_float64():  # type: ignore[no-untyped-def]
    """HF transformers' SmolLM2 in float64, loaded once for the whole run (~14 s): the
    independent reference of every greedy, logits and logprobs comparison."""
    from pagedserve.shared.model_source import default_model_source
    from tests.engine.hf_reference import hf_float64

    source = default_model_source()
    return hf_float64(source.directory, source.gguf_file)


def _cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, executor_flags: list[str], api_key: str | None = None
) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp(name), api_key=api_key, admin_key=SHARED_ADMIN_KEY, extra_executor_flags=executor_flags)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def default_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """redis-server, scheduler, executor and gateway on their defaults (the embedded model,
    `--dtype auto`), started once for every test file that only sends it requests."""
    yield from _cluster(tmp_path_factory, "default-cluster", [])


@pytest.fixture(scope="session")
def float64_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The same with the executor in float64, for token-for-token comparisons with HF
    (NOTES: exactness), and an API key (SHARED_API_KEY), started once for every such test file. Tests that kill or stop
    processes, or need other flags, start their own."""
    yield from _cluster(tmp_path_factory, "float64-cluster", ["--dtype", "float64"], api_key=SHARED_API_KEY)
