"""The hand-over of uint8 image batches from loader workers to the main process (`BatchRing`).

What PyTorch's DataLoader does with a tensor a worker returns: it moves the tensor into a NEW shared-memory
segment (shm_open, ftruncate, mmap, then a copy that page-faults every fresh page in), sends its file
descriptor over a Unix socket with an authentication handshake per tensor, and the main process maps
it again and unmaps it when the batch dies. Measured here (2-core VM, tensors ready, no decoding): the
worker spent 4-6 ms of CPU per 32 x 3 x 224 x 224 uint8 batch on it (~130 us per image, 15-20% of
decoding and cropping that image) and the main process 1.2-1.8 ms; at 64 px 1.2 and 0.8 ms.

A `BatchRing` is shared memory allocated ONCE, before the workers start: `slots` batch-sized slots per
worker. A worker takes its next slot (`acquire`) before it decodes a batch and copies each crop into it
as soon as the crop is made (`bcc.stream_samples.collate`; pages mapped and faulted in once, for the run),
then sends only the slot's address (worker, slot, images); the main process copies the images out (one
memcpy, into pinned memory when the loader pins) and frees the slot. Measured the same way: worker
0.6-1.0 ms, main 0.6 ms per 224 px batch; 0.2 and 0.2 ms at 64 px. Copying each crop at once instead of
holding the batch's crops and stacking them also lets the allocator reuse one crop's memory for the next:
held, 32 crops of 150 KB freed together were given back to the kernel and faulted in again for the next
batch (~12-15 minor page faults per 224 px image in the worker, ~1-3 now). The copies are numpy's
(single-threaded memcpy): torch's `copy_` of a large tensor wakes the intra-op thread pool, whose
spinning cost the main process ~7 ms of CPU per batch in the same test.

Slots are used in order and freed in order (the loader hands every worker's batches over in the order
the worker made them), so one counting semaphore per worker is the whole protocol: a worker takes a
count before writing a slot (`acquire`), the main process gives it back after copying that slot out. A worker has at
most `prefetch_factor` batches made and not yet handed over, so `prefetch_factor + 1` slots mean it
never waits in practice; if it does, it waits for the main process (and ends when that is gone).
The images are a bitwise copy: batches are the same with or without the ring (tests/test_stream_ring.py).
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import shutil
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from bcc.console import err_console

WAIT_S = 1.0  # a waiting worker checks this often that the main process is still there
_WARNED: set[tuple] = set()


class BatchRing:
    """`slots` shared-memory batches of uint8 images [batch, 3, size, size] for each of `workers` workers.

    Worker side: `put(worker, nth, images)` -> the slot address to send. Main side: `take(address)` ->
    the images as a tensor the main process owns. `reset()` after the workers have ended (it replaces the
    semaphores a worker may have left taken)."""

    def __init__(self, workers: int, shape: Sequence[int], slots: int):
        self.workers, self.slots, self.shape = workers, slots, tuple(shape)
        # straight into shared memory (as torch's default_collate allocates its batches in workers): the
        # kernel's zero pages, faulted in where first written, not a private copy of the whole ring first
        storage = torch.UntypedStorage._new_shared(workers * slots * int(torch.Size(self.shape).numel()))
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage).view(workers, slots, *self.shape)
        self.arrays = self.buffer.numpy()  # numpy's memcpy: see the module docstring
        self.reset()

    def reset(self) -> None:
        self.free = [multiprocessing.Semaphore(self.slots) for _ in range(self.workers)]

    def acquire(self, worker: int, nth: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Take worker `worker`'s slot for its `nth` batch: (its images, a uint8 array [batch, 3, S, S] to
        write into, (worker, slot)); send (worker, slot, images written). Waits while the main process
        still holds the slot's last batch."""
        while not self.free[worker].acquire(timeout=WAIT_S):
            if not _main_alive():  # nobody will free a slot
                raise RuntimeError("the main process ended while a loader worker waited for a batch slot")
        slot = nth % self.slots
        return self.arrays[worker, slot], (worker, slot)

    def put(self, worker: int, nth: int, images: Sequence[torch.Tensor]) -> tuple[int, int, int]:
        """Write `images` (uint8 [3, S, S] each) into worker `worker`'s slot for its `nth` batch."""
        out, where = self.acquire(worker, nth)
        for i, image in enumerate(images):
            out[i] = image.numpy()
        return *where, len(images)

    def take(self, address: tuple[int, int, int], pin_memory: bool = False) -> torch.Tensor:
        """The images at `address` copied out (pinned when asked); frees the slot."""
        worker, slot, n = address
        source = self.arrays[worker, slot, :n]
        if pin_memory:
            out = torch.empty(source.shape, dtype=torch.uint8, pin_memory=True)
            out.numpy()[...] = source
        else:
            out = torch.from_numpy(source.copy())
        self.free[worker].release()
        return out

    def receive(self, batch: dict, pin_memory: bool = False) -> None:
        """Turn a worker's batch dict (images at "_slot", labels a list) into image and label tensors."""
        batch["image"] = self.take(batch.pop("_slot"), pin_memory)
        label = torch.tensor(batch["label"], dtype=torch.long)
        batch["label"] = label.pin_memory() if pin_memory else label


def _main_alive() -> bool:
    """Whether the process that started this one still runs (any start method: fork, spawn, forkserver)."""
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def make_ring(workers: int, shape: Sequence[int], slots: int) -> BatchRing | None:
    """A ring for `workers` loader workers, or None (with a warning) when /dev/shm (where Linux keeps
    shared memory) has not twice its size free: the loader then hands batches over the DataLoader's way."""
    need = workers * slots * int(torch.Size(shape).numel())
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        free = None  # no /dev/shm: another platform's shared memory, nothing to check here
    if free is not None and free < 2 * need:
        if tuple(shape) in _WARNED:
            return None
        _WARNED.add(tuple(shape))  # once per batch shape and process, not at every evaluation
        err_console.print(f"[yellow]warning:[/] /dev/shm has {free / 2**20:.0f} MiB free, too little for "
                          f"{workers} x {slots} batches of {tuple(shape)} uint8 ({need / 2**20:.0f} MiB): "
                          "batches are handed over in one shared-memory segment each (slower)", soft_wrap=True)
        return None
    return BatchRing(workers, shape, slots)


def worker_slots(ring: BatchRing | None, worker: int) -> Iterator:
    """`acquire` for each next batch a loader worker makes: None in the main process or without a ring."""
    if ring is None or get_worker_info() is None:
        return itertools.repeat(None)
    return (functools.partial(ring.acquire, worker, nth) for nth in itertools.count())


def as_is(batch: dict) -> dict:
    """A loader's `collate_fn` that leaves the batch dict alone."""
    return batch
