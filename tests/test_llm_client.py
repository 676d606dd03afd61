"""The OpenAI-compatible SSE client against a real local server, with faults."""

from __future__ import annotations

import time

import pytest

from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from voiceclaw_app.providers.base import (
    AuthError, BadRequestError, CancelToken, ChatMessage, ConnectError, LLMRequest, NotFoundError,
    ProtocolError, ProviderTimeout, RateLimitError, ServerError, StreamDropped,
)
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM

REPLY = "Hello there, this is a streamed reply. It has two sentences."


def req(model: str = "m", read_timeout_s: float = 5.0, **kw) -> LLMRequest:
    return LLMRequest(messages=[ChatMessage("user", "hi")], model=model, read_timeout_s=read_timeout_s, **kw)


async def collect(llm: OpenAICompatLLM, request: LLMRequest) -> str:
    return "".join([d async for d in llm.stream(request, CancelToken())])


@pytest.fixture
async def server():
    srv = FakeChatServer(ChatBehavior(reply=REPLY, ttft_s=0.02, tokens_per_s=500))
    await srv.start()
    yield srv
    await srv.stop()


@pytest.mark.parametrize("variant", [
    {}, {"crlf": True}, {"split_bytes": True}, {"multiline_data": True}, {"event_lines": True},
    {"empty_deltas": True}, {"role_first": False, "usage_chunk": False}, {"keepalive_every_s": 0.005, "ttft_s": 0.05},
    {"malformed_line_after_tokens": 2}, {"done": False},
])
async def test_streams_the_reply_whatever_the_framing(server, variant):
    server.then(**variant)
    llm = OpenAICompatLLM(server.base_url)
    assert await collect(llm, req()) == REPLY


async def test_utf8_split_across_writes(server):
    server.then(reply="Café ☕ naïve — ok. 東京です。", split_bytes=True)
    assert await collect(OpenAICompatLLM(server.base_url), req()) == "Café ☕ naïve — ok. 東京です。"


async def test_invalid_utf8_does_not_break_the_stream(server):
    server.then(raw_bytes_after_tokens=(1, b"\xff\xfe"))
    text = await collect(OpenAICompatLLM(server.base_url), req())
    assert "\ufffd" in text and text.replace("\ufffd", "") .endswith("two sentences.")


async def test_sends_gateway_fields_and_headers():
    async with FakeChatServer(ChatBehavior(reply="ok.", ttft_s=0), api_key="tok", gateway=True) as srv:
        llm = OpenAICompatLLM(srv.base_url, api_key="tok", headers={"x-openclaw-agent-id": "voice"})
        text = await collect(llm, req(model="openclaw:voice", user="conv-1", headers={"x-openclaw-session-key": "s1"}))
        assert text == "ok."
        r = srv.requests[-1]
        assert r.headers["authorization"] == "Bearer tok"
        assert r.headers["x-openclaw-agent-id"] == "voice" and r.headers["x-openclaw-session-key"] == "s1"
        assert srv.bodies[-1]["user"] == "conv-1" and srv.bodies[-1]["stream"] is True
        with pytest.raises(BadRequestError) as e:
            await collect(llm, req(model="gpt-4o"))
        assert "HTTP 400" in e.value.user_message


@pytest.mark.parametrize("status,exc,words", [
    (401, AuthError, "rejected the API key (HTTP 401)"),
    (404, NotFoundError, "HTTP 404"),
    (429, RateLimitError, "HTTP 429"),
    (500, ServerError, "HTTP 500"),
])
async def test_http_errors_are_typed_with_plain_messages(server, status, exc, words):
    for _ in range(3):
        server.then(status=status)
    llm = OpenAICompatLLM(server.base_url, max_retries=2)
    with pytest.raises(exc) as e:
        await collect(llm, req())
    assert words in e.value.user_message


async def test_bad_gateway_token_message():
    async with FakeChatServer(ChatBehavior(reply="x"), api_key="right", gateway=True) as srv:
        with pytest.raises(AuthError) as e:
            await collect(OpenAICompatLLM(srv.base_url, api_key="wrong"), req(model="openclaw:main"))
        assert e.value.user_message == "The LLM gateway rejected the API key (HTTP 401)."


async def test_retries_before_the_first_token_then_succeeds(server):
    server.then(status=429, retry_after="0").then(status=503).then()
    assert await collect(OpenAICompatLLM(server.base_url, max_retries=2), req()) == REPLY
    assert len(server.bodies) == 3


async def test_no_retry_after_text_was_streamed(server):
    server.then(drop_after_tokens=3).then()
    got: list[str] = []
    with pytest.raises(StreamDropped):
        async for d in OpenAICompatLLM(server.base_url).stream(req(), CancelToken()):
            got.append(d)
    assert "".join(got) == "Hello there, this"
    assert len(server.bodies) == 1


async def test_drop_before_any_text_is_retried(server):
    server.then(drop_after_tokens=0).then()
    assert await collect(OpenAICompatLLM(server.base_url), req()) == REPLY


async def test_gateway_trailing_error_event_keeps_the_text(server):
    server.then(error_event_after_tokens=4)
    assert await collect(OpenAICompatLLM(server.base_url), req()) == "Hello there, this is"


async def test_error_object_before_text_is_an_error(server):
    server.then(error_object_after_tokens=0)
    with pytest.raises(ProtocolError) as e:
        await collect(OpenAICompatLLM(server.base_url), req())
    assert "upstream failed" in e.value.user_message


async def test_server_that_never_answers_times_out(server):
    server.then(stall_before_headers=True)
    t = time.monotonic()
    with pytest.raises(ProviderTimeout):
        await collect(OpenAICompatLLM(server.base_url), req(read_timeout_s=0.5))
    assert time.monotonic() - t < 3


async def test_keepalives_do_not_extend_the_first_token_deadline(server):
    server.then(keepalive_every_s=0.05, ttft_s=10)
    with pytest.raises(ProviderTimeout):
        await collect(OpenAICompatLLM(server.base_url), req(read_timeout_s=0.6))


async def test_stall_mid_stream_times_out_and_keeps_text(server):
    server.then(stall_after_tokens=2)
    got: list[str] = []
    with pytest.raises(ProviderTimeout):
        async for d in OpenAICompatLLM(server.base_url).stream(req(read_timeout_s=0.5), CancelToken()):
            got.append(d)
    assert "".join(got) == "Hello there,"


async def test_connection_refused_is_a_connect_error():
    llm = OpenAICompatLLM("http://127.0.0.1:9/v1", max_retries=0)
    with pytest.raises(ConnectError) as e:
        await collect(llm, req())
    assert "is it running?" in e.value.user_message


async def test_warm_connection_is_reused_by_the_turn(server):
    llm = OpenAICompatLLM(server.base_url)
    await llm.warm()
    assert server.connections == 1
    await collect(llm, req())
    await collect(llm, req())
    assert server.connections == 1  # keep-alive: no new TCP connection per turn


async def test_cancel_stops_the_stream(server):
    server.then(tokens_per_s=20)
    cancel = CancelToken()
    got = []
    async for d in OpenAICompatLLM(server.base_url).stream(req(), cancel):
        got.append(d)
        if len(got) == 2:
            cancel.cancel()
    assert len(got) == 2
