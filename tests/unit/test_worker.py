"""sam_backend.worker.scan: where a request ends in the bytes received so far (the gunicorn worker buffers
requests with it; tests/service/test_slow_clients.py runs the worker itself)."""
from __future__ import annotations

import json

import pytest

from sam_backend.worker import MAX_CHUNKS, BufferingWorker, error_response, scan

HEAD = 64 << 10
BODY = 1 << 20


def test_a_request_without_a_body_ends_after_its_head():
    data = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    found = scan(data + b"GET /next", HEAD, BODY)
    assert (found.state, found.end, found.method, found.has_body) == ("complete", len(data), b"GET", False)


def test_a_head_arriving_byte_by_byte_is_incomplete_until_its_blank_line():
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for cut in range(len(data)):
        assert scan(data[:cut], HEAD, BODY).state == "incomplete", cut
    assert scan(data, HEAD, BODY).state == "complete"


def test_a_body_by_content_length():
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-length:  5 \r\nExpect: 100-Continue\r\n\r\n"
    waiting = scan(head + b"hel", HEAD, BODY)
    assert waiting.state == "incomplete" and waiting.head_complete and waiting.expects_continue
    found = scan(head + b"hello" + b"extra", HEAD, BODY)
    assert (found.state, found.end, found.has_body) == ("complete", len(head) + 5, True)


def test_a_chunked_body_ends_after_its_last_chunk_and_trailers():
    head = b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n10;ext=1\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
    for cut in range(len(body)):
        assert scan(head + body[:cut], HEAD, BODY).state == "incomplete", cut
    assert scan(head + body + b"GET", HEAD, BODY).end == len(head + body)
    trailers = b"0\r\nX-Checksum: 1\r\n\r\n"
    assert scan(head + trailers, HEAD, BODY).end == len(head + trailers)


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",  # two lengths
    b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",  # gunicorn's parser decides
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",  # request smuggling shape
    b"POST / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",  # chunk without its CRLF
])
def test_what_the_scan_does_not_understand_goes_to_gunicorns_parser(head):
    assert scan(head, HEAD, BODY).state == "pass"


def test_limits():
    assert scan(b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD, HEAD, BODY).state == "head too large"
    big = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (BODY + 1)
    assert scan(big, HEAD, BODY).state == "pass"  # the app answers 413 without reading it
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert scan(chunked + b"1\r\nx\r\n" * (MAX_CHUNKS + 1), HEAD, BODY).state == "pass"
    assert scan(chunked + (b"%x\r\n" % (BODY + 1)) + b"x" * 10, HEAD, BODY).state == "pass"


def test_stray_crlfs_before_a_request_are_skipped():
    data = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    assert scan(data, HEAD, BODY).end == len(data)


def test_answers_from_the_event_loop_are_json_and_close():
    raw = error_response(408, "Request Timeout", "slow")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close" in head
    assert json.loads(body) == {"error": "Request Timeout: slow"}
    assert f"Content-Length: {len(body)}".encode() in head


def test_configured_makes_a_subclass_and_refuses_unknown_settings():
    worker = BufferingWorker.configured(read_timeout=3.0)
    assert issubclass(worker, BufferingWorker) and worker.read_timeout == 3.0
    assert BufferingWorker.read_timeout == 10.0
    with pytest.raises(TypeError, match="unknown"):
        BufferingWorker.configured(read_timout=3.0)
