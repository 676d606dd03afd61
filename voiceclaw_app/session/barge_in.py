"""When the user's voice stops the assistant: pause on a tentative onset, cancel on
confirmed speech, resume when the onset was a cough.

Providers only report (``SpeechStarted(tentative=...)``, ``SpeechDiscarded``); this
policy decides. Within the first ~300 ms of playback an onset is taken for the
assistant's own voice leaking into the mic (the echo guard) and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

ECHO_GUARD_MS = 300.0
#: a pause with neither a confirmation nor a discard after this long resumes playback
PAUSE_TIMEOUT_S = 2.0


@dataclass
class BargeInPolicy:
    echo_guard_ms: float = ECHO_GUARD_MS
    pause_timeout_s: float = PAUSE_TIMEOUT_S
    paused: bool = False

    def on_onset(self, *, tentative: bool, replying: bool, echo: bool) -> str | None:
        """A voice onset: "pause", "barge_in" or None (nothing to interrupt, or our echo)."""
        if tentative:
            if not self.paused and replying and not echo:
                self.paused = True
                return "pause"
            return None
        if self.paused or (replying and not echo):
            self.paused = False
            return "barge_in"
        return None

    def on_discard(self) -> str | None:
        """The onset was too short to be speech: "resume" when it had paused playback."""
        if self.paused:
            self.paused = False
            return "resume"
        return None

    def on_button(self, *, replying: bool) -> str | None:
        """The voice button pressed while the assistant speaks (or is paused)."""
        if replying or self.paused:
            self.paused = False
            return "barge_in"
        return None

    def timed_out(self) -> str | None:
        return self.on_discard()
