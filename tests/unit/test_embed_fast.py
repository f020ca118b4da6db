"""The fast embedding path (issue 8) against the reference path it replaces.

- ``decode.normalize`` / ``decode.BatchNormalizer`` (in place, one reused float buffer):
  bit for bit the eval transform's ``ToTensor`` + ``Normalize``.
- ``decode._crop_resize`` (the draft path's resize that resamples only the center crop):
  within 2 levels of ``CenterCrop(Resize(.))``, exact when nothing is cropped.
- Worker chunks joined into model batches (``decode.worker_chunk``): the same embeddings as
  encoding the reference transform's tensors in the same batches; with draft decoding, the
  same within a stated cosine tolerance.
- ``decode.DecodeGate``: workers wait while the model computes on the same cores (and stop
  waiting when their main process is gone); the gated run gives the same embeddings.
"""

import multiprocessing
import os
import queue
import time

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.config import PreprocessConfig
from clipforge.search import decode, embed, sources
from clipforge.search.embed import EmbedConfig, embed_images


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield clipforge.create_model("nano", seed=0).eval()
    torch.set_num_threads(threads)


def _photo(seed: int, size: tuple[int, int], grey: bool = False) -> Image.Image:
    """A smooth random picture with some grain (JPEG-compressible, not flat)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((9, 12, 3)) * 255).astype(np.uint8)
    px = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC), np.float32)
    px = np.clip(px + rng.normal(0, 4, px.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(px)
    return im.convert("L") if grey else im


def _reference(cfg: PreprocessConfig):
    from clipforge.model.transforms import eval_transform

    return eval_transform(cfg)


def test_normalize_is_bitwise_the_eval_transform():
    cfg = PreprocessConfig(image_size=32)
    ims = [_photo(i, (32, 32)) for i in range(5)]
    ref = torch.stack([_reference(cfg)(im) for im in ims])  # ToTensor + Normalize, [5, 3, 32, 32]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims])  # uint8
    assert torch.equal(decode.normalize(pixels, cfg), ref)
    old = (pixels.float() / 255.0 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.equal(decode.normalize(pixels, cfg), old)  # the unfused formula it replaces


def test_batch_normalizer_reuses_its_buffer_and_stays_exact():
    cfg = PreprocessConfig(image_size=16)
    g = torch.Generator().manual_seed(0)
    norm = decode.BatchNormalizer(cfg)
    first = None
    for n in (6, 6, 3, 6):  # a short last batch, then a full one again: same buffer throughout
        images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(n)]
        out = norm(images)
        assert out.shape == (n, 3, 16, 16) and out.dtype == torch.float32
        assert torch.equal(out, decode.normalize(torch.stack(images), cfg))
        if first is None:
            first = out.data_ptr()
        assert out.data_ptr() == first
    # Non-contiguous inputs (views of an HWC array) are copied in correctly too.
    hwc = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=g)
    views = [x.permute(2, 0, 1) for x in hwc]
    assert torch.equal(norm(views), decode.normalize(torch.stack(views), cfg))


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (257, 343), (640, 360), (250, 250), (40, 30)])
def test_crop_resize_within_two_levels_of_resize_then_crop(size):
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    im = _photo(sum(size), size)
    ref = np.asarray(T.CenterCrop(64)(T.Resize(64, interpolation=InterpolationMode.BICUBIC)(im)), np.int16)
    fast = np.asarray(decode._crop_resize(im, 64, Image.Resampling.BICUBIC), np.int16)
    assert fast.shape == ref.shape == (64, 64, 3)
    assert np.abs(fast - ref).max() <= 2
    assert (fast != ref).mean() < 0.01
    if size[0] == size[1]:  # nothing cropped: the same two passes over the same windows
        assert np.array_equal(fast, ref)


def test_worker_chunks():
    assert decode.worker_chunk(64, 2) == 16
    assert decode.worker_chunk(256, 8) == 16
    assert decode.worker_chunk(64, 1) == decode.worker_chunk(64, 0) == 64
    assert decode.worker_chunk(4, 2) == 4  # never larger than a batch
    assert decode.worker_chunk(16, 2) == 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(21):  # JPEGs several times the model's 64 px (draft decoding applies), some grey, one PNG
        w, h = int(rng.integers(150, 400)), int(rng.integers(150, 400))
        im = _photo(100 + i, (w, h), grey=i % 5 == 0)
        im.save(d / f"{i:02d}.{'png' if i == 7 else 'jpg'}", quality=90)
    return d


def _reference_embeddings(model, table, batch_size: int, part_size: int) -> np.ndarray:
    """The unoptimised path: the eval transform on each file, batches of the same composition
    as ``embed_images`` (a batch never straddles a part), encode, L2-normalise, float16."""
    transform = _reference(model.config.preprocess)
    paths = table.column("path").to_pylist()
    out = []
    with torch.no_grad():
        for lo in range(0, len(paths), part_size):
            hi = min(lo + part_size, len(paths))
            for i in range(lo, hi, batch_size):
                x = torch.stack([transform(Image.open(p)) for p in paths[i : min(i + batch_size, hi)]])
                f = model.encode_image(x)
                out.append(torch.nn.functional.normalize(f.float(), dim=-1).half().numpy())
    return np.concatenate(out)


def _embedded(out) -> np.ndarray:
    return np.concatenate([np.load(out / embed.part_name("img_emb", p, "npy")) for p in embed.finished_parts(out)])


def test_chunked_workers_give_the_reference_embeddings(model, photos, tmp_path):
    table = sources.list_images(sources.InputSpec(str(photos)))
    cfg = EmbedConfig(batch_size=16, part_size=18, num_workers=2, progress=False, draft=False, decode="pil")
    assert decode.worker_chunk(cfg.batch_size, cfg.num_workers) == 8  # batches of 16 arrive as chunks of 8 (and 2)
    s = embed_images(model, table, tmp_path / "exact", cfg)
    assert (s.embedded, s.unreadable) == (21, 0)
    ref = _reference_embeddings(model, table, cfg.batch_size, cfg.part_size)
    assert np.array_equal(_embedded(tmp_path / "exact"), ref)  # bit for bit

    # The fast path (draft decoding + crop-only resampling): the same pictures within tolerance.
    s = embed_images(model, table, tmp_path / "fast", EmbedConfig(**{**cfg.__dict__, "draft": True}))
    fast = _embedded(tmp_path / "fast").astype(np.float32)
    cos = (fast * ref.astype(np.float32)).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.995, cos.min()


def test_device_decoding_path_joins_chunks_too(model, photos, tmp_path):
    """decode="torch" (workers pass JPEG bytes, the main process decodes them in a batch; the
    PNG still comes decoded from the worker): the two kinds meet in one normalised batch."""
    table = sources.list_images(sources.InputSpec(str(photos)))
    cfg = EmbedConfig(batch_size=16, part_size=18, num_workers=2, progress=False, decode="torch")
    s = embed_images(model, table, tmp_path / "dev", cfg)
    assert (s.embedded, s.unreadable) == (21, 0)
    ref = _reference_embeddings(model, table, cfg.batch_size, cfg.part_size).astype(np.float32)
    got = _embedded(tmp_path / "dev").astype(np.float32)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos.min()


def _wait_and_report(gate, q) -> None:
    gate.wait()
    q.put(time.monotonic())


def test_decode_gate_holds_workers_while_the_model_runs():
    ctx = multiprocessing.get_context("fork")
    gate, q = decode.DecodeGate(True, poll_s=0.05), ctx.Queue()
    with gate.closed():
        p = ctx.Process(target=_wait_and_report, args=(gate, q))
        p.start()
        with pytest.raises(queue.Empty):  # closed: the worker waits (polling its owner, who is alive)
            q.get(timeout=0.5)
        opened = time.monotonic()
    assert q.get(timeout=10) >= opened  # it went on once the gate opened
    p.join(10)
    off = decode.DecodeGate(False)
    with off.closed():  # disabled: nothing to wait for
        off.wait()
    assert not off.enabled


def _close_and_leave(gate_q) -> None:
    """A main process that closes its gate and dies with a worker still waiting on it."""
    ctx = multiprocessing.get_context("fork")
    gate = decode.DecodeGate(True, poll_s=0.05)
    gate._open.clear()
    ctx.Process(target=_wait_and_report, args=(gate, gate_q)).start()
    os._exit(0)


def test_decode_gate_lets_a_worker_go_when_its_owner_is_gone():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    owner = ctx.Process(target=_close_and_leave, args=(q,))
    owner.start()
    deadline = time.monotonic() + 10
    while os.waitpid(owner.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:  # reaped here: the
        time.sleep(0.01)  # worker holds the pipe Process.join would wait on, and a zombie still has its pid
    assert q.get(timeout=10) > 0  # the orphaned worker did not wait forever


def test_gate_decoding_only_when_cpu_threads_and_workers_outnumber_the_cores(monkeypatch):
    monkeypatch.setattr(decode.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cpu = torch.device("cpu")
    assert decode.gate_decoding(cpu, 2, 2) and decode.gate_decoding(cpu, 2, 1)
    assert not decode.gate_decoding(cpu, 1, 1)  # one core each: no contention
    assert not decode.gate_decoding(cpu, 2, 0)  # decoding in the main process already alternates
    assert not decode.gate_decoding(torch.device("cuda"), 2, 2)  # the model is not on the cores


def test_gated_embedding_closes_the_gate_around_each_model_call(model, photos, tmp_path, monkeypatch):
    """With the gate forced on, the embeddings are the reference's bit for bit, and every model
    call runs with the gate closed (the workers held back)."""
    gates, closed = [], []
    make = decode.DecodeGate

    def recording_gate(enabled, **kw):
        gates.append(make(True, **kw))
        return gates[-1]

    monkeypatch.setattr(decode, "DecodeGate", recording_gate)
    encode = model.encode_image

    def watched(x):
        closed.append(not gates[-1]._open.is_set())
        return encode(x)

    monkeypatch.setattr(model, "encode_image", watched)
    table = sources.list_images(sources.InputSpec(str(photos)))
    cfg = EmbedConfig(batch_size=16, part_size=18, num_workers=2, progress=False, draft=False, decode="pil")
    assert embed_images(model, table, tmp_path / "gated", cfg).embedded == 21
    assert len(closed) == 3 and all(closed)  # parts of 18 and 3 rows: batches of 16, 2 and 3
    assert gates[-1]._open.is_set()  # open again after the run
    ref = _reference_embeddings(model, table, cfg.batch_size, cfg.part_size)
    assert np.array_equal(_embedded(tmp_path / "gated"), ref)
