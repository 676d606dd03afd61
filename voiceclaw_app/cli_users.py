"""``python -m voiceclaw_app.cli user ...``: accounts from the command line.

``user add NAME [--admin] --password-stdin``, ``user list``, ``user passwd NAME
--password-stdin``, ``user remove NAME``; without ``--password-stdin`` the password
is asked for twice on the terminal (never as an argument: it would show in ``ps``
and the shell history). ``serve-check HOST`` is what ``make run`` calls before
starting: it refuses a non-loopback address with no account, and warns without TLS.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from . import accounts


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise accounts.AccountError("The two passwords differ.")
    return first


def _migrated() -> None:
    """The tables exist (``reflex db migrate`` ran): say so plainly rather than a traceback."""
    try:
        accounts.count_users()
    except Exception as exc:
        raise accounts.AccountError(f"The database is not ready ({type(exc).__name__}): run `make setup` (or `reflex db migrate`) first.") from None


def cmd_user(args: argparse.Namespace) -> int:
    try:
        _migrated()
        if args.user_command == "add":
            first = not accounts.has_users()
            account = accounts.add_user(args.name, _password(args), admin=args.admin)
            role = "admin" if account.is_admin else "user"
            note = " (the first account is always an admin)" if first and not args.admin else ""
            print(f"created {role} {account.name!r}{note}")
        elif args.user_command == "list":
            users = accounts.list_users()
            if not users:
                print("no accounts yet: python -m voiceclaw_app.cli user add NAME --admin --password-stdin")
            for u in users:
                print(f"{u.name}\t{'admin' if u.is_admin else 'user'}\t{accounts.conversation_count(u.id)} conversation(s)")
        elif args.user_command == "passwd":
            account = accounts.set_password(args.name, _password(args))
            print(f"password changed for {account.name!r}; their login sessions ended")
        elif args.user_command == "remove":
            from .states.services import audio_store

            account, audio = accounts.remove_user(args.name)
            audio_store().delete(audio)
            print(f"removed {account.name!r} with their conversations and {len(audio)} audio file(s)")
        return 0
    except accounts.AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_serve_check(args: argparse.Namespace) -> int:
    from .server.auth import exposure_problem, exposure_warning

    problem = exposure_problem(args.host)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    warning = exposure_warning(args.host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("user", help="manage accounts (add, list, passwd, remove)")
    us = p.add_subparsers(dest="user_command", required=True)
    q = us.add_parser("add", help="create an account")
    q.add_argument("name")
    q.add_argument("--admin", action="store_true", help="may edit provider settings and keys")
    q.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    us.add_parser("list", help="list accounts")
    q = us.add_parser("passwd", help="change a password (ends that user's sessions)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    q = us.add_parser("remove", help="delete an account with its conversations and audio")
    q.add_argument("name")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("serve-check", help="refuse to serve beyond loopback with no account (make run)")
    p.add_argument("host")
    p.set_defaults(func=cmd_serve_check)
