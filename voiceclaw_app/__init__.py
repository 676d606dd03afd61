"""VoiceClaw: a streaming, self-hostable voice front end for a personal AI assistant."""
