"""A lean HTTP/1.1 client for the load test: keep-alive connections on asyncio streams, requests
written as bytes, responses read by Content-Length (or chunks). On a 2-core machine the client shares
the cores with the server; httpx's client spends milliseconds of CPU per request, which the server
then lacks, so ``load_test.py --client raw`` measures more of the server and less of the client."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlsplit


class HTTPError(Exception):
    """A request that got no complete answer (refused, reset, closed or malformed)."""


def json_body(obj) -> tuple[bytes, str]:
    return json.dumps(obj).encode(), "application/json"


def multipart_body(files: dict, data: dict) -> tuple[bytes, str]:
    """``files``: {field: (filename, bytes, content type)}; ``data``: {field: str}."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in data.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
    for name, (filename, blob, ctype) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n").encode() + blob + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection, one request at a time (as each load-test client sends)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        u = urlsplit(url)
        self.host, self.port, self.timeout = u.hostname or "127.0.0.1", u.port or 80, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str) -> int:
        """The response's status; the body is read and dropped. A reused connection the server had
        closed is reopened once; anything else that fails raises ``HTTPError``."""
        for attempt in (0, 1):
            fresh = self.writer is None
            try:
                if fresh:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                self.writer.write(head + body)
                return await asyncio.wait_for(self._response(), self.timeout)
            except asyncio.TimeoutError:  # first: an OSError too since Python 3.11, and never retried
                await self.close()
                raise HTTPError(f"no answer in {self.timeout:g} s") from None
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
                await self.close()
                if fresh or attempt:
                    raise HTTPError(f"{type(e).__name__}: {e}") from None
        raise HTTPError("unreachable")

    async def _response(self) -> int:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise HTTPError(f"malformed status line {lines[0]!r}") from None
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status
