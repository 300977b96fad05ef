"""What more than one process uses: the msgspec messages that cross process boundaries,
the step rules both ends of the wire compute, ZeroMQ framing and CURVE keys, sampling
parameters, the tokenizer and where the model lives.

Nothing here imports torch (tests/test_import_boundaries.py): the gateway and the
scheduler import this package and must not load it. The engine's config, which speaks
torch's device and dtype, is `services/executor/config.py`.
"""
