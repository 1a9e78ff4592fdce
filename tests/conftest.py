"""pytest entry: the harness boots the real ComfyUI host and provides the fixtures."""
import os

# before torch is imported (the harness imports it): OpenMP threads sleep instead of spinning, which made a
# run 10x slower when another job shared the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from harness import *  # noqa: E402,F401,F403
from harness import families, runner, sd2, sd15, sdxl, tiny  # noqa: E402,F401  (fixtures)

import torch  # noqa: E402

if "OMP_NUM_THREADS" not in os.environ:
    # the suite runs tiny models, whose ops are small: 2 threads at most, the other cores stay free for what
    # runs beside it (on a busy 2-core machine a guided step took the same time with 1 thread and with 2)
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(_cores, 2))
