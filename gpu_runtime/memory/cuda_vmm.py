"""CUDA virtual memory management through the driver API (cuda-python ``cuda.bindings.driver``).

Physical memory comes as fixed-size chunks (``cuMemCreate``); each model reserves virtual ranges once
(``cuMemAddressReserve``) and chunks are mapped into and unmapped out of its slots (``cuMemMap`` /
``cuMemUnmap``). The virtual address of a model's weights therefore never changes, whatever physical chunk
backs a slot at the moment: tensors and captured CUDA graphs that point at it stay valid across eviction and
re-warming. torch sees a range through ``__cuda_array_interface__``, without a copy.

Every driver call goes through ``_check`` so a failure raises ``CudaVmmError`` naming the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_runtime import device_sync

try:
    from cuda.bindings import driver as cu
except ImportError:  # cuda-python < 12.6 spells the module differently
    from cuda import cuda as cu  # type: ignore[no-redef]


class CudaVmmError(RuntimeError):
    """A CUDA driver call of the memory pool failed."""


def _check(result: tuple, call: str):
    """Unpack a cuda-python result tuple; raise with the call's name unless it is CUDA_SUCCESS."""
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        # The enum's own name: no further driver call on the error path.
        raise CudaVmmError(f"{call} failed: {getattr(err, 'name', int(err))}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


@dataclass
class CudaRange:
    """A reserved virtual range: ``n_slots`` slots of ``chunk_bytes``, fixed for the life of the backend."""

    base: int
    n_slots: int
    chunk_bytes: int

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.chunk_bytes

    @property
    def __cuda_array_interface__(self) -> dict:
        # torch.as_tensor(self, device="cuda") builds a uint8 tensor over the range without copying.
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.base, False), "version": 3}


class CudaVmmBackend:
    """Chunks and virtual ranges on one CUDA device. Call from the thread that owns the torch CUDA context."""

    def __init__(self, device: torch.device, chunk_bytes: int) -> None:
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.empty(1, device=self.device)  # make the primary context current for this thread
        _check(cu.cuInit(0), "cuInit")
        self._ordinal = index
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self.granularity = int(
            _check(
                cu.cuMemGetAllocationGranularity(
                    self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        if chunk_bytes <= 0 or chunk_bytes % self.granularity:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a positive multiple of {self.granularity}")
        self.chunk_bytes = chunk_bytes
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._ranges: list[CudaRange] = []
        self._scratch: CudaRange | None = None  # one slot, for migrating a chunk's content

    # physical chunks ---------------------------------------------------------------------------------------
    def create_chunk(self):
        return _check(cu.cuMemCreate(self.chunk_bytes, self._prop, 0), "cuMemCreate")

    def release_chunk(self, handle) -> None:
        _check(cu.cuMemRelease(handle), "cuMemRelease")

    # virtual ranges -----------------------------------------------------------------------------------------
    def reserve(self, n_slots: int) -> CudaRange:
        nbytes = max(n_slots, 1) * self.chunk_bytes
        ptr = _check(cu.cuMemAddressReserve(nbytes, self.chunk_bytes, 0, 0), "cuMemAddressReserve")
        rng = CudaRange(int(ptr), n_slots, self.chunk_bytes)
        self._ranges.append(rng)
        return rng

    def map(self, rng: CudaRange, pairs: list[tuple[int, object]]) -> None:
        """Map ``(slot, handle)`` pairs, then enable access once per run of adjacent slots.

        Access is set per run rather than per chunk: the driver accepts a range spanning several mappings,
        and each call has a fixed cost (see docs/benchmarks.md, Memory).
        """
        for slot, handle in pairs:
            _check(cu.cuMemMap(self._ptr(rng, slot), self.chunk_bytes, 0, handle, 0), "cuMemMap")
        for first, count in _runs(sorted(slot for slot, _ in pairs)):
            self.set_access(rng, first, count)

    def set_access(self, rng: CudaRange, first: int, count: int) -> None:
        """Grant this device read/write on ``count`` mapped slots from ``first``."""
        _check(
            cu.cuMemSetAccess(self._ptr(rng, first), count * self.chunk_bytes, [self._access], 1),
            "cuMemSetAccess",
        )

    def unmap(self, rng: CudaRange, slots: list[int]) -> None:
        device_sync.synchronize(self.device)  # no kernel may still read what we take away
        for first, count in _runs(sorted(slots)):
            _check(cu.cuMemUnmap(self._ptr(rng, first), count * self.chunk_bytes), "cuMemUnmap")

    def migrate(self, rng: CudaRange, slot: int, old, new) -> None:
        """Move the content of ``slot`` from physical chunk ``old`` to ``new``; the slot's address stays."""
        if self._scratch is None:
            self._scratch = self.reserve(1)
        self.map(self._scratch, [(0, new)])
        device_sync.synchronize(self.device)
        _check(
            cu.cuMemcpyDtoD(self._ptr(self._scratch, 0), self._ptr(rng, slot), self.chunk_bytes),
            "cuMemcpyDtoD",
        )
        self.unmap(self._scratch, [0])
        self.unmap(rng, [slot])
        self.map(rng, [(slot, new)])

    def view(self, rng: CudaRange) -> torch.Tensor:
        return torch.as_tensor(rng, device=self.device)

    def synchronize(self) -> None:
        device_sync.synchronize(self.device)

    def _ptr(self, rng: CudaRange, slot: int):
        if not 0 <= slot < rng.n_slots:
            raise IndexError(f"slot {slot} outside a range of {rng.n_slots} slots")
        return cu.CUdeviceptr(rng.base + slot * self.chunk_bytes)

    def close(self) -> None:
        """Free every reservation (the caller unmapped and released all chunks first)."""
        for rng in self._ranges:
            _check(
                cu.cuMemAddressFree(cu.CUdeviceptr(rng.base), max(rng.n_slots, 1) * rng.chunk_bytes),
                "cuMemAddressFree",
            )
        self._ranges.clear()
        self._scratch = None


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slot numbers as (first, count) runs of adjacent slots."""
    runs: list[tuple[int, int]] = []
    for s in slots:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs
