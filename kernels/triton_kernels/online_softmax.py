"""Online (streaming) softmax, shared by the decode and prefill attention kernels.

Each attention program walks its context in tiles and keeps, per query row, the running
max m of its scores, the running sum s of exp(score - m) and the unnormalised output
acc = sum exp(score - m) * v. A new tile with a larger max rescales the old state by
exp(m_old - m_new), so the result equals one softmax over the whole context without ever
holding all scores. All three stay float32 whatever the cache dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(scores, value, running_max, running_sum, acc, DOT_DTYPE: tl.constexpr):
    """Fold one tile into the state: scores fp32 [ROWS, TILE] (masked entries already
    -inf), value [TILE, HEAD_DIM_PAD] in DOT_DTYPE; returns the new (running_max,
    running_sum, acc).

    A row that has seen no visible token yet (all its scores so far -inf: a sliding-window
    row whose window starts after the tile, a padding row) keeps a zero state: its max is
    taken as 0 for the exponentials, so exp(-inf - -inf) never makes a NaN."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - finite_max)
    probs = tl.exp(scores - finite_max[:, None])
    running_sum = running_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), value, input_precision="ieee")
    return new_max, running_sum, acc


@triton.jit
def online_softmax_output(acc, running_sum):
    """The normalised output [ROWS, HEAD_DIM_PAD] fp32. running_sum is 0 only for a row
    that saw no token (an empty context, e.g. a padded batch slot): zeros there, not 0/0."""
    return acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
