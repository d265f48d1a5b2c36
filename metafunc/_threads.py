"""How many CPU threads a meta-training process should give torch.

torch starts as many intra-op threads as the machine has cores, whatever the work. Meta-learning
runs many small kernels (a 1-40-40-1 MLP on 10 points per task): split over several OpenMP
threads they gain little when the machine is idle, and on a shared machine, where another process
holds a core, every kernel waits for its slowest thread. The README's main job took 39 s with one
thread and 533 s with two while another process loaded the 2-core machine
(``benchmarks/README.md``, "Threads").

The rule: the cores this process may run on (``os.sched_getaffinity``, not ``os.cpu_count``: a
container or ``taskset`` gives fewer) shared between the processes ``torchrun`` started on this
host, and one thread when the work is small (a forward pass over the support sets of a
meta-batch below :data:`SMALL_WORK` floating-point operations, as counted by
``torch.utils.flop_counter``), where more threads cost more than they give.
"""

from __future__ import annotations

import os

__all__ = ["SMALL_WORK", "available_cores", "choose_threads"]

# FLOPs of one forward pass over a meta-batch's support sets below which one thread is used:
# the sinusoid MLP's (25 tasks x 10 points) is 8.4e5, the 4-conv glyph net's (16 tasks x 5
# images of 28x28) 4.1e8
SMALL_WORK = 10**7


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_threads(
    requested: int | None, *, work: float, local_processes: int = 1, cores: int | None = None
) -> tuple[int, str]:
    """The intra-op thread count for one process, and the reason in words.

    Args:
      requested: a count the user asked for (``--threads``), taken as it is; ``None`` to choose.
      work: floating-point operations of one forward pass over a meta-batch's support sets (an
        estimate is enough).
      local_processes: processes sharing this host's cores (``torchrun``'s LOCAL_WORLD_SIZE).
      cores: the cores to share (default :func:`available_cores`).

    Returns:
      ``(threads, reason)``.

    >>> choose_threads(None, work=8.4e5, cores=8)
    (1, 'small meta-step (8e+05 FLOPs < 1e+07): one thread')
    >>> choose_threads(None, work=1e10, cores=8, local_processes=2)
    (4, '8 usable cores shared by 2 processes on this host')
    >>> choose_threads(3, work=1e6, cores=8)
    (3, 'asked for (--threads 3)')
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(
                f"choose_threads(requested=...): expected a positive int or None, got {requested!r}"
            )
        return requested, f"asked for (--threads {requested})"
    if cores is None:
        cores = available_cores()
    share = max(1, cores // max(1, local_processes))
    if work < SMALL_WORK:
        return 1, f"small meta-step ({work:.0e} FLOPs < {SMALL_WORK:.0e}): one thread"
    if local_processes > 1:
        return share, f"{cores} usable cores shared by {local_processes} processes on this host"
    return share, f"{cores} usable cores"
