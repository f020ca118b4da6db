"""Pieces every fault trial uses: processes to start and kill, a result row, a tmpfs for real full disks.

The trials reuse the dataset writers, the in-process fault injector and the checkpoint/index
bookkeeping of the tests' shared support package (tests/support/: ``datasets``, ``runs``,
``search``, ``fault_driver``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the tests' support package: `import support`

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Row:
    """One line of the fault table: a fault or input, how often it was tried, how often every
    guarantee held, and how much data was lost (must be 0). ``notes`` says what happened."""

    fault: str
    trials: int = 0
    passed: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, ok: bool, lost: int = 0, note: str | None = None) -> None:
        self.trials += 1
        self.passed += int(ok and lost == 0)
        self.lost += lost
        if note:
            self.notes.append(note)


class Proc:
    """A clipforge (or fault-driver) process with its stderr kept in a file."""

    def __init__(self, args: list[str], log_dir: Path, driver: bool = False) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="stderr-", suffix=".txt", dir=log_dir)
        self.err_path = Path(name)
        self._err = os.fdopen(fd, "wb")
        cmd = [PY, str(REPO / "tests" / "support" / "fault_driver.py")] if driver else [PY, "-m", "clipforge"]
        self.started = time.time()
        self.p = subprocess.Popen(cmd + args, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._err)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> bool:
        """SIGKILL; True if it was still running (so the kill was real)."""
        was_alive = self.alive()
        if was_alive:
            self.p.send_signal(signal.SIGKILL)
        self.wait()
        return was_alive and self.p.returncode == -signal.SIGKILL

    def wait(self, timeout: float = 600) -> int:
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._err.close()
        return self.p.returncode

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def last_line(self) -> str:
        lines = [ln for ln in self.stderr().splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def run(args: list[str], log_dir: Path, timeout: float = 600) -> tuple[int, str, float]:
    """Run to the end: (exit status, last stderr line, seconds)."""
    p = Proc(args, log_dir)
    rc = p.wait(timeout)
    return rc, p.last_line(), time.time() - p.started


def sleep_or_exit(p: Proc, seconds: float) -> bool:
    """Sleep up to ``seconds`` while ``p`` runs; False if it ended first."""
    end = time.time() + seconds
    while time.time() < end:
        if not p.alive():
            return False
        time.sleep(0.01)
    return p.alive()


@contextmanager
def tmpfs(path: Path, size: str):
    """A real small file system (Linux, root): writes past ``size`` fail with ENOSPC.
    Yields a function that resizes it; None when mounting is not allowed here."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if not ok:
        yield None
        return

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True, capture_output=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path, leave: int = 0) -> Path:
    """Write a filler file until the file system is full (minus ``leave`` bytes)."""
    filler = path / f"filler-{os.getpid()}"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 2**20
        while free > 0:
            try:
                written = f.write(chunk[: min(len(chunk), free)])
            except OSError:
                break
            free -= written
    return filler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, model: Path, log_dir: Path, extra: list[str] = ()) -> tuple[Proc, str]:
    import httpx

    port = free_port()
    p = Proc(["serve", "--index", str(index), "--model", str(model), "--port", str(port), *extra], log_dir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if not p.alive():
            raise RuntimeError(f"serve exited: {p.stderr()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p, url
        except httpx.HTTPError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("serve did not come up within 120 s")
