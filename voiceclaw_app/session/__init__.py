"""One voice session per connection: plain async Python (no Reflex), tested without a browser.

Read :mod:`.session` top to bottom for a turn from mic frame to playback report.
"""

from .events import SessionEvent
from .ports import ConversationStore, Services
from .reply import ReplyHandle
from .playback import PlaybackLedger
from .barge_in import BargeInPolicy
from .session import VoiceSession

__all__ = ["BargeInPolicy", "ConversationStore", "PlaybackLedger", "ReplyHandle", "Services", "SessionEvent", "VoiceSession"]
