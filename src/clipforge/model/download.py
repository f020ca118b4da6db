"""Fetching weights: plain URLs into clipforge's cache, Hugging Face repos through ``huggingface_hub``.

Plain URLs (OpenAI's releases) are streamed to ``<name>.part`` with a progress bar, resumed with an
HTTP Range request when the connection drops (also by a later run), checked against the sha256 the
table records, and only then renamed into place: a file in the cache is always whole and verified.
The cache is ``$CLIPFORGE_CACHE`` (default ``~/.cache/clipforge``).

Hub repos use huggingface_hub's own cache (``HF_HUB_CACHE``/``HF_HOME``), shared with transformers
and open_clip, so weights are not stored twice. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read on
every call rather than when huggingface_hub was imported, so setting them later still counts.

Offline (``CLIPFORGE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) nothing is requested; a cache miss is a
one-line CheckpointError naming the file and where to put it by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from clipforge.errors import CheckpointError

_CHUNK = 1 << 20
_ATTEMPTS = 5  # connection drops survived per download, each resumed where the file stops
_TIMEOUT_S = 60
_BACKOFF_S = 0.5  # first wait before resuming; doubles per drop, at most 8 s


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where URL downloads live: ``cache_dir``, else ``$CLIPFORGE_CACHE``, else ``~/.cache/clipforge``."""
    root = cache_dir or os.environ.get("CLIPFORGE_CACHE") or Path.home() / ".cache" / "clipforge"
    return Path(root).expanduser()


def offline_reason() -> str | None:
    """Which setting turned downloads off, or None when they are allowed."""
    for var in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"{var}=1"
    try:  # huggingface_hub may have read HF_HUB_OFFLINE at import (or a test set its constant)
        from huggingface_hub import constants

        return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None
    except ImportError:
        return None


# -- plain URLs -----------------------------------------------------------------------------------

def fetch_url(url: str, sha256: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The verified local copy of ``url``, downloading it if needed; its sha256 must be ``sha256``."""
    sha256 = sha256.lower()
    name = url.rsplit("/", 1)[-1].split("?", 1)[0] or "download"
    # Keyed by checksum: two releases with the same file name never collide.
    dest = cache_root(cache_dir) / sha256[:16] / name
    if dest.is_file() and _verified(dest, sha256):
        return dest
    why = offline_reason()
    if why is not None:
        found = "in the cache does not match its sha256" if dest.is_file() else "is not in the cache"
        raise CheckpointError(f"{url} {found} and downloads are off ({why}); "
                              f"download it elsewhere and put it at {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):  # another process may have finished it while we waited
        if dest.is_file() and _verified(dest, sha256):
            return dest
        part = dest.with_name(dest.name + ".part")
        _download(url, part, progress)
        got = _sha256(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise CheckpointError(f"{url}: checksum mismatch (sha256 {got}, expected {sha256}); "
                                  "the download was deleted")
        os.replace(part, dest)  # atomic: readers see no file or the whole verified file
        _mark_verified(dest, sha256)
    return dest


def _download(url: str, part: Path, progress: bool) -> None:
    """Fill ``part`` with the body of ``url``, resuming from what it already holds."""
    from tqdm.auto import tqdm

    error: Exception | None = None
    for attempt in range(_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                if have and response.status != 206:  # the server ignored the Range: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, disable=not progress,
                        desc=part.name[: -len(".part")], leave=False) as bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            # http.client returns b"" rather than raising when a connection closes early.
            if total is None or size == total:
                return
            error = ConnectionError(f"connection closed after {size} of {total} bytes")
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked to resume past the end: the part file is stale
                part.unlink(missing_ok=True)
                error = e
                continue
            raise CheckpointError(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        time.sleep(min(_BACKOFF_S * 2 ** attempt, 8))  # a dropped connection is often a brief outage
    raise CheckpointError(f"{url}: download interrupted {_ATTEMPTS} times ({error}); "
                          f"run again to resume from {part}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` has this checksum. A marker beside the file remembers a past check, so a
    large file is hashed once, not at every load (a file put there by hand is hashed on first use)."""
    marker = path.with_name(path.name + ".sha256")
    stamp = f"{sha256} {path.stat().st_size}"
    with contextlib.suppress(OSError):
        if marker.read_text().strip() == stamp:
            return True
    if _sha256(path) != sha256:
        return False
    _mark_verified(path, sha256)
    return True


def _mark_verified(path: Path, sha256: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still works, it just hashes again
        path.with_name(path.name + ".sha256").write_text(f"{sha256} {path.stat().st_size}\n")


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One writer per file across processes (two appending to one .part would corrupt it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first downloads are rare
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- Hugging Face hub -----------------------------------------------------------------------------

def fetch_hub(repo_id: str, layouts: Sequence[Sequence[str]], revision: str | None = None,
              cache_dir: str | Path | None = None, extras: Sequence[str] = ()) -> list[Path]:
    """Local paths of the first of ``layouts`` (each a list of file names) that the repo holds,
    plus whichever of ``extras`` it holds. Online, the repo's file list picks the layout, so only
    the chosen files are downloaded; offline, the first layout found whole in the cache wins."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import utils as errors  # exported there by every huggingface_hub since 0.x
    except ImportError:
        raise CheckpointError(f"{repo_id}: loading from the Hugging Face hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    revision = revision or "main"
    hub_cache = str(Path(cache_dir).expanduser() / "hub") if cache_dir is not None else None
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None  # read now, not at import

    def get(name: str, local: bool) -> Path:
        return Path(hub.hf_hub_download(repo_id, name, revision=revision, cache_dir=hub_cache,
                                        endpoint=endpoint, local_files_only=local))

    why = offline_reason()
    files: set[str] | None = None
    if why is None:
        try:
            info = hub.HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
            files = {s.rfilename for s in info.siblings or []}
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise CheckpointError(f"hf-hub:{repo_id}: {type(e).__name__.replace('Error', '')} "
                                  f"(revision {revision}); check the name, or log in for a private repo") from None
        except Exception as e:  # noqa: BLE001 - unreachable hub: fall back to the cache, as huggingface_hub does
            why = f"the hub is unreachable: {type(e).__name__}"
    if files is not None:
        chosen = next((list(lay) for lay in layouts if set(lay) <= files), None)
        if chosen is None:
            raise CheckpointError(f"hf-hub:{repo_id} holds no CLIP weights clipforge reads (looked for "
                                  f"{'; '.join(' + '.join(lay) for lay in layouts)}; it has "
                                  f"{', '.join(sorted(files)[:12]) or 'no files'})")
        try:
            return _with_shards([get(n, False) for n in chosen], lambda n: get(n, False)) + [
                get(n, False) for n in extras if n in files]
        except Exception as e:  # noqa: BLE001 - one line for any transfer failure
            raise CheckpointError(f"hf-hub:{repo_id}: download failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for lay in layouts:
        try:
            found = [get(n, True) for n in lay]
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, FileNotFoundError):
            continue
        try:
            found = _with_shards(found, lambda n: get(n, True))
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, FileNotFoundError):
            continue
        for n in extras:
            with contextlib.suppress(errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
                found.append(get(n, True))
        return found
    where = hub_cache or hub.constants.HF_HUB_CACHE
    raise CheckpointError(f"hf-hub:{repo_id} is not in the Hugging Face cache ({where}) and downloads are off "
                          f"({why}); fetch it where online with `hf download {repo_id}` into that cache, "
                          "or pass the directory holding its files")


def _with_shards(paths: list[Path], get) -> list[Path]:
    """``paths`` plus the shards a ``*.index.json`` among them names (sharded Hugging Face weights)."""
    import json

    shards: list[Path] = []
    for p in paths:
        if p.name.endswith(".index.json"):
            names = sorted(set(json.loads(p.read_text()).get("weight_map", {}).values()))
            if any(Path(n).name != n for n in names):
                raise CheckpointError(f"{p}: shard names point outside the repository")
            shards += [get(n) for n in names]
    return paths + shards
