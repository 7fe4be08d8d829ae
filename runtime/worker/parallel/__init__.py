"""Tensor parallelism, the runtime side: the process group and communicator (group.py), the step as tensors
(wire.py), the worker processes of ranks 1..N-1 (worker.py), rank 0's runner that drives them (runner.py) and
the workers' life as rank 0 sees it: one engine a process, thread budget, stopping them (lifetime.py)."""
