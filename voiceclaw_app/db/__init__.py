"""Persistence: SQLModel tables and repository functions."""

from .models import Conversation, Message, SettingsRow, TurnTiming

__all__ = ["Conversation", "Message", "SettingsRow", "TurnTiming"]
