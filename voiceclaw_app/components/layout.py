"""Page frame: navigation bar (with log out) and a content column."""

import reflex as rx


def nav_link(label: str, href: str) -> rx.Component:
    return rx.link(label, href=href, id=f"nav-{label.lower()}", padding_x="0.6em")


def page(*children: rx.Component, title: str) -> rx.Component:
    return rx.box(
        rx.hstack(
            rx.heading("VoiceClaw", size="5"),
            rx.spacer(),
            nav_link("Talk", "/"),
            nav_link("History", "/history"),
            nav_link("Settings", "/settings"),
            # a plain form post: the route ends the session and clears the HttpOnly cookie
            rx.el.form(
                rx.el.button("Log out", type="submit", id="logout-button", class_name="vc-logout"),
                action="/auth/logout",
                method="post",
                id="logout-form",
                # Reflex's form prevents the native post; the route needs one (see pages/login.py)
                on_submit=rx.call_script("document.getElementById('logout-form').submit()"),
                style={"display": "inline", "margin": 0},
            ),
            align="center",
            width="100%",
            padding_y="0.6em",
            border_bottom="1px solid var(--gray-5)",
        ),
        rx.heading(title, size="4", margin_top="0.8em", margin_bottom="0.4em", class_name="sr-only") if False else rx.fragment(),
        *children,
        max_width="900px",
        margin="0 auto",
        padding="0 1em 3em",
    )
