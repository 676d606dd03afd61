"""Embedded LLM: llama-cpp-python running Gemma 3 270M (Q4_K_M GGUF) on CPU.

The packaged Gemma is the *base* model: no instruction tuning and no chat template
in the file, so chat formatting gives garbage. It does continue a dialogue well:
the prompt is a persona line, four short example exchanges, then the conversation
as ``User:`` / ``<Name>:`` lines ending with ``<Name>:``; generation stops at the
next ``User:`` line or a blank line. Replies are short and coherent, not smart.

The speaker label is the settings' ``assistant_name`` (``LLMRequest.assistant_name``;
the constructor's name when a request has none), never guessed from the prompt.

If ``VOICECLAW_LOCAL_GGUF`` points at another GGUF whose metadata has a chat
template (an instruction-tuned model), chat completion with that template is used
instead. The oldest messages are dropped until the prompt and the reply fit the
context window, and a template that refuses a system role gets the system prompt
folded into the first user message.

Speed: the prompt always starts with the same persona and examples and grows
only at the end, so llama.cpp reuses its KV cache for everything already
evaluated (first token ~50 ms cached vs ~400 ms uncached here). :meth:`prefill`
evaluates the history-bearing prompt while the user is still speaking, so the
turn itself only evaluates the new user line.

Threads: llama.cpp defaults to every core; ``n_threads`` caps it (default 2,
``VOICECLAW_LLM_THREADS``). The model is not thread-safe: every call into it holds
one lock. Generation runs in a worker thread and streams text back through an
asyncio queue; the cancel token is checked at every token.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from .base import LLM, CancelToken, ChatMessage, EngineUnavailable, LLMCapabilities, LLMRequest, ProviderError
from .local_models import GEMMA_PACKAGE, LOCAL_GGUF_ENV, gemma_gguf_path
from .local_stt import env_threads

DEFAULT_MAX_TOKENS = 80


def fold_system(messages: list[dict]) -> list[dict]:
    """For templates that reject a system role: the system prompt opens the first user message."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}] + rest


def fit_chat_messages(messages: list[dict], count_tokens: Callable[[list[dict]], int], budget: int) -> list[dict]:
    """Drop the oldest messages until ``count_tokens(messages) <= budget``.

    The system messages and the last message (the user's new line) always stay;
    the kept history starts with a user message, since templates that insist on
    user/assistant alternation raise otherwise. If even that does not fit, the
    shortest list is returned (the caller's context check reports it).
    """
    system = [m for m in messages if m["role"] == "system"]
    convo = [m for m in messages if m["role"] != "system"]
    while True:
        candidate = system + convo
        if len(convo) <= 1 or count_tokens(candidate) <= budget:
            return candidate
        convo = convo[1:]
        while len(convo) > 1 and convo[0]["role"] != "user":
            convo = convo[1:]


def _one_line(text: str, limit: int) -> str:
    """Collapse whitespace: a newline inside a turn would read as a turn boundary."""
    return " ".join(text.split())[:limit]


#: extra samplings when the base model's reply comes back empty
EMPTY_RETRIES = 2


class StopScanner:
    """Finds the dialogue's stop sequences in the token stream (instead of llama.cpp).

    llama.cpp holds back any text that could begin a stop sequence, and every stop of
    the dialogue prompt begins with a newline: the newline after a reply's last
    sentence, the very whitespace the chunker needs to cut that sentence, reached the
    turn only when the next two tokens ("User", ":") had ruled out a stop or made
    one (~50 ms at 40 tokens/s, on most replies: Gemma's are one sentence). Here
    whitespace goes out at once (if a stop follows, it is only trailing whitespace,
    which the turn trims); only visible text that could begin a stop is held back.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._text = ""
        self._sent = 0  # characters of _text passed on

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (what may be passed on now, whether a stop was reached)."""
        self._text += text
        start = max(0, len(self._text) - len(text) - self._longest)  # earlier text held no whole stop
        hits = [i for i in (self._text.find(stop, start) for stop in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self._text[self._sent : cut] if cut > self._sent else ""
            self._sent = max(self._sent, cut)
            return out, True
        hold = self._held_from()
        out = self._text[self._sent : hold]
        self._sent = max(self._sent, hold)
        return out, False

    def flush(self) -> str:
        """The stream ended without a stop: what was held back is text after all."""
        out = self._text[self._sent :]
        self._sent = len(self._text)
        return out

    def _held_from(self) -> int:
        """Where the tail that could still grow into a stop begins (past its leading whitespace)."""
        n = len(self._text)
        for begin in range(max(self._sent, n - self._longest + 1), n):
            tail = self._text[begin:]
            if any(stop.startswith(tail) for stop in self.stops):
                while begin < n and self._text[begin].isspace():
                    begin += 1
                return begin
        return n


class DialoguePrompt:
    """Builds the continuation prompt for a base (non-chat) model.

    Everything that does not change between turns comes first, so the KV cache
    prefix survives from one turn to the next.
    """

    def __init__(self, name: str, system_prompt: str = "") -> None:
        self.name = _one_line(name, 40) or "Assistant"
        self.system_prompt = _one_line(system_prompt, 600)

    def header(self) -> str:
        n = self.name
        persona = self.system_prompt or f"You are {n}, a friendly voice assistant."
        return (
            f"{persona}\n"
            f"Below is a conversation between User and {n}, a friendly voice assistant. "
            f"{n} answers in one or two short, polite sentences.\n\n"
            f"User: Hi, who are you?\n"
            f"{n}: I'm {n}, your voice assistant. How can I help?\n"
            f"User: What's the capital of Italy?\n"
            f"{n}: Rome is the capital of Italy.\n"
            f"User: Can you suggest something for lunch?\n"
            f"{n}: How about a warm bowl of tomato soup with fresh bread?\n"
            f"User: Thanks, that's all for now.\n"
            f"{n}: You're welcome. Have a nice day!\n"
        )

    def conversation(self, messages: list[ChatMessage]) -> str:
        lines = []
        for m in messages:
            if m.role == "user":
                lines.append(f"User: {_one_line(m.content, 2000)}\n")
            elif m.role == "assistant":
                lines.append(f"{self.name}: {_one_line(m.content, 2000)}\n")
        return "".join(lines)

    def for_reply(self, messages: list[ChatMessage]) -> str:
        """The full prompt: header, conversation, and the assistant's cue."""
        return self.header() + self.conversation(messages) + f"{self.name}:"

    def for_prefill(self, history: list[ChatMessage]) -> str:
        """What is known before the user finishes: header, history, the next ``User:``."""
        return self.header() + self.conversation(history) + "User:"

    def stops(self) -> list[str]:
        return ["\nUser:", "\n\n", f"\n{self.name}:", "User:"]


class LocalLlamaLLM(LLM):
    """Gemma 3 270M base (or ``$VOICECLAW_LOCAL_GGUF``) through llama.cpp."""

    name = "local-llama"
    capabilities = LLMCapabilities(streaming=True, server_history=False)

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        assistant_name: str = "Atlas",
        system_prompt: str = "",
        data_base: Path | None = None,
        temperature: float = 0.7,
        max_history_turns: int = 2,
    ) -> None:
        self.n_threads = n_threads or env_threads("VOICECLAW_LLM_THREADS", 2)
        self.n_ctx = n_ctx
        self.assistant_name = assistant_name  # when a request carries none
        self.system_prompt = system_prompt  # what the first warm() evaluates ahead of the first turn
        self.temperature = temperature
        # Measured: with 8 past exchanges in view the base model copies its own
        # earlier replies ("I'm looking for a ..." to every question); with 2 it
        # answers each question. Chat-template models get the full history.
        self.max_history_turns = max_history_turns
        self._model_path = model_path
        self._data_base = data_base
        self._llm = None
        self._chat = False
        self._formatter = None  # the chat template, rendered to count prompt tokens
        self._warmed = False
        self._last_name = ""  # the latest request's assistant_name (prefill has only messages)
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # every call into the model

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        with self._load_lock:
            if self._llm is not None:
                return
            from llama_cpp import Llama

            path = self._model_path or gemma_gguf_path(self._data_base)
            try:
                llm = Llama(
                    model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                    n_threads_batch=self.n_threads, n_batch=256, last_n_tokens_size=256, verbose=False,
                )
            except Exception as exc:  # llama.cpp raises ValueError on an unreadable file
                package = LOCAL_GGUF_ENV if self._model_path is None and path.name != "gemma-3-270m-q4_k_m.gguf" else GEMMA_PACKAGE
                raise EngineUnavailable(
                    f"The language model could not load: reinstall the Python package '{package}'" if package == GEMMA_PACKAGE
                    else f"The GGUF named by {LOCAL_GGUF_ENV} could not load.",
                    detail=str(exc),
                ) from exc
            template = llm.metadata.get("tokenizer.chat_template")
            self._chat = bool(template)
            if self._chat:
                self._formatter = _chat_formatter(llm, template)
            self._llm = llm

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def uses_chat_template(self) -> bool:
        return self._chat

    async def warm(self) -> None:
        """Load, and the first time only evaluate the stable prompt header.

        ``TurnRunner.warm`` calls this at every speech start and then :meth:`prefill`
        with the real messages, which does the real work: evaluating a header built
        from the start-up settings again would cost a second prefill on every
        utterance when the saved prompt differs.
        """
        if self._warmed:
            return
        await asyncio.to_thread(self._warm_sync)

    def _warm_sync(self) -> None:
        self.load()
        if self._warmed:
            return
        self._warmed = True
        if not self._chat:
            self.prefill_sync([ChatMessage("system", self.system_prompt)] if self.system_prompt else [])

    # ------------------------------------------------------------ prefill
    async def prefill(self, messages: list[ChatMessage], assistant_name: str = "") -> None:
        """Evaluate the prompt for ``messages`` (history, no new user line) ahead of time.

        Call it while the user is speaking; the next :meth:`stream` then evaluates
        only the new user line. ``assistant_name``: the request's (default: the
        latest request's, else the constructor's). A no-op for chat-template models.
        """
        await asyncio.to_thread(self.prefill_sync, messages, assistant_name)

    def prefill_sync(self, messages: list[ChatMessage], assistant_name: str = "") -> int:
        """Blocking prefill; returns how many new tokens were evaluated."""
        self.load()
        if self._chat:
            return 0
        prompt = self._dialogue(messages, assistant_name or self._last_name).for_prefill(self._recent([m for m in messages if m.role != "system"]))
        with self._lock:
            llm = self._llm
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
            if len(tokens) > self.n_ctx - DEFAULT_MAX_TOKENS - 64:
                return 0  # too long to keep; stream() trims the history itself
            common = llm.longest_token_prefix(llm._input_ids[: llm.n_tokens], tokens)
            if common == len(tokens):
                return 0
            llm.n_tokens = common
            llm.eval(tokens[common:])
            llm._requires_eval = True  # sample from a fresh decode, not these logits
            return len(tokens) - common

    # ------------------------------------------------------------ generation
    def _dialogue(self, messages: list[ChatMessage], assistant_name: str = "") -> DialoguePrompt:
        system = next((m.content for m in messages if m.role == "system"), "")
        return DialoguePrompt((assistant_name or "").strip() or self.assistant_name, system)

    def dialogue_for(self, request: LLMRequest) -> DialoguePrompt:
        """The dialogue prompt ``stream`` uses for ``request`` (its speaker label is the request's name)."""
        return self._dialogue(request.messages, request.assistant_name)

    def chat_messages(self, request: LLMRequest, max_tokens: int) -> list[dict]:
        """Chat-template path: the request's messages, fitted to the context window."""
        msgs = [{"role": m.role, "content": m.content} for m in request.messages]
        budget = self.n_ctx - max_tokens - 16
        try:
            return fit_chat_messages(msgs, self._chat_tokens, budget)
        except Exception:  # the template raised (e.g. "System role not supported")
            if not any(m["role"] == "system" for m in msgs):
                raise
        # trim with the system prompt apart (so it is never trimmed away), then fold it in
        fitted = fit_chat_messages(msgs, lambda m: self._chat_tokens(fold_system(m)), budget)
        return fold_system(fitted)

    def _chat_tokens(self, msgs: list[dict]) -> int:
        prompt = self._formatter(messages=msgs).prompt if self._formatter is not None else "\n".join(m["content"] for m in msgs)
        return len(self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def _recent(self, convo: list[ChatMessage]) -> list[ChatMessage]:
        """The last ``max_history_turns`` exchanges, plus a trailing new user line.

        Prefill (history only) and reply (history + new line) cut the history the
        same way, so the prefilled tokens are a prefix of the reply prompt.
        """
        keep = 2 * max(0, self.max_history_turns)
        if convo and convo[-1].role == "user":
            past = convo[:-1]
            return (past[-keep:] if keep else []) + [convo[-1]]
        return convo[-keep:] if keep else []

    def _fit(self, prompt_for: Callable[[list[ChatMessage]], str], messages: list[ChatMessage], max_tokens: int) -> str:
        """Drop the oldest exchanges until the prompt fits the context window."""
        convo = self._recent([m for m in messages if m.role != "system"])
        while True:
            prompt = prompt_for(convo)
            n = len(self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
            if n + max_tokens + 8 <= self.n_ctx or len(convo) <= 1:
                return prompt
            convo = convo[1:]

    def generate_sync(self, request: LLMRequest, cancel: CancelToken) -> Iterator[str]:
        """Blocking token stream (holds the model lock for its whole life)."""
        self.load()
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        temperature = self.temperature if request.temperature is None else request.temperature
        with self._lock:
            if self._chat:
                msgs = self.chat_messages(request, max_tokens)
                stream = self._llm.create_chat_completion(msgs, max_tokens=max_tokens, temperature=temperature, top_p=0.9, stream=True)
                for chunk in stream:
                    if cancel.cancelled:
                        stream.close()
                        return
                    text = chunk["choices"][0]["delta"].get("content") or ""
                    if text:
                        yield text
                return
            if request.assistant_name.strip():
                self._last_name = request.assistant_name.strip()
            dialogue = self.dialogue_for(request)
            prompt = self._fit(dialogue.for_reply, request.messages, max_tokens)
            # The base model sometimes samples a stop sequence (the next speaker's name)
            # as its very first token: an empty reply, nothing said, a person left
            # waiting (seen in the browser suite). Sample again, up to EMPTY_RETRIES
            # times; the prompt is the same, so llama.cpp reuses its evaluated prefix.
            for _attempt in range(1 + EMPTY_RETRIES):
                stream = self._llm.create_completion(
                    prompt, max_tokens=max_tokens, temperature=temperature, top_p=0.9, top_k=40,
                    repeat_penalty=1.15, stream=True,
                )
                scanner = StopScanner(dialogue.stops())
                first = True
                stopped = False
                for chunk in stream:
                    if cancel.cancelled:
                        stream.close()
                        return
                    text, stopped = scanner.feed(chunk["choices"][0]["text"])
                    if first:
                        text = text.lstrip()
                    if text:
                        first = False
                        yield text
                    if stopped:
                        stream.close()
                        break
                if not stopped:
                    text = scanner.flush()
                    text = text.lstrip() if first else text
                    if text:
                        first = False
                        yield text
                if not first:
                    return

    async def stream(self, request: LLMRequest, cancel: CancelToken) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        inner = CancelToken()  # also stops the thread when the consumer walks away

        def worker() -> None:
            try:
                for text in self.generate_sync(request, _Either(cancel, inner)):
                    loop.call_soon_threadsafe(queue.put_nowait, text)
            except ProviderError as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            except Exception as exc:  # llama.cpp failures (context full, decode error)
                loop.call_soon_threadsafe(queue.put_nowait, EngineUnavailable("The local language model failed while answering.", detail=repr(exc)))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        thread = threading.Thread(target=worker, name="llama-generate", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if cancel.cancelled:
                    return
                yield item
        finally:
            inner.cancel()


def _chat_formatter(llm, template: str):
    """The GGUF's chat template as llama-cpp-python renders it (None if it cannot)."""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def piece(token_id: int) -> str:
            try:
                return llm.detokenize([token_id], special=True).decode("utf-8", "ignore") if token_id >= 0 else ""
            except Exception:
                return ""

        return Jinja2ChatFormatter(template=template, eos_token=piece(llm.token_eos()), bos_token=piece(llm.token_bos()))
    except Exception:
        return None


class _Either(CancelToken):
    """Cancelled when either token is: the caller's, or the stream's own."""

    def __init__(self, a: CancelToken, b: CancelToken) -> None:
        super().__init__()
        self._a, self._b = a, b

    @property
    def cancelled(self) -> bool:
        return self._a.cancelled or self._b.cancelled
