"""Test-wide set-up.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process,
so it is set here, the first file pytest imports. Only the kernel tests import triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
