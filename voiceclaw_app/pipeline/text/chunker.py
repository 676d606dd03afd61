"""Cut a streaming LLM reply into speakable chunks, as early as is safe.

The first chunk is cut at the first clause boundary (``,`` ``;`` ``:`` a dash, or a
sentence end) once it has ``min_first_words`` words, so speech starts before the
first sentence is complete; when no boundary has come by ``first_max_words`` words
(default 8), it is cut at the space after that word (or the next one, if that word is
"the", "for", "and"... which no phrase ends on). And the turn loop may cut it sooner,
when a deadline passes after the first token (:meth:`SpeechChunker.cut_first_now`): at
a clause or sentence boundary it already has however few words precede it ("No,"),
else at the last word boundary: the voice never waits for a clause that comes late.
A chunk cut that way is only a few words (~1 s of speech), so the one after it is cut
like a first chunk (clause boundary after ``min_first_words`` words, or
``first_max_words`` words) and is ready before they have been spoken. Later chunks
end at sentence ends or line breaks, with a clause fallback for very long sentences.

Why 8 words: about 3 s of speech at Piper's pace, long enough that the next chunk
(the rest of the sentence, synthesized at 5-10x real time while this one plays) is
ready before it ends, and at the local LLM's ~38 tokens/s only ~0.3 s of tokens.

Every decision is made at one character position using only the text up to it
(a boundary is a punctuation mark followed by whitespace), so:

* however the reply is split into tokens, the chunks are the same;
* a chunk is emitted by the very token that completes it (``Chunk.decided_at``).

Never cut inside ``Dr.``, ``e.g.``, ``U.S.``, ``3.14``, ``$4.50``, ``10:30``, URLs,
e-mail addresses (no whitespace follows their dots), ``...``, a list item's ``1.``,
a code fence or a link's ``[text]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .speakable import _FENCE_RE, SpeechFormatter
from .words import DANGLING, last_word

ABBREVIATIONS = frozenset(
    """dr. mr. mrs. ms. prof. st. jr. sr. vs. etc. e.g. i.e. eg. ie. a.m. p.m. no. nos. fig. approx.
    inc. ltd. co. corp. mt. ave. rd. dept. est. gen. gov. sgt. capt. lt. col. rev. hon. vol. ch. pp.
    jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec. mon. tue. wed. thu. fri. sat. sun.""".split()
)
_INITIALS_RE = re.compile(r"(?:[A-Za-z]\.)+")
_LIST_NUMBER_RE = re.compile(r"\d{1,3}\.")
_PLAIN_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_CLOSERS = "\"')]}»”’*_"
_OPENERS = "\"'([{«“‘*_"

Boundary = Literal["sentence", "clause", "line"]


@dataclass(frozen=True)
class Chunk:
    """A speakable piece of the reply.

    ``text`` is the original (as the transcript shows it), ``speech`` what TTS reads
    (may be empty, e.g. a code block), ``decided_at`` the index in the whole reply of
    the character that completed the chunk (``len(reply)`` for the final flush).
    """

    seq: int
    text: str
    speech: str
    start: int
    decided_at: int
    notice: bool = False


class SpeechChunker:
    """Incremental chunker: :meth:`push` tokens, then :meth:`flush` at the end of the reply."""

    #: past this many characters without a sentence end, cut at the last clause boundary
    SOFT_MAX = 220
    #: past this, cut at the last space even without a clause boundary
    HARD_MAX = 360

    #: first chunk without a clause boundary: cut at a space once it has this many words
    FIRST_MAX_WORDS = 8
    #: ...but not after a word no phrase ends on, unless it runs this much longer
    FIRST_MAX_EXTRA_WORDS = 4
    #: :meth:`cut_first_now` cuts only a first chunk of at least this many words
    DEADLINE_MIN_WORDS = 3

    def __init__(self, min_first_words: int = 4, formatter: SpeechFormatter | None = None, first_max_words: int | None = FIRST_MAX_WORDS):
        self.min_first_words = max(1, min_first_words)
        self.first_max_words = None if first_max_words is None else max(self.min_first_words, first_max_words)
        self.formatter = formatter or SpeechFormatter()
        self._text = ""
        self._pos = 0  # next index to examine
        self._start = 0  # start of the pending chunk
        self._seq = 0
        self._line_start = 0
        self._in_fence = False
        self._fence_opened_at = -1  # start of the line whose fence opened the current block
        self._brackets = 0
        self._clauses: list[int] = []  # whitespace indexes after clause marks, in the pending chunk
        self._last_space = -1
        #: the first chunk was cut by the deadline (a few words): the next is cut like a
        #: first one, so it is ready before those few words have been spoken
        self._short_next = False
        #: (end, consume) of the latest clause or sentence boundary in the pending first
        #: chunk that came before ``min_first_words`` words ("No," "Sure thing,"): where
        #: a deadline cut ends it, rather than mid-phrase
        self._early_end: tuple[int, bool] | None = None

    @property
    def _opening(self) -> bool:
        """The chunk being written is cut early: the first, or the one after a deadline cut."""
        return self._seq == 0 or self._short_next

    @property
    def text(self) -> str:
        """The whole reply so far, as received."""
        return self._text

    def push(self, token: str) -> list[Chunk]:
        """Add a token; return the chunks it completed (usually none or one)."""
        self._text += token
        out: list[Chunk] = []
        text = self._text
        while self._pos < len(text):
            i = self._pos
            self._pos += 1
            ch = text[i]
            if ch == "\n":
                line = text[self._line_start:i]
                if _FENCE_RE.match(line) and self._fence_opened_at != self._line_start:
                    self._in_fence = not self._in_fence  # a closing fence ends with its line
                self._line_start = i + 1
                self._brackets = 0
            elif not self._in_fence and ch in "`~" and _FENCE_RE.match(text[self._line_start : i + 1]):
                # an opening fence: silent from its third mark on, so nothing before the
                # newline can be cut off the fence line
                self._in_fence = True
                self._fence_opened_at = self._line_start
            elif ch == "[":
                self._brackets += 1
            elif ch == "]" and self._brackets:
                self._brackets -= 1
            if self._in_fence:
                continue
            if self._opening and ch in ",;!?" and self._brackets == 0 and self._immediate_clause(i):
                # First chunk: these marks after a plain word end a clause whatever
                # follows, so cut now instead of waiting a token for the space.
                chunk = self._decide_first_now(i)
                if chunk is not None:
                    out.append(chunk)
                    continue
            if ch.isspace():
                kind = self._boundary_at(i) if self._brackets == 0 or ch == "\n" else None
                if kind is not None:
                    chunk = self._decide(i, kind)
                    if chunk is not None:
                        out.append(chunk)
                        continue
                if self._brackets == 0:
                    self._last_space = i
                    chunk = self._first_at_word(i)
                    if chunk is not None:
                        out.append(chunk)
                        continue
            chunk = self._fallback(i)
            if chunk is not None:
                out.append(chunk)
        return out

    def flush(self) -> list[Chunk]:
        """End of reply: whatever is pending is the last chunk."""
        end = len(self._text)
        chunk = self._emit(end, end)
        return [chunk] if chunk is not None else []

    @property
    def first_pending(self) -> bool:
        """No chunk yet (the first one is still being written)."""
        return self._seq == 0

    def cut_first_now(self) -> list[Chunk]:
        """A deadline passed with no first chunk: cut it now.

        At the latest clause or sentence boundary it already has, however few words
        precede it ("No," of "No, I'm not"): a pause the voice makes anyway. Else at the
        last word boundary, when there are ``DEADLINE_MIN_WORDS`` words before it. Never
        inside a code block or a link's text; the rest stays pending. (A time-based cut
        depends on when tokens arrived, so it is outside the split-invariance the
        property tests check; every other cut is not.)"""
        if self._seq != 0 or self._in_fence or self._brackets:
            return []
        if self._early_end is not None:
            end, consume = self._early_end
            chunk = self._emit(end, len(self._text) - 1, consume=consume)
            self._short_next = chunk is not None
            return [chunk] if chunk is not None else []
        if self._last_space <= self._start:
            return []
        head = self._text[self._start : self._last_space]
        if len(head.split()) < self.DEADLINE_MIN_WORDS:
            return []
        chunk = self._emit(self._last_space, len(self._text) - 1)
        self._short_next = chunk is not None
        return [chunk] if chunk is not None else []

    # ---------------------------------------------------------------- internals
    def _first_at_word(self, i: int) -> Chunk | None:
        """First chunk, space at ``i``, no clause boundary so far: cut at a word count."""
        if not self._opening or self.first_max_words is None:
            return None
        pending = self._text[self._start : i]
        words = [w for w in pending.split() if any(c.isalnum() for c in w)]
        # only after a plain word: never split markup ("- - -", "**", a bullet) from its text
        if len(words) < self.first_max_words or not _PLAIN_WORD_RE.fullmatch(pending.split()[-1]):
            return None
        n = len(words)
        if last_word(pending) in DANGLING and n < self.first_max_words + self.FIRST_MAX_EXTRA_WORDS:
            return None
        return self._emit(i, i)

    def _boundary_at(self, i: int) -> Boundary | None:
        """Classify whitespace at ``i`` by what precedes it (never by what follows)."""
        text = self._text
        if text[i] == "\n":
            return "line"
        j = i - 1
        while j >= self._start and text[j] in _CLOSERS:
            j -= 1
        if j < self._start:
            return None
        c = text[j]
        if c in "!?":
            return "sentence"
        if c == ".":
            w = max(text.rfind(" ", 0, j), text.rfind("\n", 0, j), text.rfind("\t", 0, j)) + 1
            word = text[w : j + 1].lstrip(_OPENERS)
            if word.endswith(".."):
                return "clause"  # an ellipsis: a pause, not an end
            if word.lower() in ABBREVIATIONS or _INITIALS_RE.fullmatch(word):
                return None
            if _LIST_NUMBER_RE.fullmatch(word) and not text[self._line_start : w].strip():
                return None  # "1. " opening a list item
            return "sentence"
        if c in ",;:\u2014\u2013":
            return "clause"
        if c == "-" and j - 1 > self._line_start and text[j - 1] == " " and any(ch.isalnum() for ch in text[self._line_start : j]):
            return "clause"  # a spaced hyphen used as a dash (not a "- - -" rule or a bullet)
        return None

    def _immediate_clause(self, i: int) -> bool:
        """A first-chunk mark that needs no look-ahead: after a letter, in a plain word
        (not a URL, path, e-mail or number such as ``1,000``)."""
        text = self._text
        if i == 0 or not text[i - 1].isalpha():
            return False
        w = max(text.rfind(" ", 0, i), text.rfind("\n", 0, i), text.rfind("\t", 0, i)) + 1
        word = text[w:i]
        return not any(c in word for c in "/@.:\\=&?#`*_[]()")

    def _decide_first_now(self, i: int) -> Chunk | None:
        pending = self._text[self._start : i + 1]
        if len(pending.split()) >= self.min_first_words:
            return self._emit(i + 1, i, consume=False)
        self._early_end = (i + 1, False)
        return None

    def _decide(self, i: int, kind: Boundary) -> Chunk | None:
        pending = self._text[self._start : i]
        if not pending.strip():
            self._start = i + 1
            self._clauses.clear()
            return None
        if self._opening:
            if len(pending.split()) >= self.min_first_words:
                return self._emit(i, i)
            self._early_end = (i, True)
            return None
        if kind == "clause":
            self._clauses.append(i)
            return None
        return self._emit(i, i)

    def _fallback(self, i: int) -> Chunk | None:
        """Cut very long sentences at a clause, else at a space, so speech keeps flowing."""
        if i - self._start < self.SOFT_MAX:
            return None
        if self._clauses:
            return self._emit(self._clauses[-1], i)
        if i - self._start >= self.HARD_MAX and self._last_space > self._start:
            return self._emit(self._last_space, i)
        return None

    def _emit(self, end: int, decided_at: int, consume: bool = True) -> Chunk | None:
        """Cut ``[start, end)``; ``consume`` skips the boundary whitespace at ``end``."""
        raw = self._text[self._start : end]
        start = self._start
        self._start = end + 1 if consume and end < len(self._text) else end
        self._clauses = [c for c in self._clauses if c > end]
        self._early_end = None  # it was in the text just cut
        if not raw.strip():
            return None
        at_line_start = start == 0 or self._text[start - 1] == "\n"
        speech = self.formatter.format_chunk(raw, at_line_start=at_line_start)
        chunk = Chunk(self._seq, raw.strip(), speech, start, decided_at)
        self._seq += 1
        self._short_next = False
        return chunk


def chunk_text(text: str, min_first_words: int = 4) -> list[Chunk]:
    """All chunks of a complete text (the reference the streaming result must equal)."""
    chunker = SpeechChunker(min_first_words)
    return chunker.push(text) + chunker.flush()
