"""Moving step data between host and device without stalling the device queue.

On CUDA, a copy from pageable host memory waits for the stream to drain, and a read of a
device tensor (`.item()`, `.tolist()`) waits for everything queued before it. The engine
therefore uploads only from pinned memory, non-blocking, and reads back exactly once per
step (`HostCopy`). On CPU both are plain tensors and cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(values: Sequence[int] | Sequence[float] | Sequence[Sequence[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or list of rows) as a tensor on `device`, copied from pinned memory without waiting for the device."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """The one device-to-host copy of a step: started right after sampling, waited for when read."""

    def __init__(self, source: torch.Tensor) -> None:
        if source.device.type == "cpu":
            self.host, self.event = source.to("cpu"), None
        else:
            self.host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self.host.copy_(source, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> torch.Tensor:
        """The host tensor, once the copy has landed (the step's only wait on the device)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host
