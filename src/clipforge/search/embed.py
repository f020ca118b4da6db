"""Batch embedding into resumable parts (the clip-retrieval layout).

    out/img_emb/img_emb_00000.npy        float16 [rows, E], L2-normalised
    out/text_emb/text_emb_00000.npy      captions (``embed_captions``) or texts, row-aligned
    out/metadata/metadata_00000.parquet  path, caption, width, height, nbytes, position, extras
    out/skipped/skipped_00000.tsv        unreadable inputs of that part (only when there are any)
    out/skipped.tsv                      all of them, rebuilt at the end of every run
    out/embeddings.json                  what was embedded: input fingerprint, part size, model

Part ``k`` always holds inputs ``[k * part_size, (k + 1) * part_size)``, so a part's name is a
function of input position only. Each file is written to a temporary name and renamed; the
metadata file is renamed last and marks the part finished. A restarted run skips finished
parts and redoes unfinished ones whole: nothing is embedded twice or lost. Under torchrun, rank
``r`` of ``W`` takes parts ``r, r + W, ...``: no two ranks write the same file, and a resumed
run may use a different number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.errors import DataError
from clipforge.search import decode
from clipforge.search.layout import EMB_FORMAT, finished_parts, model_fingerprint, part_name
from clipforge.utils import Precision, autocast, autocast_casts_kept, resolve_device

FORMAT = EMB_FORMAT


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 256
    part_size: int = 10_000  # inputs per part (before unreadable ones are dropped)
    num_workers: int = 4
    device: str = "auto"
    precision: Precision | Literal["auto"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    decode: Literal["auto", "pil", "torch"] = "auto"  # auto: batched device decoding on CUDA
    draft: bool = True
    max_image_pixels: int = 2**27
    embed_captions: bool = False
    rank: int = 0
    world_size: int = 1
    progress: bool = True


@dataclass
class EmbedSummary:
    inputs: int
    parts_total: int
    parts_written: int
    parts_skipped: int  # finished by an earlier run (or another rank)
    embedded: int
    unreadable: int
    seconds: float

    @property
    def per_second(self) -> float:
        return (self.embedded + self.unreadable) / max(self.seconds, 1e-9)


def _check_manifest(out: Path, manifest: dict) -> None:
    """A resumed run must have the same inputs, part size and model; otherwise parts would mix."""
    path = out / "embeddings.json"
    if path.exists():
        old = json.loads(path.read_text())
        # Parts of one directory come from one runtime (int8 weights embed a little differently);
        # manifests written before the runtime was recorded resume under either.
        for key in ("kind", "inputs", "input_fingerprint", "part_size", "model_fingerprint") + \
                (("runtime",) if "runtime" in old else ()):
            if old.get(key) != manifest.get(key):
                raise DataError(
                    f"{out} holds embeddings of different {key.replace('_', ' ')} "
                    f"({old.get(key)!r}, now {manifest.get(key)!r}); write to a new output directory"
                )
        if old == manifest:
            return
    _atomic_write(path, json.dumps(manifest, indent=2).encode())


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write to a temporary name, fsync it, rename it into place, fsync the folder: after a crash
    (power loss included) the file is whole under its name or absent, never empty or cut."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        _fsync(tmp)  # the data on disk before the name points at it
        os.replace(tmp, path)
        try:
            _fsync(path.parent, directory=True)  # the rename itself
        except OSError:
            pass  # some file systems cannot sync a directory; the data is synced
    except OSError as e:  # a full disk, a read-only or vanished directory: say which file, keep the rest
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror or e}; finished parts are kept, run the same "
                        "command again to resume") from e


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def _save_parquet(path: Path, table: pa.Table) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _resolve(cfg: EmbedConfig, model) -> tuple[torch.device, Precision]:
    if getattr(model, "runtime", "torch") == "onnx":  # its sessions run on the CPU, in the export's precision
        return torch.device("cpu"), "fp32"
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.world_size > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", cfg.rank)) % torch.cuda.device_count())
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    return device, precision


def runtime_of(model, precision: Precision) -> dict[str, str]:
    """What computes the embeddings: {"runtime": "torch" or "onnx", "precision": fp32/bf16/fp16 (torch's
    autocast) or the ONNX export's fp32/int8}."""
    runtime = getattr(model, "runtime", "torch")
    return {"runtime": runtime, "precision": model.precision if runtime == "onnx" else precision}


def _my_parts(n_parts: int, out: Path, cfg: EmbedConfig) -> tuple[list[int], int]:
    done = set(finished_parts(out))
    mine = [p for p in range(cfg.rank, n_parts, cfg.world_size)]
    return [p for p in mine if p not in done], sum(p in done for p in mine)


def embed_images(model, table: pa.Table, out_dir: str | Path, cfg: EmbedConfig, source: str = "") -> EmbedSummary:
    """Embed every row of ``table`` (from ``sources.list_images``) into parts under ``out_dir``."""
    start = time.perf_counter()
    out = Path(out_dir)
    device, precision = _resolve(cfg, model)
    model = model.to(device).eval()
    from clipforge.search.sources import input_fingerprint

    n = table.num_rows
    if n == 0:
        raise DataError("no images to embed")
    n_parts = -(-n // cfg.part_size)
    manifest = {
        "format": FORMAT, "kind": "image", "inputs": n, "input": source, "input_fingerprint": input_fingerprint(table),
        "part_size": cfg.part_size, "parts": n_parts, "embed_dim": model.config.embed_dim,
        "model": model.config.name, "model_fingerprint": model_fingerprint(model),
        "text_embeddings": bool(cfg.embed_captions and "caption" in table.column_names), **runtime_of(model, precision),
    }  # fmt: skip
    _check_manifest(out, manifest)
    todo, already = _my_parts(n_parts, out, cfg)
    summary = EmbedSummary(n, n_parts, 0, already, 0, 0, 0.0)
    if todo:
        with autocast_casts_kept(precision, device):  # the weights cast once for the run, not once a batch
            _run_image_parts(model, table, out, cfg, todo, device, precision, summary, manifest["text_embeddings"])
    _merge_skipped(out, n_parts)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_image_parts(model, table, out, cfg, todo, device, precision, summary, with_text) -> None:
    cols = table.column_names
    prep = model.config.preprocess
    mode = cfg.decode if cfg.decode != "auto" else ("torch" if device.type == "cuda" else "pil")
    threads = getattr(model, "threads", None) or torch.get_num_threads()  # an ONNX model's own pool, or torch's
    gate = decode.DecodeGate(decode.gate_decoding(device, threads, cfg.num_workers))
    dataset = decode.ImageDataset(
        table.column("path").to_pylist(),
        table.column("tar_offset").to_pylist() if "tar_offset" in cols else None,
        table.column("nbytes").to_pylist() if "tar_offset" in cols else None,
        prep, mode, cfg.draft, cfg.max_image_pixels, gate,
    )  # fmt: skip
    # Batches never straddle parts, so a part is complete the moment its last batch arrives.
    # Workers decode chunks of a batch (decode.worker_chunk); the main process joins them.
    chunk = decode.worker_chunk(cfg.batch_size, cfg.num_workers)
    chunks: list[list[int]] = []
    batch_chunks: list[int] = []  # per batch, in loader order: how many chunks make it up
    batches_per_part: dict[int, int] = {}
    for part in todo:
        lo, hi = part * cfg.part_size, min((part + 1) * cfg.part_size, table.num_rows)
        starts = range(lo, hi, cfg.batch_size)
        for i in starts:
            end = min(i + cfg.batch_size, hi)
            chunks += [list(range(j, min(j + chunk, end))) for j in range(i, end, chunk)]
            batch_chunks.append(-(-(end - i) // chunk))
        batches_per_part[part] = len(starts)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=chunks, collate_fn=decode.collate,
        pin_memory=device.type == "cuda", **decode.loader_kwargs(cfg.num_workers),
    )  # fmt: skip
    captions = table.column("caption").to_pylist() if with_text else None
    bar = tqdm(total=sum(len(c) for c in chunks), unit="img", disable=not cfg.progress or cfg.rank != 0,
               desc="embed", dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    normalizer = decode.BatchNormalizer(prep)
    parts, sizes = iter(todo), iter(batch_chunks)
    part, got, acc = next(parts), 0, _PartAcc()
    pending: list[decode.Batch] = []
    want = next(sizes)
    for piece in loader:
        pending.append(piece)
        bar.update(len(piece.items))
        if len(pending) < want:
            continue
        with gate.closed():  # the workers wait while the model has the cores
            _embed_batch(model, pending, normalizer, device, precision, acc, captions)
        pending, want = [], next(sizes, 0)
        bar.set_postfix(skipped=summary.unreadable + len(acc.skipped), refresh=False)
        got += 1
        if got == batches_per_part[part]:
            _write_part(out, part, table, acc, model.config.embed_dim, captions is not None)
            summary.parts_written += 1
            summary.embedded += len(acc.positions)
            summary.unreadable += len(acc.skipped)
            part, got, acc = next(parts, -1), 0, _PartAcc()
    bar.close()


class _PartAcc:
    def __init__(self) -> None:
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.positions: list[int] = []
        self.sizes: list[tuple[int, int, int]] = []
        self.skipped: list[tuple[int, str]] = []


@torch.no_grad()
def _embed_batch(model, pieces: list[decode.Batch], normalizer: decode.BatchNormalizer, device, precision,
                 acc: _PartAcc, captions) -> None:
    """One model batch, made of the worker chunks in ``pieces`` (in input order)."""
    items = [it for p in pieces for it in p.items]
    for p in pieces:
        on_device = p.pixels.to(device, non_blocking=True) if p.pixels is not None else None  # [n, 3, S, S] uint8
        for it, row in zip(p.items, p.rows):
            if row >= 0:
                it.pixels = on_device[row]
    # Device-side JPEG decoding for the items the workers left as bytes.
    jpegs = [it for it in items if it.jpeg is not None]
    for it, res in zip(jpegs, decode.decode_jpeg_batch([it.jpeg for it in jpegs], normalizer.cfg, device)):
        if isinstance(res, str):
            it.error = f"cannot decode JPEG: {res}"
        else:
            it.pixels = res
    good = [it for it in items if it.error is None]
    acc.skipped += [(it.position, it.error) for it in items if it.error is not None]
    if not good:
        return
    pixels = normalizer([it.pixels for it in good])  # [B, 3, S, S] float32, on device (a reused buffer)
    with autocast(precision, device):
        feats = model.encode_image(pixels)  # [B, E]
    acc.image.append(F.normalize(feats.float(), dim=-1).half().cpu().numpy())
    acc.positions += [it.position for it in good]
    acc.sizes += [(it.width, it.height, it.nbytes) for it in good]
    if captions is not None:
        acc.text.append(_encode_texts(model, [captions[it.position] or "" for it in good], device, precision))


@torch.no_grad()
def _encode_texts(model, texts: list[str], device, precision) -> np.ndarray:
    from clipforge.model.factory import tokenizer_for

    tokens = tokenizer_for(model)(texts).to(device)  # [B, context_length]
    with autocast(precision, device):
        feats = model.encode_text(tokens)  # [B, E]
    return F.normalize(feats.float(), dim=-1).half().cpu().numpy()


def _write_part(out: Path, part: int, table: pa.Table, acc: _PartAcc, dim: int, with_text: bool) -> None:
    empty = np.zeros((0, dim), np.float16)  # a part whose images were all unreadable is still finished
    _save_npy(out / part_name("img_emb", part, "npy"), np.concatenate(acc.image) if acc.image else empty)
    if with_text:
        _save_npy(out / part_name("text_emb", part, "npy"), np.concatenate(acc.text) if acc.text else empty)
    skip_path = out / part_name("skipped", part, "tsv")
    if acc.skipped:
        paths = table.column("path")
        lines = [f"{paths[pos].as_py()}\t{' '.join(reason.split())}" for pos, reason in acc.skipped]  # one line each
        _atomic_write(skip_path, ("\n".join(lines) + "\n").encode())
    elif skip_path.exists():
        skip_path.unlink()  # left by an interrupted earlier attempt at this part
    # tar_offset stays: it lets the service read a WebDataset member back for thumbnails.
    meta = table.take(pa.array(acc.positions, pa.int64())).drop_columns(
        [c for c in ("nbytes",) if c in table.column_names]
    )
    w, h, nb = zip(*acc.sizes) if acc.sizes else ((), (), ())
    meta = meta.append_column("width", pa.array(w, pa.int32())).append_column("height", pa.array(h, pa.int32()))
    meta = meta.append_column("nbytes", pa.array(nb, pa.int64()))
    meta = meta.append_column("position", pa.array(acc.positions, pa.int64()))
    _save_parquet(out / part_name("metadata", part, "parquet"), meta)  # last: marks the part finished


def _merge_skipped(out: Path, n_parts: int) -> None:
    done = finished_parts(out)
    if len(done) < n_parts:
        return  # other ranks (or a later resume) still have parts to write
    files = sorted((out / "skipped").glob("skipped_*.tsv")) if (out / "skipped").is_dir() else []
    text = "".join(f.read_text(encoding="utf-8") for f in files if int(f.stem.rsplit("_", 1)[1]) in set(done))
    _atomic_write(out / "skipped.tsv", text.encode("utf-8"))


def embed_texts(model, texts: list[str], out_dir: str | Path, cfg: EmbedConfig, source: str = "") -> EmbedSummary:
    """Texts (e.g. queries, class names) into ``text_emb`` parts with a ``caption`` metadata column."""
    start = time.perf_counter()
    out = Path(out_dir)
    device, precision = _resolve(cfg, model)
    model = model.to(device).eval()
    n = len(texts)
    if n == 0:
        raise DataError("no texts to embed")
    n_parts = -(-n // cfg.part_size)
    fp = hashlib.sha256("\0".join(texts).encode("utf-8", "surrogateescape")).hexdigest()
    manifest = {
        "format": FORMAT, "kind": "text", "inputs": n, "input": source, "input_fingerprint": fp,
        "part_size": cfg.part_size, "parts": n_parts, "embed_dim": model.config.embed_dim,
        "model": model.config.name, "model_fingerprint": model_fingerprint(model), **runtime_of(model, precision),
    }  # fmt: skip
    _check_manifest(out, manifest)
    todo, already = _my_parts(n_parts, out, cfg)
    summary = EmbedSummary(n, n_parts, 0, already, 0, 0, 0.0)
    bar = tqdm(total=len(todo) and sum(min(cfg.part_size, n - p * cfg.part_size) for p in todo), unit="text",
               disable=not cfg.progress or cfg.rank != 0, desc="embed", dynamic_ncols=True)  # fmt: skip
    with autocast_casts_kept(precision, device):
        for part in todo:
            lo, hi = part * cfg.part_size, min((part + 1) * cfg.part_size, n)
            chunks = []
            for i in range(lo, hi, cfg.batch_size):
                chunks.append(_encode_texts(model, texts[i : min(i + cfg.batch_size, hi)], device, precision))
                bar.update(min(i + cfg.batch_size, hi) - i)
            _save_npy(out / part_name("text_emb", part, "npy"), np.concatenate(chunks))
            meta = pa.table({"caption": texts[lo:hi], "position": pa.array(range(lo, hi), pa.int64())})
            _save_parquet(out / part_name("metadata", part, "parquet"), meta)
            summary.parts_written += 1
            summary.embedded += hi - lo
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def summary_dict(s: EmbedSummary) -> dict:
    return {**asdict(s), "per_second": round(s.per_second, 1)}
