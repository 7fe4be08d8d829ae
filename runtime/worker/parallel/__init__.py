"""Tensor parallelism, the runtime side: the process group and communicator (group.py), the step as tensors
(wire.py), the worker processes of ranks 1..N-1 (worker.py) and rank 0's runner that drives them (runner.py)."""
