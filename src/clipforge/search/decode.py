"""Image decoding for batch embedding.

Two paths, both producing exactly the model's eval preprocessing (RGB decoded as training and
evaluation decode it, ``clipforge.imageio.as_rgb``; resize; center crop), as uint8 so that
worker -> main process transfers are 4x smaller than float tensors:

- ``pil``: DataLoader workers decode with Pillow. A JPEG much larger than the target is
  decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 inside the DCT, nearly for free,
  keeping both sides >= the target so the following bicubic resize still only shrinks.
- ``torch``: workers only read bytes and parse headers; JPEGs are decoded in batches by
  torchvision on the embedding device (nvJPEG on CUDA). Other formats, CMYK JPEGs and JPEGs
  with an EXIF orientation (which the device decoder would not turn) fall back to Pillow.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clipforge.config import PreprocessConfig
from clipforge.imageio import MAX_FILE_BYTES, RefusedFile, as_rgb, orientation, read_limited, shown_size
from clipforge.utils import usable_cpus

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


class UnreadableImage(Exception):
    """An input that cannot be embedded; recorded in the skip file, never fatal."""


MAX_MEMBER_BYTES = 64 * 2**20  # as sources.MAX_MEMBER_BYTES (and training's data/wds.py)


def read_bytes(path: str, tar_offset: int | None = None, nbytes: int | None = None) -> bytes:
    """The file's bytes, or a WebDataset member's bytes read straight from its offset. A pipe,
    device or directory, a file over ``imageio.MAX_FILE_BYTES``, a member over ``MAX_MEMBER_BYTES``
    and a sparse member (listed with ``nbytes`` -1) are refused before anything is read."""
    try:
        if tar_offset is None:
            try:
                return read_limited(path, MAX_FILE_BYTES)
            except RefusedFile as e:
                raise UnreadableImage(str(e).removeprefix(f"{path}: ")) from None
        if nbytes is not None and nbytes < 0:
            raise UnreadableImage("sparse tar member (expands to any size): refused unread")
        if nbytes is not None and nbytes > MAX_MEMBER_BYTES:
            raise UnreadableImage(f"tar member of {nbytes} bytes > {MAX_MEMBER_BYTES}: refused unread")
        shard = path[: path.index(".tar/") + 4]
        with open(shard, "rb") as f:
            f.seek(tar_offset)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise UnreadableImage(f"truncated tar member ({len(data)} of {nbytes} bytes)")
        return data
    except OSError as e:
        raise UnreadableImage(f"cannot read: {e.strerror or e}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; refuse decompression bombs before any pixel is decoded."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError, MemoryError) as e:
        raise UnreadableImage(f"not an image: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise UnreadableImage(f"empty image ({w}x{h})")
    if w * h > max_pixels:
        raise UnreadableImage(f"too many pixels ({w}x{h} > {max_pixels})")
    return im


def prepare(im: Image.Image, draft_size: int | None = None) -> Image.Image:
    """A header-parsed image (``open_image``) decoded to RGB exactly as training and evaluation
    decode it (``clipforge.imageio.as_rgb``: EXIF orientation, 16-bit rescaled, transparency on
    white, palette/CMYK converted). With ``draft_size``, a large JPEG is first decoded at a reduced
    scale (libjpeg's DCT scaling, both sides kept >= draft_size): the fast path, for the embedder
    and the service's uploads. Raises ``UnreadableImage`` for pixels that fail to decode."""
    try:
        if draft_size and im.format == "JPEG":
            # Keeps both sides >= size, so the result is still a downscale of a sharp image.
            im.draft("RGB", (draft_size, draft_size))
        return as_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise UnreadableImage(f"cannot decode: {e}") from None


def pil_resize_crop(im: Image.Image, cfg: PreprocessConfig, draft: bool = True) -> Image.Image:
    """The eval transform up to (not including) normalisation: the image decoded to RGB as every
    reader decodes it (``prepare``), then ``clipforge.model.transforms.eval_transform``'s resize
    and center crop.

    ``draft=False`` gives exactly the eval transform's pixels. ``draft=True`` (the fast path)
    decodes a JPEG at a reduced scale and resamples only the center crop (``_crop_resize``):
    pixels within a few levels of the exact path, embeddings within float16 rounding of it."""
    size = cfg.image_size
    im = prepare(im, size if draft else None)
    try:
        if cfg.resize_mode == "squash":
            im = TF.resize(im, [size, size], interpolation=_INTERP[cfg.interpolation])
        elif draft:
            im = _crop_resize(im, size, _PIL_FILTER[cfg.interpolation])
        else:
            im = T.CenterCrop(size)(TF.resize(im, size, interpolation=_INTERP[cfg.interpolation]))
        return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
        raise UnreadableImage(f"cannot decode: {e}") from None


_PIL_FILTER = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _crop_resize(im: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """``CenterCrop(size)(Resize(size)(im))`` without resampling the pixels the crop throws
    away: the same geometry as torchvision's (new long side ``int(size * long / short)``,
    crop offsets rounded), and the same two separable passes in the same order as Pillow's
    own resize (horizontal, then vertical), but the pass along the long side computes only the
    ``size`` output pixels that survive the crop (Pillow's ``box``: the source window of the
    crop). Not bit-exact: Pillow takes the window's edges as float32, which moves the filter
    taps by ~1e-6 px and changes a few pixels by 1-2 levels; saves ~25 % of the resize for a
    4:3 photo."""
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    sx, sy = w / nw, h / nh
    im = im.resize((size, h), resample, box=(left * sx, 0, (left + size) * sx, h))  # horizontal pass
    return im.resize((size, size), resample, box=(0, top * sy, size, (top + size) * sy))  # vertical pass


@dataclass
class Loaded:
    position: int
    error: str | None = None
    pixels: torch.Tensor | None = None  # [3, S, S] uint8, decoded on the CPU
    jpeg: bytes | None = None  # raw JPEG bytes, left for batched decoding on the device
    width: int = 0
    height: int = 0
    nbytes: int = 0


class DecodeGate:
    """Holds DataLoader workers back while the model computes on the same CPU cores. The model's
    threads meet at every operator, so a worker that takes a core from one of them stalls them all:
    decoding beside the model was slower than decoding and computing in turn. Closed only around
    the model call; a worker whose main process has gone stops waiting."""

    def __init__(self, enabled: bool, poll_s: float = 1.0) -> None:
        self._open = multiprocessing.get_context().Event() if enabled else None
        self._owner, self._poll_s = os.getpid(), poll_s
        if self._open is not None:
            self._open.set()

    @property
    def enabled(self) -> bool:
        return self._open is not None

    def wait(self) -> None:
        """In a worker: returns once the gate is open, or once its owner process is gone (asked by
        pid, not by parent: a forkserver's workers are not the owner's children)."""
        while self._open is not None and not self._open.wait(self._poll_s):
            try:
                os.kill(self._owner, 0)
            except (ProcessLookupError, PermissionError):  # gone (PermissionError: its pid reused by another user)
                return

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        """In the main process, around the model call."""
        if self._open is None:
            yield
            return
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()


def gate_decoding(device: torch.device, model_threads: int, num_workers: int) -> bool:
    """Whether workers should pause while the model runs: the model is on the CPU and its threads
    and the workers together outnumber the cores this process may use."""
    if device.type != "cpu" or num_workers <= 0:
        return False
    return model_threads + num_workers > usable_cpus()


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over input positions; never raises for a bad image."""

    def __init__(
        self,
        paths: list[str],
        tar_offsets: list[int] | None,
        nbytes: list[int] | None,
        cfg: PreprocessConfig,
        mode: str = "pil",
        draft: bool = True,
        max_pixels: int = 2**27,
        gate: DecodeGate | None = None,
    ) -> None:
        self.paths, self.tar_offsets, self.nbytes = paths, tar_offsets, nbytes
        self.cfg, self.mode, self.draft, self.max_pixels = cfg, mode, draft, max_pixels
        self.gate = gate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> Loaded:
        if self.gate is not None:
            self.gate.wait()
        out = Loaded(position)
        try:
            off = self.tar_offsets[position] if self.tar_offsets is not None else None
            n = self.nbytes[position] if self.nbytes is not None else None
            data = read_bytes(self.paths[position], off, n)
            out.nbytes = len(data)
            im = open_image(data, self.max_pixels)
            out.width, out.height = shown_size(im)  # as shown: EXIF rotation applied
            # The device decoder neither turns by EXIF nor knows CMYK: those stay on the CPU path.
            if self.mode == "torch" and im.format == "JPEG" and im.mode in ("RGB", "L") and orientation(im) == 1:
                out.jpeg = data
            else:
                out.pixels = TF.pil_to_tensor(pil_resize_crop(im, self.cfg, self.draft))  # [3, S, S] uint8
        except UnreadableImage as e:
            out.error = str(e)
        except Exception as e:  # a decoder bug on one odd file must not stop a million-image run
            out.error = f"{type(e).__name__}: {e}"
        return out


@dataclass
class Batch:
    """Worker output: the CPU-decoded images stacked into one tensor (one shared-memory transfer
    per batch instead of one per image), the rest of each item alongside."""

    items: list[Loaded]
    pixels: torch.Tensor | None  # [n, 3, S, S] uint8
    rows: list[int]  # row of each item in ``pixels``, -1 if none

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[Loaded]) -> Batch:
    rows, stack = [], []
    for it in items:
        rows.append(len(stack) if it.pixels is not None else -1)
        if it.pixels is not None:
            stack.append(it.pixels)
            it.pixels = None
    # default_collate stacks straight into shared memory inside a worker: the tensor then
    # crosses to the main process as a handle, without a second copy when it is pickled.
    return Batch(items, torch.utils.data.default_collate(stack) if stack else None, rows)


def worker_chunk(batch_size: int, num_workers: int) -> int:
    """Images per DataLoader item. Workers decode chunks smaller than the model's batch and the
    main process joins them into batches of ``batch_size``: with a whole batch per worker item,
    the last batches of a run (or of a part) leave all workers but one idle for a whole batch's
    decoding time; with chunks of ``batch_size / (2 * workers)`` images the idle tail is short."""
    if num_workers <= 1:
        return batch_size
    return max(min(batch_size, 8), -(-batch_size // (2 * num_workers)))


def decode_jpeg_batch(blobs: list[bytes], cfg: PreprocessConfig, device: torch.device) -> list[torch.Tensor | str]:
    """Batched JPEG decoding + resize/crop on ``device``; per image a [3, S, S] uint8 tensor or an error."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision >= 0.29 points to TorchCodec; decode_jpeg (nvJPEG batches) still works.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = []  # one bad file fails the whole batch: redo one by one to find it
            for r in raw:
                try:
                    images.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    images.append(str(e).splitlines()[0] if str(e) else "cannot decode JPEG")
    return [img if isinstance(img, str) else _tensor_resize_crop(img, cfg) for img in images]


def _tensor_resize_crop(img: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    size = cfg.image_size
    interp = _INTERP[cfg.interpolation]
    if cfg.resize_mode == "squash":
        return TF.resize(img, [size, size], interpolation=interp, antialias=True)
    img = TF.resize(img, size, interpolation=interp, antialias=True)  # [3, H', W'], short side = size
    return TF.center_crop(img, [size, size])


def normalize(pixels: torch.Tensor, cfg: PreprocessConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> the float input ``ToTensor`` + ``Normalize`` would give.

    Bitwise equal to ``(pixels.float() / 255 - mean) / std`` (the same float32 operations in
    the same order), but computed in place in one float tensor (``out`` when given: a buffer
    reused across batches): one conversion pass and three in-place passes, instead of four
    passes that each allocate (and page-fault in) a fresh batch-sized tensor."""
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    out.copy_(pixels)
    return _normalize_(out, cfg)


def _normalize_(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


class BatchNormalizer:
    """Turns a list of uint8 [3, S, S] images into the model's normalised float batch, written
    into one float32 buffer kept from batch to batch (the images are converted while they are
    copied in, so no uint8 batch is stacked first). Equal to ``normalize(torch.stack(images))``
    bit for bit. The returned tensor is a view of the buffer: valid until the next call."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self._buf: torch.Tensor | None = None

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        n, shape, device = len(images), tuple(images[0].shape), images[0].device
        buf = self._buf
        if buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != shape or buf.device != device:
            buf = self._buf = torch.empty((n, *shape), dtype=torch.float32, device=device)
        out = buf[:n]
        for i, im in enumerate(images):
            out[i].copy_(im)
        return _normalize_(out, self.cfg)


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def loader_kwargs(num_workers: int) -> dict[str, Any]:
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "prefetch_factor": 4, "persistent_workers": False}
