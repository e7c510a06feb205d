"""Host -> device copies that do not stall the step.

`torch.tensor(data, device="cuda")` copies from pageable memory, and CUDA synchronises the
stream before such a copy: the CPU would wait for the model's forward to finish before it could
even enqueue the sampler. Staging through pinned memory and copying with non_blocking=True keeps
the copy in stream order without blocking the host (the caching host allocator keeps the pinned
buffer alive until the copy is done).
"""
from __future__ import annotations

from typing import Any

import torch


def to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
