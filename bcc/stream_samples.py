"""The worker-side sample work of bcc.stream: the shuffle buffer, cutting samples into raw batches,
decoding one raw sample (checked against its pack-time checksum for packs of format 2 on), and making a
batch of decoded samples (`collate`), straight into the shared-memory ring when a loader worker has one.

`bcc/stream.py` owns the plan-driven streams and the loaders and builds its batches from these; see its
docstring for the contract (lanes, determinism, `data.on_corrupt`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bcc.imageio import decode_rgb, display_path
from bcc.shards import IMAGE_KEYS, SampleError, ShardError, check_sample


class CorruptSampleError(ShardError):
    """One sample whose stored bytes fail their pack-time checksum, or that does not decode."""


def shuffled(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of `size` samples: fill it, then swap each new sample for a random held one."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def batched(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def decode_sample(sample: dict, transform, checked: bool = False) -> tuple[torch.Tensor, int, str, str]:
    """(image, label, key, source) of one raw sample; `checked`: verify it first (format 2 on).
    Raises CorruptSampleError naming shard and key."""
    key = sample["__key__"]
    try:
        meta = json.loads(sample["json"])
        if checked:
            data = check_sample(sample, meta)
        else:
            data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        # the packer checked the size limit; the stored image is read by the one policy of bcc.imageio
        image = transform(decode_rgb(data, max_pixels=None))
        # a pack before display_path may hold a name that is not UTF-8 (a surrogate no text writer takes)
        return image, int(meta["label"]), key, display_path(str(meta.get("source", "")))
    except StopIteration:
        raise CorruptSampleError(f"{_where(sample)} has no image ({', '.join(IMAGE_KEYS)})") from None
    except SampleError as e:
        raise CorruptSampleError(f"{_where(sample)}: {e}") from None
    except Exception as e:
        raise CorruptSampleError(f"cannot decode {_where(sample)}: {type(e).__name__}: {e}") from e


def _where(sample: dict) -> str:
    return f"sample {sample['__key__']} in shard {sample.get('__url__')}"  # made only for an error


def collate(samples: list[dict], transform, checked: bool = False, on_corrupt: str = "error",
            acquire=None) -> dict[str, Any]:
    """A batch dict; damaged samples raise ShardError, or with on_corrupt="skip" are left out and listed
    under "corrupt" (see bcc.stream's docstring). With `acquire` (a loader worker's `BatchRing.acquire` for
    this batch) each crop goes into shared memory as it is made (no batch of crops held, no stack) and the
    dict carries the slot's address under "_slot" and the labels as a list: `BatchLoader` makes both
    tensors in the main process."""
    out, where = acquire() if acquire is not None else (None, None)
    images, decoded, corrupt = [], [], []
    for s in samples:
        try:
            image, *rest = decode_sample(s, transform, checked)
        except CorruptSampleError as e:
            if on_corrupt != "skip":
                raise ShardError(f"{e}. Repack from the source, or set data.on_corrupt=skip to leave damaged "
                                 "samples out") from None
            corrupt.append(str(e))
            continue
        if out is None:
            images.append(image)
        else:  # the crop's memory is free for the next one: no batch of fresh pages to fault in
            out[len(decoded)] = image.numpy()
        decoded.append(rest)
    if len(decoded) < max(1, math.ceil(len(samples) / 2)):
        raise ShardError(f"{len(corrupt)} of the {len(samples)} samples of one batch are damaged "
                         f"(data.on_corrupt=skip tolerates fewer than half): {corrupt[0]}; repack the shard")
    labels, keys, sources = (list(column) for column in zip(*decoded, strict=True))
    if out is not None:
        return {"_slot": (*where, len(decoded)), "label": labels, "key": keys, "source": sources, "corrupt": corrupt}
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long), "key": keys,
            "source": sources, "corrupt": corrupt}
