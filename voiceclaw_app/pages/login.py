"""``/login``: an HTML form posted natively to ``/auth/login`` (the route sets the HttpOnly
cookie, which no Reflex event could); a failure comes back as ``?error=<code>``.

With no account yet, a request from this machine itself gets a form for the first
(admin) account instead (``/auth/setup``); anyone else is told the command line.
"""

import reflex as rx

from ..server.auth import FIRST_ACCOUNT_HINT
from ..states.auth import LoginState


def _field(label: str, id_: str, name: str, kind: str, autocomplete: str) -> rx.Component:
    return rx.vstack(
        rx.el.label(label, html_for=id_),
        rx.el.input(id=id_, name=name, type=kind, auto_complete=autocomplete, required=True, class_name="login-input"),
        spacing="1",
        width="100%",
    )


def _form(form_id: str, action: str, button_id: str, button: str, password_autocomplete: str) -> rx.Component:
    # Reflex's form always prevents the browser's own submission (it hands the fields to
    # an event instead); the route must get a real POST to set the cookie, so the
    # submit event only calls the form's native submit(), which fires no second event.
    return rx.el.form(
        rx.vstack(
            _field("User name", "login-username", "username", "text", "username"),
            _field("Password", "login-password", "password", "password", password_autocomplete),
            rx.el.input(type="hidden", name="next", value=LoginState.next_path, read_only=True),
            rx.el.button(button, id=button_id, type="submit", class_name="login-button"),
            spacing="3",
            width="100%",
        ),
        action=action,
        method="post",
        id=form_id,
        on_submit=rx.call_script(f"document.getElementById('{form_id}').submit()"),
    )


def login_page() -> rx.Component:
    return rx.center(
        rx.vstack(
            rx.heading("VoiceClaw", size="6"),
            rx.cond(
                LoginState.first_run,
                rx.vstack(
                    rx.text("No account exists yet. Create the first one (it is the admin):"),
                    _form("setup-form", "/auth/setup", "setup-submit", "Create admin account", "new-password"),
                    width="100%",
                ),
                _form("login-form", "/auth/login", "login-submit", "Log in", "current-password"),
            ),
            rx.cond(LoginState.error != "", rx.text(LoginState.error, id="login-error", color="var(--red-11)")),
            rx.cond(
                LoginState.no_accounts & ~LoginState.first_run,
                rx.text("No account exists yet. On the server, run: ", rx.code(FIRST_ACCOUNT_HINT), id="login-hint", size="2"),
            ),
            spacing="4",
            width="min(360px, 90vw)",
        ),
        min_height="80vh",
    )
