"""Started by torchrun in a test: rank 1 raises while rank 0 waits in a collective."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
if dist.get_rank() == 1:
    raise RuntimeError("rank 1 fails on purpose")
dist.all_reduce(torch.ones(1))  # never completes: the launcher must end this rank
