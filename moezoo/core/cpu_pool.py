"""An opt-in pool of large CPU buffers for the experts kernel (off by default).

On CPU, a fresh multi-hundred-MB ``torch.empty`` page-faults on first touch, and at small hidden sizes those faults can
cost more than the elementwise arithmetic of an MoE layer. With the pool on, the experts kernel
(:mod:`moezoo.core.experts`) takes its large temporaries from here and reuses them once nothing else references them.
It is off unless asked for, because it relies on a private PyTorch counter (``torch._C._storage_Use_Count``) to tell
when a buffer is free::

    from moezoo.core import cpu_pool
    cpu_pool.enable()                 # or MOEZOO_CPU_BUFFER_POOL=1 in the environment
    ...
    cpu_pool.empty_cache()            # drop the free buffers
    cpu_pool.enable(False)

Accelerators never use it (their caching allocators already do this).
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["BufferPool", "POOL", "enable", "enabled", "empty_cache"]


class BufferPool:
    """Reuses the large CPU buffers of the experts kernel once nothing but the pool references them.

    A buffer handed out is a view of a pooled flat tensor; it becomes free again when every view of it is gone
    (storage use count back to the pool's own reference), e.g. after autograd released the saved tensors, or after
    ``AccumulateGrad`` added a weight gradient into ``.grad``.  A gradient that autograd kept (as ``.grad``) or that a
    caller still holds is never reused.  This avoids the page faults of fresh multi-hundred-MB allocations at every
    step, which cost more than the elementwise arithmetic of the layer.  ``empty_cache()`` drops the free buffers.
    """

    min_bytes = 1 << 20

    def __init__(self, max_free_bytes: int = 4 << 30):
        import threading

        self._bufs: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.max_free_bytes = max_free_bytes
        self._enabled = False

    @staticmethod
    def _in_use(buf: torch.Tensor) -> bool:
        # the temporary storage object made by untyped_storage() holds one reference, the pool another
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) > 2

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self, enabled: bool = True) -> None:
        """Turn the pool on (or off: later requests get plain ``torch.empty``; ``empty_cache`` frees the buffers)."""
        self._enabled = bool(enabled)
        if not enabled:
            self.empty_cache()

    def disabled(self):
        """Context manager: plain allocations inside (the compiled path's outputs leave the kernel)."""
        import contextlib

        @contextlib.contextmanager
        def _off():
            prev, self._enabled = self._enabled, False
            try:
                yield
            finally:
                self._enabled = prev

        return _off()

    def empty(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        if not self._enabled or device.type != "cpu" or numel * torch.finfo(dtype).bits // 8 < self.min_bytes:
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            best = None
            for buf in self._bufs:
                if buf.dtype == dtype and numel <= buf.numel() <= numel + numel // 4 and not self._in_use(buf):
                    if best is None or buf.numel() < best.numel():
                        best = buf
            if best is None:
                best = torch.empty(numel + numel // 8, dtype=dtype, device=device)
                self._bufs.append(best)
                self._trim()
            return best[:numel].view(shape)

    def _trim(self) -> None:
        free = [b for b in self._bufs if not self._in_use(b)]
        total = sum(b.numel() * b.element_size() for b in free)
        for b in sorted(free, key=lambda t: t.numel()):
            if total <= self.max_free_bytes:
                break
            self._bufs.remove(b)
            total -= b.numel() * b.element_size()

    def empty_cache(self) -> None:
        with self._lock:
            self._bufs = [b for b in self._bufs if self._in_use(b)]


POOL = BufferPool()
POOL.enable(os.environ.get("MOEZOO_CPU_BUFFER_POOL", "0").lower() in ("1", "true", "yes"))


def enable(enabled: bool = True) -> None:
    """Turn the CPU buffer pool of the experts kernel on (``False``: off, and its buffers are freed)."""
    POOL.enable(enabled)


def enabled() -> bool:
    return POOL.enabled


def empty_cache() -> None:
    """Release the CPU buffers the experts kernel keeps for reuse."""
    POOL.empty_cache()
