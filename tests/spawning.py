"""Spawning gloo test processes with a deadline: a rank stuck in a collective fails the test instead of hanging it."""

from __future__ import annotations

import datetime
import time

import torch.multiprocessing as mp

# Every limit on a process the tests start, stated once. Generous on purpose: on a loaded machine (2 cores shared with
# other CPU-heavy work) a test may get slow, it must not fail; the limits only turn a hang into a failure.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)  # one rank waiting in one collective (init_process_group)
SPAWN_DEADLINE_S = 900  # a whole spawn of ranks, whatever happens in it
SUBPROCESS_TIMEOUT_S = 900  # a script run as a subprocess (the examples, the benchmarks)


def spawn_with_deadline(worker, args: tuple, world: int, deadline_s: float) -> None:
    """worker(rank, *args) in `world` processes; re-raises a process's exception, and after `deadline_s` raises
    TimeoutError, ending every process still running either way."""
    context = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} still running after {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(10)
