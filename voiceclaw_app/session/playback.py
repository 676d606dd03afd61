"""What the browser played of one reply, from the audio queue's reports.

The server sends chunk URLs; the page reports ``first_playing`` / ``chunk`` (a
chunk started), ``ended`` (all played, the reply complete) and ``stopped`` (cut,
with how many chunks had started). On a cut the stored reply keeps exactly the
chunks that started playing, so history, replay and what was heard agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pipeline.timing import now_ms


def _int(value: object, default: int = 0) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


@dataclass
class ReportEffect:
    """What one report changed that the session must act on."""

    first_playing_ms: float | None = None  # the first first_playing of the reply (server clock)
    more_played: bool = False  # a "stopped" counted more chunks than known before
    stopped_mid_reply: bool = False  # playback stopped before the reply was heard in full


@dataclass
class PlaybackLedger:
    chunks: list[tuple[str, str]] = field(default_factory=list)  # (audio_id, text) sent, in order
    played: int = 0  # chunks that started playing
    started_ms: float | None = None  # when the first chunk started (session clock)
    playing: bool = False  # the page is playing this reply (may outlive the turn)
    #: the page reported the end of this reply's playback (ended when complete, or
    #: stopped): later reports (a replay of the same URLs) change nothing
    over: bool = False
    first_playing_seen: bool = False

    def sent(self, audio_id: str, text: str) -> None:
        self.chunks.append((audio_id, text))

    def report(self, kind: str, data: dict, *, reply_done: bool) -> ReportEffect:
        eff = ReportEffect()
        if self.over:
            return eff
        if kind in ("first_playing", "chunk"):
            self.played = max(self.played, _int(data.get("index")) + 1)
            if self.started_ms is None:
                self.started_ms = now_ms()
            self.playing = True  # also after a drain while the LLM was slower than speech
        if kind == "first_playing" and not self.first_playing_seen:
            self.first_playing_seen = True
            server_ms = data.get("server_ms")
            if isinstance(server_ms, (int, float)) and not isinstance(server_ms, bool):
                eff.first_playing_ms = float(server_ms)
        if kind in ("stopped", "ended"):
            was_playing = self.playing
            self.playing = False
            if reply_done or kind == "stopped":
                self.over = True
            if kind == "stopped":
                before = self.played
                if data.get("played") is not None:
                    self.played = max(self.played, _int(data.get("played")))
                eff.more_played = self.played > before
                eff.stopped_mid_reply = was_playing or eff.more_played
        return eff

    def gone(self) -> None:
        """The page went away: nothing plays any more, and nothing will report."""
        self.playing = False
        self.over = True

    def in_echo_guard(self, guard_ms: float) -> bool:
        """Within the first ``guard_ms`` of playback a voice onset is likely our own voice."""
        return self.started_ms is not None and now_ms() - self.started_ms < guard_ms

    def kept(self, *, cut: bool) -> list[tuple[str, str]]:
        """The chunks the stored reply keeps: all, or on a cut those that started playing."""
        return self.chunks[: self.played] if cut else list(self.chunks)
