"""Custom endpoints mounted before Reflex's: the mic WebSocket and the audio route."""
