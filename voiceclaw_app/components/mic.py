"""Mic capture component (``assets/mic_capture.jsx`` + ``assets/mic_worklet.js``)."""

import reflex as rx


class MicCapture(rx.NoSSRComponent):
    library = "$/public/mic_capture.jsx"
    tag = "MicCapture"
    mode: rx.Var[str]
    stop_seq: rx.Var[int]
    disabled: rx.Var[bool]
    #: the assistant is thinking or speaking: a tap on the button (hands-free) barges in
    busy: rx.Var[bool]
    #: the session's context, sent on the voice socket at every change
    conversation_id: rx.Var[str]
    muted: rx.Var[bool]
    #: a typed message to hand to the session (sent once per id and tab)
    say_id: rx.Var[str]
    say_text: rx.Var[str]
    on_event: rx.EventHandler[rx.event.passthrough_event_spec(str)]


mic_capture = MicCapture.create
