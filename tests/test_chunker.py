"""The speech chunker and formatter: split invariance, promptness, safe cut points."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from voiceclaw_app.pipeline.text import SpeechChunker, SpeechFormatter, SpokenLengthLimiter, chunk_text
from voiceclaw_app.pipeline.text.speakable import normalize

FRAGMENTS = [
    "Hello", "there", "world", "the", "answer", "is", "simple", " ", " ", " ", ", ", ". ", "! ", "? ", "; ", ": ",
    " - ", " — ", "\n", "\n\n", "Dr. Smith", "e.g. this", "U.S. law", "3.14", "$4.50", "10:30", "https://example.com/a.b?c=1",
    "mail me at a.b@example.org", "...", "1. ", "- ", "**bold**", "`code`", "```py\nx = 1. 2\n```\n", "[the docs](http://x.y/z)",
    "# Title\n", "😀", "50%", "2026-11-25", "1,000", "snake_case", "> quote\n", "tools,", "(see this)", "\"Quoted.\" ",
    "- - -", "* * *", "---\n", "[", "]", "~~", "|", "\t", "Mr.", "a.m.", "9 pm", "€3", "?!", "'", "_", "*",
]
texts = st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=40).map("".join)


def split_points(text: str, data) -> list[str]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=30))))
    pieces, last = [], 0
    for c in cuts + [len(text)]:
        pieces.append(text[last:c])
        last = c
    return pieces


def stream(tokens: list[str], min_words: int = 4):
    """Feed tokens; return chunks and, per chunk, the index of the token that emitted it."""
    ch = SpeechChunker(min_words)
    out, at = [], []
    for k, tok in enumerate(tokens):
        got = ch.push(tok)
        out += got
        at += [k] * len(got)
    tail = ch.flush()
    return out + tail, at + [len(tokens)] * len(tail)


@settings(max_examples=1000, deadline=None)
@given(text=texts, data=st.data(), min_words=st.integers(1, 6))
def test_any_token_split_gives_the_same_chunks(text, data, min_words):
    tokens = split_points(text, data)
    got, _ = stream(tokens, min_words)
    assert got == chunk_text(text, min_words)


@settings(max_examples=1000, deadline=None)
@given(text=texts)
def test_chunks_join_to_the_speakable_text(text):
    parts = []
    for c in chunk_text(text):
        # a space between two chunks' speech where the reply has one there, or where
        # formatting the reply leaves one (e.g. "tools,* * *Hello" reads "tools, Hello")
        spaced = c.start > 0 and (text[c.start - 1].isspace() or SpeechFormatter().format_inline(text[c.start :])[:1].isspace())
        parts.append((" " if spaced else "") + c.speech)
    joined = normalize("".join(parts))
    assert joined == SpeechFormatter().format_document(text)


CLOSERS = "\"')]}»”’*_"


def latest_deciding_position(text: str, chunks, k: int, prev_end: int) -> int | None:
    """Where the text itself decides chunk ``k`` (computed from the text, not from the
    chunker's own bookkeeping): None when only the end of the reply can (the last chunk).

    A chunk ending at a mark is decided by the character after it: the mark itself for
    a first-chunk ``,;!?`` glued to the next word, else the whitespace after it (at the
    latest the end of that run of whitespace, e.g. a line break after trailing spaces).
    A later chunk ending at a clause mark, an ellipsis or no mark at all is a long
    sentence's cut, decided once the sentence is too long.
    """
    c = chunks[k]
    s = text.index(c.text, prev_end)
    e = s + len(c.text)
    if e >= len(text) or not text[e:].strip():
        return None
    j = e - 1
    while j > s and text[j] in CLOSERS:
        j -= 1
    mark = text[j]
    if not text[e].isspace():
        return e - 1 if mark in ",;!?" else e
    run_end = e
    while run_end + 1 < len(text) and text[run_end + 1].isspace():
        run_end += 1
    natural = mark in ".!?" and not text[s : j + 1].endswith("..")
    if k == 0 or "\n" in text[e : run_end + 1] or natural:
        return run_end
    return max(run_end, prev_end + SpeechChunker.HARD_MAX + 1)


@settings(max_examples=1000, deadline=None)
@given(text=texts, data=st.data())
def test_each_chunk_is_emitted_by_the_token_that_completes_it(text, data):
    tokens = split_points(text, data)
    got, emitted_at = stream(tokens)
    assert got == chunk_text(text)
    ends = []
    total = 0
    for tok in tokens:
        total += len(tok)
        ends.append(total)
    prev_end = 0
    for k, (chunk, at) in enumerate(zip(got, emitted_at)):
        pos = latest_deciding_position(text, got, k, prev_end)
        prev_end = text.index(chunk.text, prev_end) + len(chunk.text)
        # never before the chunk's own text has arrived
        assert at == len(tokens) or ends[at] >= prev_end, (chunk, at)
        if pos is None:
            assert k == len(got) - 1  # only the reply's last chunk may wait for flush()
            continue
        completing = next(idx for idx, end in enumerate(ends) if end > pos)
        assert at < len(tokens), ("emitted only by flush()", chunk)
        assert at <= completing, (chunk, at, completing)


def test_a_chunker_that_waits_for_the_end_fails_the_promptness_check():
    text = "Sure, the capital of France is Paris. It has many museums. And cafés."
    tokens = [text[i : i + 3] for i in range(0, len(text), 3)]
    chunks = chunk_text(text)
    ends = [min(len(text), 3 * (i + 1)) for i in range(len(tokens))]
    pos = latest_deciding_position(text, chunks, 0, 0)
    assert pos is not None and next(idx for idx, end in enumerate(ends) if end > pos) < len(tokens) - 1


def test_first_chunk_is_a_clause_once_it_has_enough_words():
    chunks = chunk_text("Sure, the capital of France is Paris, a lovely city. It has many museums. And cafés.")
    assert chunks[0].text == "Sure, the capital of France is Paris,"
    assert [c.text for c in chunks[1:]] == ["a lovely city.", "It has many museums.", "And cafés."]


def test_first_chunk_waits_for_min_words():
    assert chunk_text("Yes. I can do that for you today.")[0].text == "Yes. I can do that for you today."
    assert chunk_text("Yes. I can do that, for you today.", min_first_words=2)[0].text == "Yes. I can do that,"


def test_later_chunks_end_at_sentences_not_commas():
    chunks = chunk_text("First of all, hello there. Then, we go on, and on. Finally done!")
    assert [c.text for c in chunks] == ["First of all, hello there.", "Then, we go on, and on.", "Finally done!"]


def test_never_splits_inside_protected_tokens():
    text = ("Dr. Smith said e.g. the U.S. rate is 3.14 or $4.50 at 10:30 today... "
            "see https://example.com/a.b?x=1 or mail a.b@example.org now. Done.")
    chunks = chunk_text(text, min_first_words=30)
    joined = " ".join(c.text for c in chunks)
    for token in ["Dr. Smith", "e.g. the", "U.S. rate", "3.14", "$4.50", "10:30", "https://example.com/a.b?x=1", "a.b@example.org"]:
        assert any(token in c.text for c in chunks), token
    assert joined.replace(" ", "") == text.replace(" ", "")


def test_list_items_keep_their_numbers():
    chunks = chunk_text("Here are the steps to follow:\n1. Open the app.\n2. Tap the button.\n")
    assert [c.text for c in chunks] == ["Here are the steps to follow:", "1. Open the app.", "2. Tap the button."]


def test_code_blocks_are_shown_not_spoken():
    text = "Here is the code for you:\n```python\nprint('a. b')\n```\nRun it."
    chunks = chunk_text(text)
    assert chunks[1].text.startswith("```python") and chunks[1].speech == ""
    assert chunks[-1].speech == "Run it."


def test_very_long_sentences_fall_back_to_clauses():
    long = ", ".join(f"item number {i} in the list" for i in range(30)) + "."
    chunks = chunk_text(long)
    assert len(chunks) > 3
    assert all(len(c.text) <= SpeechChunker.HARD_MAX for c in chunks)


def test_formatter_reads_what_a_voice_should_read():
    f = SpeechFormatter()
    assert f.format_document("## Heading\n- **Bold** item with `code` 😀") == "Heading Bold item with code"
    assert f.format_document("See [the docs](https://example.com/docs) now") == "See the docs now"
    assert f.format_document("It costs $4.50, or $1 today") == "It costs 4 dollars and 50 cents, or 1 dollar today"
    assert f.format_document("Meet at 10:30, or 9:05 pm, or 14:00") == "Meet at 10 30, or 9 oh 5 PM, or 14 o'clock"
    assert f.format_document("Due 2026-11-25, up 50%") == "Due November 25, 2026, up 50 percent"
    assert f.format_document("About 1,000,000 people") == "About 1000000 people"
    assert f.format_document("Visit https://www.example.com/path?q=1 please") == "Visit example.com please"
    assert f.format_document("```\ncode\n```") == ""


def test_spoken_length_limit_ends_at_a_chunk_with_a_notice():
    limiter = SpokenLengthLimiter(60)
    chunks = chunk_text("This is the first sentence of it. " * 6)
    admitted = [c for ch in chunks for c in limiter.admit(ch)]
    assert admitted[-1].notice and admitted[-1].text == "The rest is on screen."
    assert sum(len(c.speech) for c in admitted if not c.notice) <= 60
    assert limiter.truncated


def test_first_chunk_without_a_clause_is_cut_at_a_word_count():
    text = "I think the best thing you could do today is rest and drink water. Then sleep."
    chunks = chunk_text(text)
    assert chunks[0].text == "I think the best thing you could do"  # 8 words, no clause boundary came
    assert chunks[1].text == "today is rest and drink water."
    # never on a word no phrase ends on: "the" moves the cut one word on
    assert chunk_text("Go on and you will see that the big tower is open.")[0].text == "Go on and you will see that the big"
    # a clause boundary before the cap still wins
    assert chunk_text("Well, I think that you should rest, and drink water today.")[0].text == "Well, I think that you should rest,"
    assert chunk_text("I don't think that you can't or won't go there today.")[0].text == "I don't think that you can't or won't"
    assert chunk_text("Sure, I think that is right.", min_first_words=2)[0].text == "Sure, I think that is right."
    # a higher min_first_words raises the cap with it
    assert len(chunk_text(text, min_first_words=10)[0].text.split()) == 10


def test_first_chunk_deadline_cuts_at_the_last_word_boundary():
    ch = SpeechChunker(4)
    assert ch.push("The weather in") == []
    assert ch.cut_first_now() == []  # two words before the last space: too short to say alone
    assert ch.push(" Paris today") == []
    (first,) = ch.cut_first_now()
    assert first.text == "The weather in Paris" and first.seq == 0 and not ch.first_pending
    assert ch.cut_first_now() == []  # only ever the first chunk
    rest = ch.push(" is sunny and warm. More soon.") + ch.flush()
    assert [c.text for c in rest] == ["today is sunny and warm.", "More soon."]
    fenced = SpeechChunker(4)
    fenced.push("```python\nprint(1) and more words here")
    assert fenced.cut_first_now() == []


def test_the_chunk_after_a_deadline_cut_is_cut_early_too():
    """A deadline cut leaves ~1 s of speech: the next chunk must be ready before it ends,
    so it is cut like a first chunk (8 words here), not at the sentence's end."""
    long_sentence = " is sunny and warm with a light breeze from the west and clear skies all afternoon, then rain comes."
    ch = SpeechChunker(4)
    ch.push("The weather in Paris today")
    (first,) = ch.cut_first_now()
    rest = ch.push(long_sentence) + ch.flush()
    assert first.text == "The weather in Paris"
    assert [c.text for c in rest] == ["today is sunny and warm with a light", "breeze from the west and clear skies all afternoon, then rain comes."]
    # without the deadline cut, the 8-word first chunk is long enough: the rest is one sentence
    whole = chunk_text("The weather in Paris today" + long_sentence)
    assert [c.text for c in whole] == ["The weather in Paris today is sunny and warm", "with a light breeze from the west and clear skies all afternoon, then rain comes."]
    # and a clause boundary after the deadline cut ends the next chunk there
    ch = SpeechChunker(4)
    ch.push("Sure thing, I can")
    assert [c.text for c in ch.cut_first_now()] == ["Sure thing,"]
    assert [c.text for c in ch.push(" set that up for you, and remind you tomorrow.") + ch.flush()] == ["I can set that up for you,", "and remind you tomorrow."]


def test_a_deadline_cut_ends_at_a_boundary_that_came_before_enough_words():
    """"No," alone is too short for a first chunk by the word count, but when the
    deadline passes it is where the voice pauses anyway: cut there, not mid-phrase
    ("No, I'm not" | "sure ..."), and sooner (no wait for three words)."""
    ch = SpeechChunker(4)
    assert ch.push("No,") == [] and ch.push(" I'm") == []
    assert [c.text for c in ch.cut_first_now()] == ["No,"]
    assert [c.text for c in ch.push(" not sure about that, sorry.") + ch.flush()] == ["I'm not sure about that,", "sorry."]
    # the latest boundary wins; a sentence end counts too
    ch = SpeechChunker(4)
    ch.push("Yes. Well, it")
    assert [c.text for c in ch.cut_first_now()] == ["Yes. Well,"]
    # without the deadline nothing changes: the boundary waits for min_first_words
    assert [c.text for c in chunk_text("No, I'm not sure about that, sorry.")] == ["No, I'm not sure about that,", "sorry."]
    # a boundary inside a chunk already cut is not reused
    ch = SpeechChunker(2)
    ch.push("Hi, there it is.")
    ch.push(" Here")
    assert ch.cut_first_now() == []
