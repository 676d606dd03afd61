"""Persistence: SQLModel tables and repository functions."""

from .models import Conversation, LoginFailure, LoginSession, Message, SettingsRow, TurnTiming, User

__all__ = ["Conversation", "LoginFailure", "LoginSession", "Message", "SettingsRow", "TurnTiming", "User"]
