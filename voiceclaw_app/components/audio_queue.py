"""Audio queue (``assets/audio_queue.jsx``) and the streaming reply text (``assets/stream_text.jsx``)."""

import reflex as rx


class AudioQueue(rx.NoSSRComponent):
    library = "$/public/audio_queue.jsx"
    tag = "AudioQueue"
    urls: rx.Var[list[str]]
    turn_id: rx.Var[str]
    #: the turn has produced all its audio: "ended" is reported only then
    done: rx.Var[bool]
    stop_seq: rx.Var[int]
    cue: rx.Var[str]
    #: reports go on the tab's voice socket (the dashboard) instead of ``on_report``
    voice_reports: rx.Var[bool]
    on_report: rx.EventHandler[rx.event.passthrough_event_spec(str)]


class StreamText(rx.NoSSRComponent):
    library = "$/public/stream_text.jsx"
    tag = "StreamText"
    turn_id: rx.Var[str]
    seg_base: rx.Var[int]
    segments: rx.Var[list[str]]


audio_queue = AudioQueue.create
stream_text = StreamText.create
