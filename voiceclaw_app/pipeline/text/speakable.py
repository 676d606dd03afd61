"""What TTS should read for a piece of reply text (the transcript keeps the original).

Every transform is local to a line, or to a run of non-space characters, so that
formatting chunks one by one gives the same words as formatting the whole reply:
the chunker only cuts at whitespace, never inside a code fence or a link's
``[text]``. :meth:`SpeechFormatter.format_document` formats a whole reply directly;
the property tests compare the two.
"""

from __future__ import annotations

import re

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]

_EMOJI_RE = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U00002B00-\U00002BFF\uFE0F\u200D\u20E3]"
)
_FENCE_RE = re.compile(r"^\s*(```|~~~)")
_HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+")
_BULLET_RE = re.compile(r"^\s*(?:[-*+\u2022]\s+)+")
_QUOTE_RE = re.compile(r"^\s*(?:>\s?)+")
_RULE_RE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\([^)\s]*\)")
_LINK_RE = re.compile(r"\[([^\]]*)\]\([^)\s]*\)")
_URL_RE = re.compile(r"\b(?:https?://|www\.)([^\s/)\]]+)[^\s)\]]*")
_CURRENCY_RE = re.compile(r"([$€£])(\d[\d,]*)(?:\.(\d{1,2}))?\b")
_PERCENT_RE = re.compile(r"(\d(?:[\d,]*\d)?(?:\.\d+)?)\s?%")
_TIME_RE = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)(?:\s?([AaPp])\.?[Mm]\.?)?(?![\d:])")
_DATE_RE = re.compile(r"\b(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])\b")
_THOUSANDS_RE = re.compile(r"\b(\d{1,3})((?:,\d{3})+)\b")
_EMPHASIS_RE = re.compile(r"\*+|(?<!\w)_+|_+(?!\w)|~~")
_WS_RE = re.compile(r"\s+")

_CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence")}


def _currency(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCY_NAMES[m.group(1)]
    whole = m.group(2).replace(",", "")
    out = f"{whole} {one if whole == '1' else many}"
    if m.group(3):
        cents = int(m.group(3).ljust(2, "0"))
        if cents:
            out += f" and {cents} {sub_one if cents == 1 else sub_many}"
    return out


def _time(m: re.Match[str]) -> str:
    hour, minute, ampm = int(m.group(1)), m.group(2), m.group(3)
    suffix = f" {ampm.upper()}M" if ampm else ""
    if minute == "00":
        return f"{hour} o'clock{suffix}" if not ampm else f"{hour}{suffix}"
    if minute.startswith("0"):
        return f"{hour} oh {minute[1]}{suffix}"
    return f"{hour} {minute}{suffix}"


def _date(m: re.Match[str]) -> str:
    return f"{_MONTHS[int(m.group(2)) - 1]} {int(m.group(3))}, {m.group(1)}"


class SpeechFormatter:
    """Drops what must not be read aloud and spells out numbers a voice would stumble on."""

    def format_inline(self, text: str) -> str:
        """Transforms that act within a line: links, URLs, emphasis, emoji, numbers."""
        text = _IMAGE_RE.sub(r"\1", text)
        text = _LINK_RE.sub(r"\1", text)
        text = _URL_RE.sub(lambda m: m.group(1).removeprefix("www."), text)
        text = text.replace("`", "")
        text = _EMOJI_RE.sub("", text)
        text = _DATE_RE.sub(_date, text)
        text = _CURRENCY_RE.sub(_currency, text)
        text = _PERCENT_RE.sub(lambda m: f"{m.group(1)} percent", text)
        text = _TIME_RE.sub(_time, text)
        text = _THOUSANDS_RE.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), text)
        text = _EMPHASIS_RE.sub("", text)
        text = text.replace("&", " and ").replace("|", " ")
        return text

    def format_line(self, line: str, at_line_start: bool) -> str:
        if at_line_start:
            if _RULE_RE.match(line):
                return ""
            line = _HEADING_RE.sub("", line)
            line = _QUOTE_RE.sub("", line)
            line = _BULLET_RE.sub("", line)
        return self.format_inline(line)

    def format_chunk(self, text: str, at_line_start: bool = True) -> str:
        """Speech for a chunk cut by :class:`SpeechChunker` (whole fences only)."""
        out: list[str] = []
        in_fence = False
        for i, line in enumerate(text.split("\n")):
            if _FENCE_RE.match(line) and (i > 0 or at_line_start):
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            out.append(self.format_line(line, at_line_start or i > 0))
        return normalize(" ".join(out))

    def format_document(self, text: str) -> str:
        """Speech for a whole reply at once (the reference the chunks must add up to)."""
        return self.format_chunk(text, at_line_start=True)


def normalize(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()
