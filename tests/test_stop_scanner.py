"""The embedded LLM's own stop-sequence scan (``local_llm.StopScanner``)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from voiceclaw_app.providers.local_llm import DialoguePrompt, StopScanner

STOPS = ["\nUser:", "\n\n", "\nAtlas:", "User:"]


def run(pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(STOPS)
    out = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


def reference(text: str) -> tuple[str, bool]:
    """What llama.cpp's own stop handling gives: the text before the earliest stop."""
    hits = [i for i in (text.find(s) for s in STOPS) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


ALPHABET = st.sampled_from(["User", ":", "\n", " ", "Atlas", "Us", "er", "Hi", ".", "A", "\n\n", "!"])


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=14).map("".join), st.lists(st.integers(0, 200), max_size=8))
def test_any_split_gives_the_text_before_the_first_stop(text: str, cuts: list[int]) -> None:
    got, stopped = run(splits(text, cuts))
    want, want_stopped = reference(text)
    assert stopped == want_stopped
    # whitespace goes out early, so a stop may leave the newline that began it
    assert got.rstrip() == want.rstrip()
    assert want.startswith(got.rstrip()) and len(got) <= len(want) + 2


def test_the_newline_after_a_sentence_goes_out_with_its_token() -> None:
    """The point of it: the chunker sees the line break at once, not two tokens later."""
    scanner = StopScanner(STOPS)
    assert scanner.feed(" Mount") == (" Mount", False)
    assert scanner.feed(" Kenya.") == (" Kenya.", False)
    assert scanner.feed("\n") == ("\n", False)
    assert scanner.feed("User") == ("", False)  # could be the next speaker: held
    assert scanner.feed(":") == ("", True)


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    scanner = StopScanner(STOPS)
    assert scanner.feed("Ask the Us") == ("Ask the ", False)
    assert scanner.feed("ers guide") == ("Users guide", False)
    assert scanner.feed(" at") == (" at", False)
    assert scanner.flush() == ""
    scanner = StopScanner(STOPS)
    assert scanner.feed("Hi Us") == ("Hi ", False)
    assert scanner.flush() == "Us"


def test_the_dialogue_prompts_stops_are_the_ones_scanned() -> None:
    assert set(DialoguePrompt("Atlas").stops()) == set(STOPS)
