"""Reflex state classes and the UI's turn/cancel registry."""
