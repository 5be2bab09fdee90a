"""The gunicorn worker class (gunicorn.conf.py): gthread, with requests read in full before a thread sees them.

Why: gunicorn's gthread worker waits in its event loop for a connection's first byte, then hands the connection to
a thread, which reads the request head and the body with blocking reads and no deadline. A client that sends one
byte a second holds that thread for as long as it likes; THREADS such clients (8 by default) and nothing else is
served, `/health` included. gunicorn's answer is a buffering proxy in front (its deployment docs name nginx);
this worker is that buffer, inside the worker, so `make run`, the Docker images and any front server get it.

How:

* The event loop (one thread) reads every connection without blocking, into a buffer per connection, until the
  request is complete: its head, and its body by Content-Length or to the end of its chunked encoding. Only a
  complete request goes to a thread, which then never waits on the client to read it. Slow clients cost a
  buffer and a file descriptor each, not a thread.
* Read deadline: a request must arrive in full within `read_timeout` seconds (REQUEST_READ_TIMEOUT) of its
  first byte (of the connection, for a new one). Past it the worker answers `408 Request Timeout` (JSON, as the
  backend's own errors) and closes; a connection that sent nothing is closed silently. Checked once a second.
* Threads write the answer with a socket timeout of `read_timeout`: Python's sendall timeout bounds the whole
  write, so a client that does not read cannot hold a thread either. What a thread still reads itself (a body
  passed on unbuffered, below) must arrive by the same read deadline.
* Requests without a body (GET, HEAD, OPTIONS: `/health`, `/`, `/metrics` here) have `light_threads` threads of
  their own, so a health check never queues behind `/predict` calls that wait for an image host or the model.
* Limits, answered from the loop: a head over `max_head` bytes gets 431, buffered bytes past `buffer_budget`
  for the whole worker get 503. A body over `max_body` (MAX_CONTENT_LENGTH) is not buffered: the request goes
  to the app at once (which refuses it with its JSON 413), and the connection is closed after the answer.
  Anything the quick scan here does not understand (a malformed head, an odd Transfer-Encoding) also goes to
  the app as it is, where gunicorn's own parser answers 400; then the connection is closed too.
* Closing after an answer the client may not have read to the end (408, 413, ...) is a lingering close, as in
  nginx: shut down the sending side, discard what still arrives for up to `linger` seconds, then close, so that
  the client reads the answer instead of a connection reset.

TLS (`certfile`) is not buffered: such connections are served by plain gthread. Pipelined requests are served
one by one; the connection is closed after the first answer and the client sends the rest again.
Written against gunicorn 23's gthread worker (requirements-base.txt pins gunicorn <24); tests/service/
test_slow_clients.py runs it for real.
"""
from __future__ import annotations

import errno
import json
import re
import selectors
import socket
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from functools import partial

from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

LIGHT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
CHUNK = 64 << 10
#: a chunked body in more pieces than this is passed on unbuffered (each read rescans the buffer)
MAX_CHUNKS = 1024


# ---- what is in a buffer -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scan:
    """What `scan` found in the bytes received so far on a connection.

    state: "incomplete" (wait for more), "complete" (`end` bytes are one whole request), "pass" (hand the bytes
    to gunicorn's parser as they are: malformed, or a body too large to buffer), "head too large".
    """

    state: str
    end: int = 0
    method: bytes = b""
    has_body: bool = False
    expects_continue: bool = False
    head_complete: bool = False


def scan(data: bytes | bytearray, max_head: int, max_body: int) -> Scan:
    """Find the end of the first HTTP/1.x request in `data` (head, then body by Content-Length or chunked)."""
    start = 0
    while data.startswith(b"\r\n", start):  # stray CRLFs between requests (RFC 9112 section 2.2)
        start += 2
    head_end = data.find(b"\r\n\r\n", start)
    if head_end < 0:
        return Scan("head too large") if len(data) - start > max_head else Scan("incomplete")
    if head_end - start > max_head:
        return Scan("head too large")
    lines = bytes(data[start:head_end]).split(b"\r\n")
    method = lines[0].split(b" ", 1)[0]
    length: int | None = None
    chunked = expects = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return Scan("pass", method=method)
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return Scan("pass", method=method)
            length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                return Scan("pass", method=method)
            chunked = True
        elif name == b"expect" and value.lower() == b"100-continue":
            expects = True
    if chunked and length is not None:
        return Scan("pass", method=method)
    body_start = head_end + 4
    common = {"method": method, "expects_continue": expects, "head_complete": True}
    if chunked:
        end = _chunked_end(data, body_start, max_body)
        if end is None:
            return Scan("incomplete", has_body=True, **common)
        if end < 0:
            return Scan("pass", has_body=True, **common)
        return Scan("complete", end=end, has_body=True, **common)
    if not length:
        return Scan("complete", end=body_start, **common)
    if length > max_body:
        return Scan("pass", has_body=True, **common)
    if len(data) < body_start + length:
        return Scan("incomplete", has_body=True, **common)
    return Scan("complete", end=body_start + length, has_body=True, **common)


def _chunked_end(data: bytes | bytearray, pos: int, max_body: int) -> int | None:
    """End offset of a chunked body starting at `pos`; None while incomplete, -1 when malformed or too large."""
    start = pos
    for _ in range(MAX_CHUNKS + 1):
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -1 if len(data) - pos > 1024 else None
        size_text = bytes(data[pos:eol]).split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            return -1
        size = int(size_text, 16)
        if size == 0:
            end = data.find(b"\r\n\r\n", eol)  # the trailer section, if any, ends with an empty line
            if end < 0:
                return -1 if len(data) - eol > 8192 else None
            return end + 4
        pos = eol + 2 + size + 2
        if pos - start > max_body:
            return -1
        if pos > len(data):
            return None
        if data[pos - 2:pos] != b"\r\n":
            return -1
    return -1


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader, with a deadline for the request being read: what a thread still reads itself (a
    body passed on unbuffered) must arrive by `deadline` too, or the read raises TimeoutError."""

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        super().__init__(sock)
        self.io_timeout = io_timeout
        self.deadline = time.monotonic() + io_timeout

    def chunk(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive within REQUEST_READ_TIMEOUT")
        self.sock.settimeout(min(remaining, self.io_timeout))
        try:
            return self.sock.recv(self.mxchunk)
        finally:
            self.sock.settimeout(self.io_timeout)


def error_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": f"{reason}: {message}"}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


# ---- the worker -------------------------------------------------------------------------------------------------------
class BufferingWorker(ThreadWorker):
    """gunicorn's gthread worker that reads requests in its event loop, with a deadline; see the module doc."""

    read_timeout = 10.0  # seconds for a whole request to arrive; also the socket timeout of answers
    light_threads = 2  # threads for requests without a body
    max_head = 64 << 10  # bytes of a request head
    max_body = 16 << 20  # bodies larger than this are not buffered (MAX_CONTENT_LENGTH)
    buffer_budget = 256 << 20  # bytes buffered by the worker at once, all connections together
    linger = 2.0  # seconds to discard input after answering on a connection that closes

    @classmethod
    def configured(cls, **values) -> type[BufferingWorker]:
        """A subclass with other class settings (gunicorn.conf.py passes REQUEST_READ_TIMEOUT this way)."""
        unknown = sorted(set(values) - {"read_timeout", "light_threads", "max_head", "max_body", "buffer_budget",
                                         "linger"})
        if unknown:
            raise TypeError(f"unknown BufferingWorker settings {unknown}")
        return type(cls.__name__, (cls,), dict(values))

    def init_process(self) -> None:
        self._reading: deque[tuple[float, int, TConn]] = deque()  # (deadline, generation, conn), oldest first
        self._lingering: deque[tuple[float, TConn]] = deque()
        self._buffered = 0
        self.light_pool = futures.ThreadPoolExecutor(max_workers=self.light_threads, thread_name_prefix="light")
        super().init_process()  # runs the loop

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.light_pool.shutdown(wait=False)

    def handle_quit(self, sig, frame) -> None:
        self.light_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    # ---- reading, in the event loop ---------------------------------------------------------------------------
    def accept(self, server, listener) -> None:
        if self.cfg.is_ssl:
            return super().accept(server, listener)
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, sock, client, server)
        conn.buffer = bytearray()
        conn.generation = 0
        self.nr_conns += 1
        self._start_reading(conn)

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection has bytes: the next request starts (gthread would hand it to a thread)."""
        if self.cfg.is_ssl:
            return super().on_client_socket_readable(conn, client)
        with self._lock:
            self.poller.unregister(client)
            try:
                self._keep.remove(conn)
            except ValueError:  # murder_keepalived closed it meanwhile
                return
        self._start_reading(conn)
        self._on_readable(conn, conn.sock)

    def _start_reading(self, conn: TConn) -> None:
        conn.generation += 1
        conn.deadline = time.monotonic() + self.read_timeout
        conn.sent_continue = False
        self._reading.append((conn.deadline, conn.generation, conn))
        with self._lock:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, _sock) -> None:
        try:
            data = conn.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left
            self._stop_reading(conn)
            self._drop_buffer(conn)
            self._close(conn)
            return
        conn.buffer += data
        self._buffered += len(data)
        if self._buffered > self.buffer_budget:
            self.log.warning("more than %d bytes of requests are being received; refusing %s", self.buffer_budget,
                             conn.client)
            self._stop_reading(conn)
            self._drop_buffer(conn)
            self._answer_and_close(conn, 503, "Service Unavailable", "too many requests are being received at once")
            return
        found = scan(conn.buffer, self.max_head, self.max_body)
        if found.state == "incomplete":
            if found.expects_continue and found.head_complete and not conn.sent_continue:
                conn.sent_continue = True
                self._send_quietly(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._stop_reading(conn)
        if found.state == "head too large":
            self._drop_buffer(conn)
            self._answer_and_close(conn, 431, "Request Header Fields Too Large",
                                   f"the request head is over {self.max_head} bytes")
            return
        complete = found.state == "complete"
        end = found.end if complete else len(conn.buffer)
        request = bytes(conn.buffer[:end])
        del conn.buffer[:end]
        # Leftover bytes are a pipelined request: answer this one, close, and let the client send the rest again.
        conn.close_after = not complete or bool(conn.buffer)
        self._buffered -= len(request) + len(conn.buffer)
        conn.buffer.clear()
        light = complete and not found.has_body and found.method in LIGHT_METHODS
        self._dispatch(conn, request, light)

    def _stop_reading(self, conn: TConn) -> None:
        conn.generation += 1  # its entry in self._reading is stale from now on
        with self._lock:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _drop_buffer(self, conn: TConn) -> None:
        self._buffered -= len(conn.buffer)
        conn.buffer.clear()

    def _dispatch(self, conn: TConn, request: bytes, light: bool) -> None:
        first = conn.parser is None
        conn.init()  # blocking socket and, on the first request, gunicorn's parser
        if first:
            conn.parser.unreader = DeadlineUnreader(conn.sock, self.read_timeout)
        conn.parser.unreader.deadline = conn.deadline
        conn.parser.unreader.unread(request)
        conn.sock.settimeout(self.read_timeout)  # bounds each answer's sendall as a whole
        pool = self.light_pool if light else self.tpool
        self._wrap_future(pool.submit(self.handle, conn), conn)

    def handle_request(self, req, conn):
        if getattr(conn, "close_after", False):
            req.must_close = True  # "Connection: close" on the answer
        return super().handle_request(req, conn)

    def finish_request(self, fs) -> None:
        conn = fs.conn
        if (getattr(conn, "close_after", False) and not fs.cancelled() and fs.exception() is None
                and conn.sock.fileno() >= 0):
            self._linger(conn)
            return
        super().finish_request(fs)

    # ---- deadlines, once a loop turn (about a second) -----------------------------------------------------------
    def murder_keepalived(self) -> None:
        super().murder_keepalived()
        now = time.monotonic()
        while self._reading and self._reading[0][0] <= now:
            _, generation, conn = self._reading.popleft()
            if generation != conn.generation:
                continue  # done reading that request
            self._stop_reading(conn)
            received = len(conn.buffer.strip())
            self._drop_buffer(conn)
            if received:
                self.log.info("request from %s not received within %g s (%d bytes came); answered 408",
                              conn.client, self.read_timeout, received)
                self._answer_and_close(conn, 408, "Request Timeout",
                                       f"the request did not arrive within {self.read_timeout:g} s "
                                       f"(REQUEST_READ_TIMEOUT)")
            else:
                self._close(conn)
        while self._lingering and self._lingering[0][0] <= now:
            _, conn = self._lingering.popleft()
            self._stop_lingering(conn)

    # ---- answers from the loop, and closing ------------------------------------------------------------------------
    def _answer_and_close(self, conn: TConn, status: int, reason: str, message: str) -> None:
        self._send_quietly(conn, error_response(status, reason, message))
        self._linger(conn)

    @staticmethod
    def _send_quietly(conn: TConn, data: bytes) -> None:
        """Best effort, without blocking: these answers are small enough for an empty socket buffer."""
        try:
            conn.sock.setblocking(False)
            conn.sock.send(data)
        except OSError:
            pass

    def _linger(self, conn: TConn) -> None:
        """Close after the answer is out: FIN first, then discard input for up to `linger` seconds (any thread)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        self._lingering.append((time.monotonic() + self.linger, conn))
        with self._lock:
            try:
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._drain, conn))
            except (KeyError, ValueError, OSError):
                pass

    def _drain(self, conn: TConn, _sock) -> None:
        try:
            if conn.sock.recv(CHUNK):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._stop_lingering(conn)

    def _stop_lingering(self, conn: TConn) -> None:
        if not getattr(conn, "lingering", False):
            return
        conn.lingering = False
        with self._lock:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        self._close(conn)

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()
