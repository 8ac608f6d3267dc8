"""Moving tensors off the accelerator between phases and back, for the engines' `offload`/`reload`.

The *storage* of each tensor is copied to host memory (pinned, so the copy back is fast) and resized
to zero bytes; `reload` resizes it back and copies the bytes in. The tensor objects, and every view
of the same storage, stay as they are: parameters stay registered in their modules and optimizers,
megatron DDP's `param.main_grad` views into its grad buffers stay valid, and nothing is rebuilt.

    moved = StorageOffload()
    moved.offload(params)                       # device memory freed
    moved.offload(grad_buffers, keep=False)     # known to be zero: freed, refilled with zeros
    moved.reload()                              # same bytes back, in the same tensors
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class StorageOffload:
    """The storages moved so far (until `reload`). Host buffers are kept per tensor and reused by the
    next cycle, since allocating pinned memory is slow."""

    def __init__(self):
        self._moved: list[tuple[torch.UntypedStorage, torch.device, int, torch.Tensor | None]] = []
        self._host: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(tensor) -> (tensor, its host buffer)

    @property
    def active(self) -> bool:
        return bool(self._moved)

    @property
    def nbytes(self) -> int:
        """Device bytes currently moved out."""
        return sum(n for _, _, n, _ in self._moved)

    def offload(self, tensors: Iterable[torch.Tensor], keep: bool = True) -> None:
        """Free the storages of `tensors` (each shared storage once); keep=False when their values need not
        survive (they come back as zeros), which skips the copy."""
        seen = {s.data_ptr() for s, _, _, _ in self._moved}
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            host = None
            if keep:
                host = self._host_buffer(t, storage.nbytes())
                host.copy_(_bytes_of(storage, t.device))
            self._moved.append((storage, t.device, storage.nbytes(), host))
            storage.resize_(0)

    def _host_buffer(self, t: torch.Tensor, nbytes: int) -> torch.Tensor:
        owner, host = self._host.get(id(t), (None, None))
        if owner is None or owner() is not t or host.numel() != nbytes:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=t.is_cuda)
            self._host[id(t)] = (weakref.ref(t), host)
        return host

    def reload(self) -> None:
        for storage, device, nbytes, host in self._moved:
            storage.resize_(nbytes)
            data = _bytes_of(storage, device)
            if host is None:
                data.zero_()
            else:
                data.copy_(host)
        self._moved = []
