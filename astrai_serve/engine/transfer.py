"""Host <-> device copies that do not stall the step.

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


class HostCopy:
    """A device tensor on its way to the host: one non-blocking copy into pinned memory, then an
    event. `tolist()` waits for that event only, so the host blocks once, when it needs the values
    (on the CPU the tensor is simply kept)."""

    def __init__(self, packed: torch.Tensor) -> None:
        self._event = None
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(packed.device))
        else:
            self._host = packed

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class HostStaging:
    """A reusable host buffer that per-step indices are written into (as numpy) and copied from.

    On CUDA the buffer is pinned, so `device_tensor.copy_(view, non_blocking=True)` never blocks
    the host. Reusing it is safe only once the copy out of it has run: two buffers alternate, and
    `take` waits on the event `copied` recorded after the last copy out of the one it returns (a
    copy enqueued a whole step earlier, so the wait is normally free). Steps that end in the
    sampled-ids sync need no more; this also covers prefill-only steps, which end without one.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[Any] = [None, None]
        self._i = 0

    def take(self, n: int) -> tuple[torch.Tensor, Any]:
        """(host tensor, numpy view of it) of n elements, free to overwrite."""
        self._i ^= 1
        event = self._events[self._i]
        if event is not None:
            event.synchronize()
            self._events[self._i] = None
        buf = self._buffers[self._i]
        if buf is None or buf.numel() < n:
            size = max(n, 2 * buf.numel() if buf is not None else 1024)
            buf = self._buffers[self._i] = torch.empty(size, dtype=self.dtype, pin_memory=self._pinned)
        view = buf[:n]
        return view, view.numpy()

    def copied(self) -> None:
        """Call after enqueuing the copy out of the buffer last taken."""
        if self._pinned:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[self._i] = event
