"""WebDataset shards: brace patterns, reading samples from a tar, splitting shards over
ranks and workers, the streaming shuffle. No torch here: ``pack`` and tests use it too.

A sample is the run of consecutive tar members sharing a key (the member name up to the
first dot of its base name): ``000123.jpg`` + ``000123.txt`` -> key ``000123``.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from typing import Iterable, Iterator, TypeVar

from clipforge.data.config import IMAGE_SUFFIXES, DataConfig, rng_for
from clipforge.data.skips import RawSample, Skip, note_skip
from clipforge.errors import DataError
from clipforge.shards import expand_braces

log = logging.getLogger("clipforge.data")
T = TypeVar("T")
# A tar member declaring more bytes is refused from its header, unread ('too_large'): no image or
# caption in a training shard comes near it, and reading one means holding it whole in memory.
MAX_MEMBER_BYTES = 64 * 2**20


def list_shards(cfg: DataConfig) -> list[str]:
    """The shard files, checked: all missing is an error, some missing is a warning (each is
    then skipped as 'unreadable_shard' whenever its turn comes)."""
    if os.path.isdir(cfg.path):
        shards = sorted(os.path.join(cfg.path, n) for n in os.listdir(cfg.path) if n.endswith(".tar"))
    else:
        shards = expand_braces(cfg.path)
    if not shards:
        raise DataError(f"no shards in {cfg.path}")
    missing = [s for s in shards if not os.path.isfile(s)]
    if len(missing) == len(shards):
        raise DataError(f"no shard of {cfg.path} exists (first: {missing[0]})")
    if missing:
        log.warning("%d of %d shards do not exist (first: %s); they will be skipped", len(missing), len(shards),
                    missing[0])
    return shards


def _split_key(name: str) -> tuple[str, str] | None:
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def refuse_member(member: tarfile.TarInfo, limit: int = MAX_MEMBER_BYTES) -> Skip | None:
    """Why a tar member must not be read, judged from its header alone: sparse (GNU or PAX
    sparse: a few stored bytes that extract to any size, 'sparse_member'), or declaring more than
    ``limit`` bytes ('too_large'). None for an ordinary member."""
    if member.issparse():
        return Skip("sparse_member", f"{member.name}: sparse member of {member.size} bytes, refused unread")
    if member.size > limit:
        return Skip("too_large", f"{member.name}: member of {member.size} bytes > {limit}, refused unread")
    return None


def iter_tar(path: str, counts: Counter, max_member_bytes: int = MAX_MEMBER_BYTES
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, streamed member by member.

    A shard that cannot be opened counts one 'unreadable_shard'. A shard that ends without
    its end-of-archive block, or breaks mid-way, counts one 'truncated_tar': the samples
    before the break are kept, the one being assembled is dropped (it may be incomplete).
    A sparse member, or one declaring more than ``max_member_bytes``, is refused from its
    header before anything is read (``refuse_member``): its sample is dropped whole and counted
    once ('sparse_member' / 'too_large'); the shard reads on.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        note_skip(Skip("unreadable_shard", f"{path}: {e.strerror or e}"), counts)
        return
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as e:
            note_skip(Skip("unreadable_shard", f"{path}: {e}"), counts)
            return
        key, cur, refused = None, {}, None
        try:
            while True:
                member = tf.next()
                if member is None:
                    break
                split = _split_key(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:  # the previous sample is complete: hand it out before reading on
                    if cur:
                        yield key, cur
                    key, cur, refused = split[0], {}, None
                if refused is not None:
                    continue  # the rest of a refused sample: not read either
                skip = refuse_member(member, max_member_bytes)
                if skip is not None:
                    note_skip(Skip(skip.kind, f"{path}: {skip.detail}"), counts)
                    cur, refused = {}, key
                    continue
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("short member")
                cur[split[1]] = data
            f.seek(tf.offset)
            end = f.read(tarfile.BLOCKSIZE)  # tarfile stops quietly at EOF or garbage: check why it stopped
            clean = len(end) == tarfile.BLOCKSIZE and end.count(0) == tarfile.BLOCKSIZE
            error = "no end-of-archive block"
        except (tarfile.TarError, OSError, EOFError, ValueError, MemoryError) as e:
            clean, error = False, f"{type(e).__name__}: {e}" if isinstance(e, MemoryError) else str(e)
        if not clean:
            note_skip(Skip("truncated_tar", f"{path}: {error}"), counts)
            return
        if cur:
            yield key, cur


def to_raw(shard: str, key: str, sample: dict[str, bytes], cfg: DataConfig) -> RawSample:
    """The image and caption members of a tar sample (extensions chosen by the config keys)."""
    exts = [cfg.image_key] if cfg.image_key != "image" else [s[1:] for s in IMAGE_SUFFIXES]
    image = next((sample[e] for e in exts if e in sample), None)
    caption = sample.get("txt" if cfg.caption_key == "caption" else cfg.caption_key)
    return RawSample(f"{shard}:{key}", image, caption)


def assigned_shards(n: int, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                    num_workers: int) -> list[int]:
    """This worker's shards for one epoch: the epoch's shard permutation, position i going
    to global worker i mod (world_size * num_workers). Global workers are numbered worker-major
    (``worker * world_size + rank``) so that shards spread over ranks before workers."""
    order = rng_for(seed, epoch, 0x5AD).permutation(n)
    g, total = worker * world_size + rank, world_size * num_workers
    return [int(i) for i in order[g::total]]


def resampled_shards(n: int, seed: int, epoch: int, rank: int, worker: int) -> Iterator[int]:
    """Shards drawn with replacement, forever."""
    rng = rng_for(seed, rank, worker, epoch, 0x5A3)
    while True:
        yield int(rng.integers(n))


def shuffle_buffer(items: Iterable[T], size: int, rng) -> Iterator[T]:
    """Streaming shuffle: hold ``size`` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    for j in rng.permutation(len(buf)):
        yield buf[j]
