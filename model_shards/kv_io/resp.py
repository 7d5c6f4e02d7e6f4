"""A minimal Redis (RESP2) client for the block store's bulk path: pipelined GET and SET of
multi-MiB values on plain sockets.

Why not redis-py here: it reads replies 64 KiB at a time into a parser that builds a new bytes
object per value, holding the GIL for both copies, so its I/O threads share one core: on the
16-core H100 host 4 threads read 2 MiB values at 0.6-0.9 GB/s where `redis-benchmark` reads
2+ GB/s from the same server. Here a value's bytes go from the kernel straight where the caller
says (the block's host slot) with `socket.recv_into` (which releases the GIL for the copy) and are
sent from memoryviews with `sendall` (no packing copy), so threads and shards run in parallel.

One system call per value. A socket with a Python timeout is non-blocking underneath (poll,
then recv whatever has arrived), and Redis writes a large reply in pieces (64 KiB per event-loop
turn while other clients wait), so a value took several receives, each giving up the GIL and
taking it back: 2.6 per 2 MiB value with one server, 4.4 with four, on the 2-core VM
(`bench/redis_scaling.py` counts them); the faster the reader, the more. With 16 I/O threads
(4 shards) that is a queue on the GIL, a suspect for the H200 host's 4.65 GB/s against 8.9 of
`redis-benchmark` (the bench's threads-vs-processes rows decide it). So the socket is blocking,
with the timeout in the kernel (SO_RCVTIMEO / SO_SNDTIMEO), and a value's rest is received with
MSG_WAITALL: the kernel fills it as data arrives, and the GIL is released once.

Only what the hot path needs: AUTH, SELECT, GET, SET ... EX, on TCP or a unix socket without
TLS (`rediss://` and Sentinel / Cluster shards stay on redis-py). Failures raise redis-py's
exception types, so the store's health and backoff logic treats both clients alike; a
connection that failed in any way is closed, never reused mid-reply.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis

_READ_CHUNK = 64 << 10  # header lines and small replies are read through this buffer
_CRLF = b"\r\n"


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


class RespConnection:
    def __init__(self, options: dict[str, Any], timeout_s: float):
        """`options`: redis.connection.parse_url's dict (host, port or path, db, username, password)."""
        try:
            self.sock = self._open(options, timeout_s)
        except OSError as error:
            raise redis.ConnectionError(f"connecting to Redis failed: {error}") from error
        self._buffer = bytearray(_READ_CHUNK)
        self._start = self._end = 0  # unread bytes are _buffer[_start:_end]
        self.generation = 0  # the pool's failure count when this was opened
        self._setup(options)

    @staticmethod
    def _open(options: dict[str, Any], timeout_s: float) -> socket.socket:
        if options.get("path"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(options["path"])
        else:
            sock = socket.create_connection((options.get("host", "localhost"), options.get("port", 6379)), timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _kernel_timeouts(sock, timeout_s)
        return sock

    def _setup(self, options: dict[str, Any]) -> None:
        setup = []
        if options.get("password"):
            credentials = [options["username"]] if options.get("username") else []
            setup.append(_command(b"AUTH", *(c.encode() for c in credentials), options["password"].encode()))
        if options.get("db"):
            setup.append(_command(b"SELECT", str(options["db"]).encode()))
        if setup:
            self._send([b"".join(setup)])
            try:
                for _ in setup:
                    self._read_simple()
            except redis.ResponseError as error:  # as redis-py: a connection that cannot log in
                raise redis.AuthenticationError(str(error)) from error

    def close(self) -> None:
        self.sock.close()

    # --- commands -----------------------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes], sink: Callable[[int, int], memoryview | Sequence[memoryview]]
                 ) -> list[int | None]:
        """GET each key; value i is received into sink(i, length): one view of that length, or
        views that add up to it, filled in order. Returns each length, None if absent."""
        self._send([b"".join(_command(b"GET", key) for key in keys)])
        return [self._read_bulk_into(index, sink) for index in range(len(keys))]

    def set_many(self, items: Sequence[tuple[bytes, memoryview]], ttl_s: int | None) -> list[bool]:
        """SET each (key, value) [EX ttl]; whether each was stored (False: an error reply, e.g. OOM)."""
        expiry = [b"EX", str(ttl_s).encode()] if ttl_s else []
        for key, value in items:  # one header, the value itself, one trailer: no copy of the value
            header = b"*%d\r\n$3\r\nSET\r\n%s$%d\r\n" % (3 + len(expiry), _bulk(key), len(value))
            self._send([header, value, _CRLF + b"".join(_bulk(part) for part in expiry)])
        return [self._read_stored() for _ in items]

    # --- wire ---------------------------------------------------------------------------------
    def _send(self, pieces: Sequence[bytes | memoryview]) -> None:
        try:
            for piece in pieces:
                self.sock.sendall(piece)
        except (TimeoutError, BlockingIOError) as error:  # BlockingIOError: SO_SNDTIMEO ran out
            raise redis.TimeoutError("sending to Redis timed out") from error
        except OSError as error:
            raise redis.ConnectionError(f"sending to Redis failed: {error}") from error

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        try:
            received = self.sock.recv_into(view, len(view), flags)
        except (TimeoutError, BlockingIOError) as error:  # BlockingIOError: SO_RCVTIMEO ran out
            raise redis.TimeoutError("reading from Redis timed out") from error
        except OSError as error:
            raise redis.ConnectionError(f"reading from Redis failed: {error}") from error
        if received == 0:
            raise redis.ConnectionError("Redis closed the connection")
        return received

    def _read_line(self) -> bytes:
        while (end := self._buffer.find(_CRLF, self._start, self._end)) < 0:
            if self._start:  # move the partial line to the front, then read behind it
                self._buffer[: self._end - self._start] = self._buffer[self._start : self._end]
                self._start, self._end = 0, self._end - self._start
            if self._end == len(self._buffer):
                raise redis.ConnectionError("Redis reply line longer than the read buffer")
            self._end += self._recv_into(memoryview(self._buffer)[self._end :])
        line = bytes(self._buffer[self._start : end])
        self._start = end + 2
        return line

    def _read_exact_into(self, view: memoryview) -> None:
        buffered = min(len(view), self._end - self._start)
        view[:buffered] = self._buffer[self._start : self._start + buffered]
        self._start += buffered
        filled = buffered
        while filled < len(view):  # once, unless the timeout or a signal cut the wait short
            filled += self._recv_into(view[filled:], socket.MSG_WAITALL)

    def _read_bulk_into(self, index: int, sink: Callable) -> int | None:
        line = self._read_line()
        if line.startswith(b"-"):
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if not line.startswith(b"$"):
            raise redis.ConnectionError(f"unexpected Redis reply {line[:32]!r} to GET")
        length = int(line[1:])
        if length < 0:
            return None
        views = sink(index, length)
        for view in [views] if isinstance(views, memoryview) else views:
            self._read_exact_into(view)
        self._read_exact_into(memoryview(bytearray(2)))  # the value's trailing CRLF
        return length

    def _read_simple(self) -> bytes:
        line = self._read_line()
        if line.startswith(b"-"):
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        return line

    def _read_stored(self) -> bool:
        line = self._read_line()
        if not line.startswith((b"+", b"-")):
            raise redis.ConnectionError(f"unexpected Redis reply {line[:32]!r} to SET")
        return line == b"+OK"


def _kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Blocking calls (one recv per value, see the module doc), bounded by the kernel instead."""
    sock.settimeout(None)
    seconds = int(timeout_s)
    timeval = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class RespPool:
    """At most `max_connections` connections; a caller waits up to the timeout for a free one
    (as redis-py's BlockingConnectionPool does). Connections are opened on demand; one that
    raised is closed instead of coming back, and so is every idle one opened before that
    failure: a server that restarted has closed them all, and each would otherwise fail once
    more (and mark the shard down again) before the pool was clean."""

    def __init__(self, url: str, max_connections: int, timeout_s: float):
        self.options = redis.connection.parse_url(url)
        self.timeout_s = timeout_s
        self._idle: queue.LifoQueue[RespConnection | None] = queue.LifoQueue()
        for _ in range(max_connections):
            self._idle.put(None)  # a slot without an open connection yet
        self._lock = threading.Lock()
        self._open: set[RespConnection] = set()
        self._generation = 0  # bumped by each failure; older idle connections are not reused

    @staticmethod
    def supports(url: str) -> bool:
        """Plain TCP or unix sockets only: TLS stays with redis-py."""
        return url.startswith(("redis://", "unix://"))

    def run(self, call: Callable[[RespConnection], Any]) -> Any:
        try:
            connection = self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            raise redis.ConnectionError("no free Redis connection within the timeout") from None
        if connection is not None and connection.generation != self._generation:
            self._discard(connection)  # opened before a failure: likely dead too
            connection = None
        try:
            connection = connection or self._connect()
            result = call(connection)
        except BaseException:
            with self._lock:
                self._generation += 1
            self._discard(connection)
            self._idle.put(None)
            raise
        self._idle.put(connection)
        return result

    def close(self) -> None:
        with self._lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            connection.close()

    def _connect(self) -> RespConnection:
        generation = self._generation
        connection = RespConnection(self.options, self.timeout_s)
        connection.generation = generation
        with self._lock:
            self._open.add(connection)
        return connection

    def _discard(self, connection: RespConnection | None) -> None:
        if connection is None:
            return
        connection.close()
        with self._lock:
            self._open.discard(connection)
