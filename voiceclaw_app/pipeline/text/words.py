"""Words an English sentence (or a first spoken chunk) does not end on.

Two users: the end-of-turn judge (a transcript that stops on "for" or "the" is an
unfinished sentence, whatever the voice's intonation) and the chunker (a first chunk
cut without punctuation should not end on one either: "set a timer for | ten minutes"
reads worse than "set a timer | for ten minutes"). Kept short on purpose: words that
often end real sentences ("that", "me", "it", "on", "is", "so") are not in it.
"""

from __future__ import annotations

import re

DANGLING = frozenset("""
a an the my your our their its every each
to of in at for with by from into onto than through under until between without
and or but nor because if when while although though whether unless
i we they he she
""".split())

_WORDS = re.compile(r"[a-z']+")


def last_word(text: str) -> str:
    words = _WORDS.findall(text.lower())
    return words[-1] if words else ""


def ends_dangling(text: str) -> bool:
    """True when ``text`` stops on a word no sentence ends on."""
    return last_word(text) in DANGLING
