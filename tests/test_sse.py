"""SSE parsing edge cases, byte by byte."""

from __future__ import annotations

from hypothesis import given, strategies as st

from voiceclaw_app.providers.sse import SSEParser


def parse(chunks: list[bytes]):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    p.close()
    return [(e.event, e.data) for e in out]


def test_comments_crlf_multiline_and_event_lines():
    raw = b": keep-alive\r\n\r\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nevent: error\ndata: boom\n\n"
    assert parse([raw]) == [("message", '{"a":\n1}'), ("error", "boom")]


def test_utf8_character_split_across_reads_and_crlf_split():
    raw = "data: café ☕\r\n\r\n".encode()
    cut = raw.index("☕".encode()) + 1
    assert parse([raw[:cut], raw[cut:-3], raw[-3:-2], raw[-2:]]) == [("message", "café ☕")]


def test_invalid_utf8_is_replaced_not_fatal():
    assert parse([b"data: a\xff\xfeb\n\n"]) == [("message", "a\ufffd\ufffdb")]


def test_unterminated_last_event_is_dropped():
    assert parse([b"data: one\n\ndata: half"]) == [("message", "one")]


@given(st.data())
def test_any_byte_split_parses_the_same(data):
    raw = "event: x\r\ndata: ü1\r\n\r\n: c\n\ndata: 2\rdata: 3\r\r".encode()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1))))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    assert parse(pieces) == [("x", "ü1"), ("message", "2\n3")]
