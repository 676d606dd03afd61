"""The app's own fixed phrases, synthesized ahead of time (the guide's "prefetch audio").

A cue while the gateway's agent runs tools, the error apology and "the rest is on
screen" must play instantly, so they go through the TTS cache at startup and
again whenever the voice changes.
"""

from __future__ import annotations

import logging

from ..providers.base import TTS, CancelToken, ProviderError
from .audio_store import AudioStore, StoredAudio
from .text.limiter import REST_ON_SCREEN
from .tts_scheduler import TTSCache, synthesize_cached

log = logging.getLogger("voiceclaw.phrases")

PHRASES = {
    "still_working": "One moment, still working on it.",
    "error": "Sorry, something went wrong. The details are on screen.",
    "rest_on_screen": REST_ON_SCREEN,
}


class PhraseBook:
    """The fixed phrases' audio: pinned in the TTS cache (never evicted), handed out
    as random-id files of the audio store that belong to the phrase book, not to a
    conversation (no conversation stores their ids), so deleting a conversation
    never removes them; retention may, and they are then copied again."""

    def __init__(self, tts: TTS | None, store: AudioStore, cache: TTSCache, *, voice: str, speed: float):
        self.tts = tts
        self.store = store
        self.cache = cache
        self.voice = voice
        self.speed = speed
        self._ready: dict[tuple, StoredAudio] = {}
        cache.pin(*PHRASES.values())

    def _key(self, name: str) -> tuple:
        assert self.tts is not None
        return (self.tts.cache_identity(self.voice, self.speed), name)

    def _remembered(self, name: str) -> StoredAudio | None:
        audio = self._ready.get(self._key(name))
        if audio is not None and self.store.path_for(audio.audio_id) is not None:
            return audio
        return None

    def cached(self, name: str) -> StoredAudio | None:
        """The phrase's audio if already synthesized (never waits on synthesis)."""
        if self.tts is None:
            return None
        audio = self._remembered(name)
        if audio is None:
            audio = self.cache.get(self.tts.cache_identity(self.voice, self.speed), PHRASES[name])
            if audio is not None:
                self._ready[self._key(name)] = audio
        return audio

    async def get(self, name: str) -> StoredAudio | None:
        """The phrase's audio, synthesizing it if needed; None without TTS or on failure."""
        if self.tts is None:
            return None
        audio = self.cached(name)
        if audio is not None:
            return audio
        try:
            audio = await synthesize_cached(self.tts, self.cache, self.store, PHRASES[name], voice=self.voice, speed=self.speed, cancel=CancelToken())
        except ProviderError as exc:
            log.warning("could not synthesize phrase %s: %s", name, exc.user_message)
            return None
        if audio is not None:
            self._ready[self._key(name)] = audio
        return audio

    async def prefetch(self) -> int:
        """Synthesize every phrase now; returns how many are ready."""
        ready = 0
        for name in PHRASES:
            if await self.get(name) is not None:
                ready += 1
        return ready
