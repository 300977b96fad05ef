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
from pathlib import Path

import pytest
import torch
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings

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
