"""The load test's lean HTTP client (benchmarks/faults/rawhttp.py) against a small server on
127.0.0.1: bodies arrive whole, Content-Length and chunked answers are read to their end, a
``Connection: close`` answer and a keep-alive connection the server dropped are both reopened, and
a server that answers nothing is one error, not a hang."""

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "faults"))
import rawhttp  # noqa: E402


async def _serve(behaviour: list[str], seen: list[tuple[str, bytes]]):
    """A server whose n-th request on any connection gets ``behaviour[n]``: 'length', 'chunked',
    'close' (answer, then close), 'drop' (close without answering), 'mute' (never answer)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = int(next(v for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"))
                seen.append((lines[0], await reader.readexactly(length)))
                how = behaviour[len(seen) - 1]
                if how == "drop":
                    break
                if how == "mute":
                    await asyncio.sleep(3600)
                if how == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n")
                else:
                    extra = b"Connection: close\r\n" if how == "close" else b""
                    writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n" + extra + b"\r\n{}")
                await writer.drain()
                if how == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_bodies_answers_and_reconnects():
    async def go():
        seen: list[tuple[str, bytes]] = []
        server = await _serve(["length", "chunked", "close", "length", "drop", "length"], seen)
        port = server.sockets[0].getsockname()[1]
        c = rawhttp.Client(f"http://127.0.0.1:{port}", timeout=5)
        body, ctype = rawhttp.json_body({"text": "a cat", "k": 5})
        statuses = [await c.post("/search", body, ctype)]
        form, ftype = rawhttp.multipart_body({"image": ("q.png", b"\x89PNG-bytes", "image/png")}, {"k": "5"})
        statuses.append(await c.post("/search", form, ftype))  # chunked answer
        statuses.append(await c.post("/classify", body, ctype))  # answered, then the server closes
        statuses.append(await c.post("/search", body, ctype))  # on a new connection
        # the server drops this request's connection unanswered: reopened once, sent again
        statuses.append(await c.post("/search", body, ctype))
        await c.close()
        server.close()
        await server.wait_closed()
        return statuses, seen, ftype

    statuses, seen, ftype = asyncio.run(go())
    assert statuses == [201, 200, 201, 201, 201]
    assert [line for line, _ in seen] == ["POST /search HTTP/1.1", "POST /search HTTP/1.1", "POST /classify HTTP/1.1",
                                          "POST /search HTTP/1.1", "POST /search HTTP/1.1", "POST /search HTTP/1.1"]
    assert seen[0][1] == b'{"text": "a cat", "k": 5}'
    boundary = ftype.split("boundary=")[1].encode()
    form = seen[1][1]
    assert form.startswith(b"--" + boundary) and form.endswith(b"--" + boundary + b"--\r\n")
    assert b'name="k"\r\n\r\n5\r\n' in form and b"\x89PNG-bytes" in form and b'filename="q.png"' in form


def test_no_answer_is_one_error_not_a_hang():
    async def go():
        server = await _serve(["mute"], [])
        port = server.sockets[0].getsockname()[1]
        c = rawhttp.Client(f"http://127.0.0.1:{port}", timeout=0.5)
        try:
            with pytest.raises(rawhttp.HTTPError, match="no answer"):
                await c.post("/search", *rawhttp.json_body({}))
        finally:
            await c.close()
            server.close()

    asyncio.run(go())


def test_refused_connection_is_one_error():
    async def go():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(rawhttp.HTTPError):
            await rawhttp.Client(f"http://127.0.0.1:{port}", timeout=2).post("/search", *rawhttp.json_body({}))

    asyncio.run(go())
