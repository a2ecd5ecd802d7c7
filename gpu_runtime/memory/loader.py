"""Fast weight loader: safetensors byte ranges -> host chunks -> device slots, all stages overlapped.

Reader threads ``pread`` each tensor's bytes straight from the page cache into the (pinned) host chunk where it
belongs in the model's weight image (no intermediate buffer, no safetensors parsing beyond the header that
``plan_weights`` read). As soon as every byte of a chunk is in, the calling thread issues that chunk's
host->device copy on a copy stream, while readers go on with later chunks; the caller maps the device slots
before starting, which takes well under a millisecond per GiB with 64 MiB chunks. Tensors whose file dtype
differs from the target dtype are read whole, converted with torch, then placed (a bf16 projection served as
"fp8" is quantized here, and its scale slot written with it).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass

import torch

from gpu_runtime.weights import Slot, WeightLayout
from modelinfo.config import ModelFileError

PIECE_BYTES = 16 << 20  # one pread: big enough to stream, small enough to spread a 1 GiB tensor over threads
CANCEL_POLL_S = 0.01  # how often a cancellable load looks at its flag while it waits for a chunk


class Cancelled(Exception):
    """A load stopped before its end because its ``cancel`` event was set (its device bytes are incomplete)."""


@dataclass
class _Piece:
    file: str
    file_offset: int
    length: int  # bytes in the file
    dst: int  # offset in the weight image
    convert: Slot | None = None  # set when the file bytes are not the buffer bytes (WeightLayout.convert)
    scale: Slot | None = None  # the computed scale slot a quantizing conversion also writes


@dataclass
class LoadStats:
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9) / 1e9


def _pieces(layout: WeightLayout, chunk_bytes: int) -> list[_Piece]:
    """Read work in buffer order; a same-dtype piece never crosses a chunk boundary."""
    out: list[_Piece] = []
    computed = {s.name: s for s in layout.slots if not s.src_dtype}
    for s in layout.slots:
        if not s.src_dtype:
            continue  # a computed scale: its weight's conversion writes it
        if layout.needs_conversion(s):
            scale = computed.get(s.name + "_scale")
            out.append(_Piece(s.file, s.file_offset, s.src_nbytes, s.offset, convert=s, scale=scale))
            continue
        done = 0
        while done < s.nbytes:
            dst = s.offset + done
            n = min(PIECE_BYTES, s.nbytes - done, chunk_bytes - dst % chunk_bytes)
            out.append(_Piece(s.file, s.file_offset + done, n, dst))
            done += n
    return out


def _pread_exact(fd: int, path: str, offset: int, dst) -> None:
    view = memoryview(dst).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ModelFileError(f"{path}: truncated file: wanted {len(view)} bytes at offset {offset}, got {got}")
        got += n


class _Image:
    """The model's weight image spread over host chunks, with per-chunk byte counts still to be written."""

    def __init__(self, host_chunks: list[torch.Tensor], chunk_bytes: int, pieces: list[_Piece], total: int):
        self.chunks = [c.numpy() for c in host_chunks]
        self.chunk_bytes = chunk_bytes
        self.missing = [0] * len(host_chunks)
        for p in pieces:
            for dst, n in _ranges(p):
                for i, a, b in self._spans(dst, n):
                    self.missing[i] += b - a
        self._lock = threading.Lock()

    def _spans(self, dst: int, n: int):
        """(chunk, start, end) pieces of buffer range [dst, dst+n)."""
        while n > 0:
            i, a = divmod(dst, self.chunk_bytes)
            b = min(self.chunk_bytes, a + n)
            yield i, a, b
            dst += b - a
            n -= b - a

    def written(self, dst: int, n: int, ready: queue.Queue) -> None:
        with self._lock:
            for i, a, b in self._spans(dst, n):
                self.missing[i] -= b - a
                if self.missing[i] == 0:
                    ready.put(i)


def _ranges(p: _Piece) -> list[tuple[int, int]]:
    """(buffer offset, bytes) a piece fills: its bytes, or the slots its conversion writes."""
    if p.convert is None:
        return [(p.dst, p.length)]
    return [(s.offset, s.nbytes) for s in (p.convert, p.scale) if s is not None]


def _read_piece(p: _Piece, fds: dict[str, int], image: _Image, layout: WeightLayout, ready: queue.Queue) -> None:
    if p.convert is None:
        i, a = divmod(p.dst, image.chunk_bytes)
        _pread_exact(fds[p.file], p.file, p.file_offset, image.chunks[i][a : a + p.length])
        image.written(p.dst, p.length, ready)
        return
    raw = bytearray(p.length)
    _pread_exact(fds[p.file], p.file, p.file_offset, raw)
    for slot, data in layout.convert(p.convert, raw):
        flat = data.numpy()
        done = 0
        for i, a, b in image._spans(slot.offset, len(flat)):
            image.chunks[i][a:b] = flat[done : done + b - a]
            done += b - a
        image.written(slot.offset, len(flat), ready)


def load(
    layout: WeightLayout,
    host_chunks: list[torch.Tensor],
    device_buffer: torch.Tensor | None,
    read_files: bool,
    threads: int = 0,
    cancel: threading.Event | None = None,
) -> LoadStats:
    """Fill ``host_chunks`` from the files (``read_files``) and/or copy them into ``device_buffer``.

    ``device_buffer`` is the model's mapped weight range (or None to stop at the host image). Chunk i of the
    image goes to bytes [i*chunk, ...) of the buffer. Raises ModelFileError for a file that cannot be read, and
    Cancelled within about one piece's read once ``cancel`` is set (no copy is then still in flight).
    """
    chunk_bytes = host_chunks[0].numel() if host_chunks else 1
    total = layout.total_bytes
    n_chunks = -(-total // chunk_bytes)
    assert len(host_chunks) >= n_chunks, "not enough host chunks for the image"
    t0 = time.perf_counter()
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    workers: list[threading.Thread] = []
    fds: dict[str, int] = {}
    try:
        if read_files:
            pieces = _pieces(layout, chunk_bytes)
            image = _Image(host_chunks[:n_chunks], chunk_bytes, pieces, total)
            for i, m in enumerate(image.missing):
                if m == 0:
                    ready.put(i)
            for f in {p.file for p in pieces}:
                try:
                    fds[f] = os.open(f, os.O_RDONLY)
                except OSError as e:
                    raise ModelFileError(f"{f}: cannot open ({e})") from e
            work: queue.SimpleQueue = queue.SimpleQueue()
            for p in pieces:
                work.put(p)

            def reader() -> None:
                while not stop.is_set() and not (cancel is not None and cancel.is_set()):
                    try:
                        p = work.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        _read_piece(p, fds, image, layout, ready)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                        ready.put(e)
                        return

            n_threads = threads or min(16, os.cpu_count() or 4)
            workers = [threading.Thread(target=reader, daemon=True) for _ in range(n_threads)]
            for w in workers:
                w.start()
        else:
            for i in range(n_chunks):
                ready.put(i)
        _copy_ready(ready, n_chunks, host_chunks, device_buffer, chunk_bytes, total, cancel)
    finally:
        stop.set()
        for w in workers:
            w.join()
        for fd in fds.values():
            os.close(fd)
    return LoadStats(total, time.perf_counter() - t0)


def _copy_ready(ready: queue.Queue, n_chunks, host_chunks, device_buffer, chunk_bytes, total, cancel) -> None:
    on_cuda = device_buffer is not None and device_buffer.is_cuda
    stream = torch.cuda.Stream(device_buffer.device) if on_cuda else None
    try:
        for _ in range(n_chunks):
            item = _next_ready(ready, cancel)
            if isinstance(item, BaseException):
                raise item
            if device_buffer is None:
                continue
            a = item * chunk_bytes
            n = min(chunk_bytes, total - a)
            if stream is not None:
                with torch.cuda.stream(stream):
                    device_buffer[a : a + n].copy_(host_chunks[item][:n], non_blocking=True)
            else:
                device_buffer[a : a + n].copy_(host_chunks[item][:n])
    finally:  # also when cancelled: the caller unmaps the buffer next, so no copy may still write into it
        if stream is not None:
            stream.synchronize()


def _next_ready(ready: queue.Queue, cancel: threading.Event | None):
    """The next chunk whose bytes are all in (or a reader's error); Cancelled once ``cancel`` is set."""
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        try:
            return ready.get(timeout=None if cancel is None else CANCEL_POLL_S)
        except queue.Empty:
            continue


def copy_to_host(device_buffer: torch.Tensor, host_chunks: list[torch.Tensor], total: int) -> LoadStats:
    """Device weight range -> host image (WARM->HOST for a model whose host copy was dropped). On a copy stream of
    its own, waited for alone: on the calling thread's default stream, the engine thread's steps would queue
    behind the whole copy (13 GB of 8B weights: a quarter of a second), and a device-wide wait would also wait for
    them. The weights of a WARM model are written by nothing meanwhile."""
    t0 = time.perf_counter()
    chunk_bytes = host_chunks[0].numel()
    stream = torch.cuda.Stream(device_buffer.device) if device_buffer.is_cuda else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for i, chunk in enumerate(host_chunks):
            a = i * chunk_bytes
            n = min(chunk_bytes, total - a)
            if n > 0:
                chunk[:n].copy_(device_buffer[a : a + n], non_blocking=stream is not None)
    if stream is not None:
        stream.synchronize()
    return LoadStats(total, time.perf_counter() - t0)
