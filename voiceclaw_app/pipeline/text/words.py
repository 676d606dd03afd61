"""Words an English sentence (or a first spoken chunk) does not end on.

Two users: the end-of-turn judge (a transcript that stops on "the" or "and" is an
unfinished sentence, whatever the voice's intonation; one that stops on "for" or
"from" is finished only if its words clearly are: "Where is it from?") and the
chunker (a first chunk cut without punctuation should not end on one either: "set a
timer for | ten minutes" reads worse than "set a timer | for ten minutes"). Kept
short on purpose: words that often end real sentences ("that", "me", "it", "on",
"is", "so") are not in it.
"""

from __future__ import annotations

import re

#: the prepositions English leaves at the end of a question ("Where is it from?", "What
#: gate does it leave from?", "What is it for?"): a sentence may end on them, so the
#: end-of-turn judge lets clear words decide there
STRANDABLE = frozenset("to of in at for with by from into onto through under until between without".split())

DANGLING = STRANDABLE | frozenset("""
a an the my your our their its every each
than
and or but nor because if when while although though whether unless
i we they he she
""".split())

#: a word, numbers included ("at 10" ends on "10", not on "at")
_WORDS = re.compile(r"[a-z0-9']+")


def last_word(text: str) -> str:
    words = _WORDS.findall(text.lower())
    return words[-1] if words else ""


def ends_unfinished(text: str) -> bool:
    """True when ``text`` stops on a word no sentence ends on ("the", "and", "my"): the
    dangling words less the prepositions a question may leave at its end."""
    word = last_word(text)
    return word in DANGLING and word not in STRANDABLE
