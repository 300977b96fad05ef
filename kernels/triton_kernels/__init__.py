"""The Triton kernels for the paged KV cache, one module per kernel; `kernels/triton_ops.py`
launches them (grids, padding, dtype choices) behind `PagedAttentionOps`.

Private to `kernels`: nothing outside `triton_ops` imports these, and nothing here is
imported until the Triton path is chosen, so CPU-only installs never need Triton. (The
folder is not called `triton`: with `kernels/` on sys.path it would shadow the real one.)

Design choices that hold across the kernels:
- GQA: one program owns one KV head and computes its whole query group at once, so every
  K/V element is loaded once per program instead of once per query head. The group is
  padded to a power of two (and to 16 rows for `tl.dot`) and the padding rows masked.
- Softmax state (running max, running sum) and the output accumulator are float32
  (`online_softmax.py`, shared by the attention kernels). The `tl.dot` inputs stay in the
  cache dtype (fp16/bf16 use tensor cores and accumulate in fp32); the dots ask for
  `input_precision="ieee"`, which only changes fp32 inputs: they are not rounded to tf32.
  (bf16 under the interpreter is the one exception: see `triton_ops._dot_dtype`.)
- Masked loads use `other=0` and masked scores are set to -inf *after* the dot, so
  whatever sits in unused slots (stale data, NaN) never reaches the output.
- Per-sequence lengths are read inside the kernels, never on the host.
"""
