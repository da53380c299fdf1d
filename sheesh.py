#!/usr/bin/env python3
"""sheesh: a one-file SMTP server that keeps every message it is sent.

    python3 sheesh.py                listen on 127.0.0.1:1025, store mail in the Maildir ./mail
    python3 sheesh.py --help         every option, with its default
    mutt -f mail                     read what arrived (or mailbox.Maildir("mail") from Python)

sheesh is the successor to ``python -m smtpd -n -c DebuggingServer``, which Python 3.12
removed: a local SMTP sink for programs that send mail, and for their test suites. It is one
file and uses only the standard library of Python 3.11 or later, on Linux, macOS and Windows.

It speaks SMTP as RFC 5321 describes it, with the extensions that clients look for:
SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING (RFC 2920), SMTPUTF8 (RFC 6531),
ENHANCEDSTATUSCODES (RFC 2034, codes from RFC 3463), AUTH (RFC 4954), STARTTLS (RFC 3207),
CHUNKING and BINARYMIME (RFC 3030) and DSN (RFC 3461, recorded, never sent), and implicit TLS
on a second port (RFC 8314). The mail it keeps can be read in a web inbox, with a JSON API,
over POP3 (RFC 1939) and over IMAP (RFC 3501).

A reading guide, for those who come from the blog post that built the same server in Gleam:

    the post                          sheesh.py
    glisten's handler and loop        ConnectionHandler.converse(), the connection's loop (7)
    process_lines                     Session.receive(): bytes in, a Turn of replies out (4)
    the SmtpCommand type, parse       the command classes and parse_command() (3)
    handle_line                       Session.handle_line(), one match on the command (4)
    handle_data_line                  DataReader and Session.handle_data() (5)
    the session's states              State, and the diagram above the Session (4)
    "where DO they go?"               MaildirWriter.commit(): on disk, then 250 (6)

The file reads top to bottom, the way one message travels through it. Part I is the server
of the post and uses nothing defined after it; Part II is what a dev sink also needs; Part
III is the web inbox's page.

  Part I    1. Limits       the numbers that bound every read, and where they come from
            2. Replies      every SMTP reply, in one table; the Turn a session answers with
            3. Commands     one small class per verb, and parse_command()
            4. The session  the SMTP state machine: bytes in, replies out; no sockets, files
                            or clocks
            5. Reading      lines, octets, and where a message in DATA ends (dot-stuffing)
            6. The store    a Maildir: written in tmp/, renamed into new/
            7. The handler  the only code that reads from or writes to a connection
            8. The listener threads, the connection limits, a clean stop
  Part II   9. AUTH and TLS
           10. Faults       failures injected on purpose, so apps can test their retries
           11. Transcripts  what each session said, for the developer
           12. The index    reading messages back; the index every reader shares; search;
                            message checks
           13. The server   Config and the in-process Server
           14. The web inbox a JSON API and a page, with http.server
           15. Forwarding   relay, webhooks, and the sendmail entry point
           16. POP3         the same mail, for mail clients (RFC 1939)
           17. IMAP         the same mail, live, for mail clients (RFC 3501)
           18. The CLI      main()
           19. Speed        where it comes from, measured
  Part III 20. The page     the web inbox's HTML, CSS and JavaScript
"""

from __future__ import annotations

import argparse
import array
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import datetime
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import enum
import errno
import fnmatch
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import ipaddress
import json
import itertools
import logging
import math
import mmap
import os
import random
import re
import secrets
import select
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import typing
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from html import unescape as html_unescape
from pathlib import Path

try:
    import ssl
except ImportError:  # Python built without OpenSSL: everything but TLS still works
    ssl = None

try:
    import sqlite3
except ImportError:  # Python built without SQLite: the index is kept in memory instead
    sqlite3 = None

__version__ = "0.1.0"

log = logging.getLogger("sheesh")


# =============================================================================================
# PART I. THE SERVER FROM THE POST
#
# The SMTP sink of the blog post, as sheesh writes it: the replies a dialogue uses, the
# commands, the session (a pure state machine), the reading of what the client sends (DATA
# right after the session that calls it), the Maildir it stores into, and the handler and
# listener that carry bytes between a socket and a session. Nothing here uses a name that
# Part II defines: a reader who stops at the end of Part I has a working SMTP server in mind.
# =============================================================================================


# ---------------------------------------------------------------------------------------------
# 1. Limits
#
# Every read sheesh makes is bounded, so that a client can only ever cost the server a known
# amount of memory and time. Each number says where it comes from.
# ---------------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"  # loopback: a sink accepts mail from anyone who can reach it
DEFAULT_PORT = 1025  # the unprivileged port that Mailpit, MailHog and smtpd's examples use
DEFAULT_MAILDIR = "mail"  # as the Gleam server that sheesh follows

# 50 MiB: the default that Mailpit and MailDev settled on. Advertised as SIZE (RFC 1870).
DEFAULT_MAX_SIZE = 50 * 1024 * 1024

# RFC 5321 section 4.5.3.1.8: a server must be able to take at least 100 recipients.
DEFAULT_MAX_RECIPIENTS = 100

# RFC 5321 section 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
DEFAULT_TIMEOUT = 300.0

# As Postfix's smtp-sink. One more connection than this is told 421 and closed at once.
DEFAULT_MAX_CONNECTIONS = 256

# From one client address, on all ports together: so that one peer cannot hold every slot.
# Loopback peers are not held to it (as Postfix exempts $mynetworks): on a dev box every
# client is 127.0.0.1, and a test suite of 200 sessions must not be refused. They still
# count against DEFAULT_MAX_CONNECTIONS.
DEFAULT_MAX_CONNECTIONS_PER_IP = 100

# RFC 5321 section 4.5.3.1.4 allows a command line of 512 octets, and section 4.5.3.1.2 lets each
# extension lengthen it: SIZE= adds 26 (RFC 1870), AUTH= adds 500 (RFC 4954), and an SMTPUTF8 path
# of 256 characters may take 1,024 octets of UTF-8 (RFC 6531). 4 KiB holds all of those at once,
# and an AUTH PLAIN initial response with long credentials, and is still a trivial cost per client.
COMMAND_LINE_LIMIT = 4096

# RFC 4954 section 4 leaves it to the server how to slow down password guessing: each failed
# AUTH waits this long before its 535, and the third wrong password in a session ends it (the
# same wrong password over several mechanisms is one: see Login.refused).
AUTH_FAILURE_DELAY = 1.0
MAX_AUTH_FAILURES = 3

# aiosmtpd closes a session after 20 unrecognised commands: a client that sends more is not
# speaking SMTP (it may be an HTTP client, or an attack that smuggles HTTP through SMTP).
MAX_UNKNOWN_COMMANDS = 20
REFUSAL_LOG_INTERVAL = 60.0  # an address refused again and again is logged once a minute

# How much one read from a connection may return. Bodies are handled a buffer at a time, so this
# is also about the most memory that one message in DATA costs, whatever its size. Each read
# allocates this much before it shrinks to what arrived: 256 KiB made small messages 40% slower
# (measured with the benchmark kit), 64 KiB costs 5% against 8 KiB and keeps big ones fast.
READ_SIZE = 64 * 1024

# On SIGTERM or Ctrl-C, messages already in DATA get this long to finish before they are dropped.
SHUTDOWN_GRACE = 5.0


# ---------------------------------------------------------------------------------------------
# 2. Replies
#
# An SMTP reply is a three-digit code and text (RFC 5321 section 4.2). A reply of several lines
# repeats the code on each, with a hyphen after all but the last: "250-first", "250 last".
# The first digit says how it went: 2 done, 3 go on, 4 failed for now, 5 failed for good.
# Most replies also carry an enhanced status code such as 2.1.0 (RFC 2034, RFC 3463), which
# RFC 2034 leaves out of the greeting, the HELO/EHLO reply and the 354 that starts DATA.
#
# A session answers each input with a Turn: the replies, and what else the handler must do.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code and one or more lines of text."""

    code: int
    lines: tuple[str, ...]

    def __bytes__(self) -> bytes:
        return self.wire

    @functools.cached_property
    def wire(self) -> bytes:
        """The reply as sent, made once: most replies are constants sent again and again."""
        *first, last = self.lines
        text = "".join(f"{self.code}-{line}\r\n" for line in first) + f"{self.code} {last}\r\n"
        return text.encode("utf-8")

    @property
    def refusal(self) -> bool:
        return self.code >= 400

    @functools.cached_property
    def shown(self) -> tuple[str, ...]:
        return tuple(self.wire.decode("utf-8", "replace").splitlines())

    def transcript_lines(self) -> tuple[str, ...]:
        return self.shown  # made once: most replies are constants


def smtp_reply(code: int, *lines: str) -> Reply:
    return Reply(code, lines)


OK = smtp_reply(250, "2.0.0 Ok")
SENDER_OK = smtp_reply(250, "2.1.0 Ok")
RECIPIENT_OK = smtp_reply(250, "2.1.5 Ok")
START_DATA = smtp_reply(354, "End data with <CR><LF>.<CR><LF>")
BYE = smtp_reply(221, "2.0.0 Bye")
CANNOT_VRFY = smtp_reply(252, "2.5.0 Cannot verify the user, but will accept mail for it")
HELP = smtp_reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT AUTH",
             "2.0.0 See RFC 5321 for what each one does")
AUTH_OK = smtp_reply(235, "2.7.0 Authentication successful")
AUTH_USERNAME = smtp_reply(334, "VXNlcm5hbWU6")  # base64 of "Username:" (the LOGIN mechanism)
AUTH_PASSWORD = smtp_reply(334, "UGFzc3dvcmQ6")  # base64 of "Password:"
AUTH_GO_ON = smtp_reply(334, "")  # PLAIN without an initial response: an empty challenge
READY_FOR_TLS = smtp_reply(220, "2.0.0 Ready to start TLS")

UNKNOWN_COMMAND = smtp_reply(500, "5.5.2 Error: command not recognized")
LINE_TOO_LONG = smtp_reply(500, "5.5.2 Error: line too long")  # RFC 5321 section 4.5.3.1.4
NOT_IMPLEMENTED = smtp_reply(502, "5.5.1 Error: command not implemented")
NEED_HELO = smtp_reply(503, "5.5.1 Error: send HELO or EHLO first")
NEED_EHLO = smtp_reply(503, "5.5.1 Error: send EHLO first")
NESTED_MAIL = smtp_reply(503, "5.5.1 Error: nested MAIL command")
NEED_MAIL = smtp_reply(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = smtp_reply(503, "5.5.1 Error: need RCPT command")
MIXED_WITH_BDAT = smtp_reply(503, "5.5.1 Error: BDAT and DATA or RCPT cannot be mixed in one "
                        "transaction")  # RFC 3030 section 2
BINARYMIME_NEEDS_BDAT = smtp_reply(503, "5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA")
ALREADY_AUTHENTICATED = smtp_reply(503, "5.5.1 Error: already authenticated")
TLS_ALREADY_ACTIVE = smtp_reply(503, "5.5.1 Error: TLS already active")
NEED_TLS = smtp_reply(530, "5.7.0 Must issue a STARTTLS command first")  # RFC 3207 section 4
NEED_AUTH = smtp_reply(530, "5.7.0 Authentication required")  # RFC 4954 section 6
NEED_TLS_FOR_AUTH = smtp_reply(538, "5.7.11 Encryption required for requested authentication "
                          "mechanism")
AUTH_IN_TRANSACTION = smtp_reply(503, "5.5.1 Error: AUTH not allowed during a mail transaction")
UNKNOWN_MECHANISM = smtp_reply(504, "5.5.4 Error: unrecognized authentication type")
AUTH_CANCELLED = smtp_reply(501, "5.0.0 Authentication cancelled")
BAD_BASE64 = smtp_reply(501, "5.5.2 Error: cannot decode the response")
BAD_CREDENTIALS = smtp_reply(535, "5.7.8 Error: authentication credentials invalid")
BAD_SENDER = smtp_reply(501, "5.1.7 Error: bad sender address syntax")
BAD_RECIPIENT = smtp_reply(501, "5.1.3 Error: bad recipient address syntax")
# RFC 6531 section 3.4: an address beyond ASCII only in a transaction that MAIL opened with
# SMTPUTF8; 553 with 5.6.7 (RFC 6533 section 3) otherwise.
NEEDS_SMTPUTF8 = smtp_reply(553, "5.6.7 Error: an address beyond ASCII needs MAIL FROM with "
                            "SMTPUTF8")
UNKNOWN_PARAMETER = smtp_reply(555, "5.5.4 Error: MAIL FROM/RCPT TO parameter not recognized")
TOO_MANY_RECIPIENTS = smtp_reply(452, "4.5.3 Error: too many recipients")  # RFC 5321 4.5.3.1.10
MESSAGE_TOO_BIG = smtp_reply(552, "5.3.4 Error: message exceeds the fixed maximum message size")
STORAGE_FULL = smtp_reply(452, "4.3.1 Error: insufficient system storage")
STORAGE_FAILED = smtp_reply(451, "4.3.0 Error: local error in processing, try again later")
TOO_MANY_UNKNOWN = smtp_reply(421, "4.7.0 Error: too many unrecognized commands, goodbye")
TOO_MANY_AUTH_FAILURES = smtp_reply(421, "4.7.0 Error: too many failed authentications, goodbye")
# RFC 4954 section 6: 454 is a temporary failure of authentication
TOO_MANY_LOGIN_FAILURES = smtp_reply(454, "4.7.0 Error: too many failed logins from your address, "
                                "try again later")
TLS_ON_PLAIN_PORT = smtp_reply(421, "4.7.0 Error: this port speaks plain SMTP first, use STARTTLS")
# Not a reply: what an injected "disconnect" fault answers, inside the session only; the Turn
# it makes has hang_up set and no reply for it.
NO_REPLY = Reply(0, ("(the connection is closed without a reply)",))
TOO_MANY_CONNECTIONS = smtp_reply(421, "4.7.0 Error: too many connections, try again later")
CROWDED = smtp_reply(421, "4.7.0 Error: too many connections from your address, try again later")
TIMEOUT = smtp_reply(421, "4.4.2 Error: timeout exceeded, goodbye")
SHUTTING_DOWN = smtp_reply(421, "4.3.2 Service shutting down, goodbye")
INTERNAL_ERROR = smtp_reply(421, "4.3.0 Error: internal server error, goodbye")


class Turn(list):
    """What a session asks of its handler after each input (greeting(), receive(), tick()):
    the replies to send, in order, which a Turn is, and everything else the handler must do,
    as h11's events say it, so that the handler never looks inside a session:

        wait       seconds to wait before sending the replies (a failed login, an injected
                   delay): only this client waits
        log        (level, what, text) lines for the log and the transcript: a refusal, an
                   injected fault, why the session closed
        start_tls  once the replies are sent, run the TLS handshake (STARTTLS was accepted)
        hang_up    once the replies are sent, close the connection
    """

    def __init__(self) -> None:
        self.wait = 0.0
        self.log: list[tuple[int, str, str]] = []
        self.start_tls = False
        self.hang_up = False


class TakesTurns:
    """What every session (SMTP, POP3, IMAP) does to answer in Turns: it gathers in
    self._turn what it asks of the handler while it works, and hands it over with its
    replies. A session also says, when asked: closed, busy (a command or message under way:
    the whole of it must come within one timeout) and in_data (a message under way: a
    stopping server lets it finish)."""

    _turn: Turn

    @property
    def idle_limit(self) -> float | None:
        """Seconds the client may stay silent, if less than the listener's timeout (IMAP's
        before a login); None: the listener's."""
        return None

    def hand_over(self, replies: list) -> Turn:
        """The turn made of these replies and what was asked meanwhile (see Turn)."""
        turn, self._turn = self._turn, Turn()
        turn.hang_up = self.closed
        # NO_REPLY, an injected disconnect, comes only with the session closed, and is not sent.
        turn.extend([r for r in replies if r is not NO_REPLY] if turn.hang_up else replies)
        return turn

    def note(self, level: int, what: str, text: str) -> None:
        """A line for the log and the transcript: what happened and why."""
        self._turn.log.append((level, what, text))


def usage(syntax: str) -> Reply:
    """501 with the command's syntax, as smtpd did: the client learns what was expected."""
    return smtp_reply(501, f"5.5.4 Syntax: {syntax}")


def greeting(hostname: str) -> Reply:
    return smtp_reply(220, f"{hostname} ESMTP sheesh")


def queued(queue_id: str) -> Reply:
    return smtp_reply(250, f"2.0.0 Ok: queued as {queue_id}")


# ---------------------------------------------------------------------------------------------
# 3. Commands
#
# A command line is a verb, a space and an argument: "MAIL FROM:<alice@example.com> SIZE=1234".
# Verbs are case-insensitive (RFC 5321 section 2.4). parse_command() turns a line into one of the
# small classes below and checks its syntax, so the session only ever sees well-formed commands;
# a malformed one becomes Invalid, carrying the reply (501 with the usage, or 555).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helo:
    client_name: str


@dataclass(frozen=True)
class Ehlo:
    client_name: str


@dataclass(frozen=True)
class Mail:
    sender: str  # the reverse-path; "" is the null sender <> used by bounces
    size: int | None = None  # SIZE=, what the client says the message will weigh (RFC 1870)
    body: str = "7BIT"  # BODY=7BIT, 8BITMIME (RFC 6152) or BINARYMIME (RFC 3030)
    smtputf8: bool = False  # SMTPUTF8 (RFC 6531)
    has_parameters: bool = False
    ret: str | None = None  # DSN (RFC 3461): RET=FULL or HDRS, what a notice should carry
    envid: str | None = None  # and ENVID=, the sender's name for the transaction (xtext)


@dataclass(frozen=True)
class Rcpt:
    recipient: str  # a forward-path
    notify: tuple[str, ...] = ()  # DSN: NOTIFY=NEVER, or SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # DSN: ORCPT=addr-type;xtext, the original recipient


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Bdat:
    """BDAT size [LAST] (RFC 3030): exactly `size` octets of message follow the line."""

    size: int
    last: bool


@dataclass(frozen=True)
class Rset:
    pass


@dataclass(frozen=True)
class Noop:
    pass


@dataclass(frozen=True)
class Vrfy:
    pass


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Auth:
    mechanism: str
    initial_response: str | None  # RFC 4954 section 4: the first response may come with AUTH


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class NotImplemented_:
    verb: str


@dataclass(frozen=True)
class Unknown:
    verb: str


@dataclass(frozen=True)
class Invalid:
    reply: Reply


Command = (Helo | Ehlo | Mail | Rcpt | Data | Bdat | Rset | Noop | Vrfy | Help | Quit | Auth
           | StartTls | NotImplemented_ | Unknown | Invalid)

MAIL_USAGE = usage("MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] "
                   "[AUTH=x] [RET=FULL|HDRS] [ENVID=xtext]")
RCPT_USAGE = usage("RCPT TO:<address> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] "
                   "[ORCPT=addr-type;xtext]")
BDAT_USAGE = usage("BDAT size [LAST]")


def whole_number(text: str, digits: int = 15) -> int | None:
    """A number a client sent, read strictly: ASCII digits only, at most `digits` of them.
    str.isdigit() also takes "²" and "٣", which int() refuses or reads; a number of forty
    digits is nobody's message size. None when the text is not such a number."""
    text = text.strip()
    if 0 < len(text) <= digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse_command(line: str) -> Command:
    """Turn one command line (without its CRLF) into a command."""
    verb, _, argument = line.partition(" ")
    argument = argument.strip(" ")
    match verb.upper():
        case "HELO":
            return Helo(argument) if argument else Invalid(usage("HELO hostname"))
        case "EHLO":
            return Ehlo(argument) if argument else Invalid(usage("EHLO hostname"))
        case "MAIL":
            return parse_mail(argument)
        case "RCPT":
            return parse_rcpt(argument)
        case "DATA":
            return Invalid(usage("DATA")) if argument else Data()
        case "BDAT":
            size, _, last = argument.partition(" ")
            if whole_number(size, 20) is None or last.strip(" ").upper() not in ("", "LAST"):
                return Invalid(BDAT_USAGE)
            return Bdat(whole_number(size, 20), bool(last.strip(" ")))
        case "RSET":
            return Invalid(usage("RSET")) if argument else Rset()
        case "NOOP":
            return Noop()  # RFC 5321 section 4.1.1.9: an argument is allowed and ignored
        case "VRFY":
            return Vrfy() if argument else Invalid(usage("VRFY address"))
        case "HELP":
            return Help()
        case "QUIT":
            return Invalid(usage("QUIT")) if argument else Quit()
        case "AUTH":
            return parse_auth(argument)
        case "STARTTLS":
            return Invalid(usage("STARTTLS")) if argument else StartTls()
        case "EXPN" | "TURN" | "ETRN":
            return NotImplemented_(verb.upper())
        case _:
            return Unknown(verb)


def parse_mail(argument: str) -> Mail | Invalid:
    """MAIL FROM:<reverse-path> [parameters] (RFC 5321 section 4.1.1.2)."""
    if argument[:5].upper() != "FROM:":
        return Invalid(MAIL_USAGE)
    parsed = parse_path(argument[5:])
    if parsed is None:
        return Invalid(MAIL_USAGE)
    sender, parameters = parsed
    if (problem := address_problem(sender, sender=True)) is not None:
        return Invalid(problem)
    if not parameters:
        return Mail(sender)
    if len({keyword for keyword, _ in parameters}) < len(parameters):
        return Invalid(usage_with("a parameter is given twice", MAIL_USAGE))
    size, body, smtputf8, ret, envid = None, "7BIT", False, None, None
    for keyword, value in parameters:
        match keyword, value:
            case "SIZE", str() if whole_number(value, 100) is not None:  # any size: too big
                size = whole_number(value, 100)  # is 552, not a syntax error (test suites try)
            case "BODY", str() if value.upper() in ("7BIT", "8BITMIME", "BINARYMIME"):
                body = value.upper()
            case "SMTPUTF8", None:
                smtputf8 = True
            case "AUTH", str():
                pass  # RFC 4954 section 5: the submitter's identity; senders commonly send AUTH=<>
            case "RET", str() if value.upper() in ("FULL", "HDRS"):  # RFC 3461 section 4.3
                ret = value.upper()
            case "ENVID", str() if is_xtext(value) and len(value) <= 100:  # 4.4: 100 at most
                envid = value
            case ("SIZE" | "BODY" | "SMTPUTF8" | "AUTH" | "RET" | "ENVID"), _:
                return Invalid(MAIL_USAGE)
            case _:
                return Invalid(UNKNOWN_PARAMETER)
    return Mail(sender, size, body, smtputf8, has_parameters=True, ret=ret, envid=envid)


def parse_rcpt(argument: str) -> Rcpt | Invalid:
    """RCPT TO:<forward-path> (RFC 5321 section 4.1.1.3). sheesh knows no RCPT parameters."""
    if argument[:3].upper() != "TO:":
        return Invalid(RCPT_USAGE)
    parsed = parse_path(argument[3:])
    if parsed is None:
        return Invalid(RCPT_USAGE)
    recipient, parameters = parsed
    if (problem := address_problem(recipient, sender=False)) is not None:
        return Invalid(problem)
    if len({keyword for keyword, _ in parameters}) < len(parameters):
        return Invalid(usage_with("a parameter is given twice", RCPT_USAGE))
    notify, orcpt = (), None
    for keyword, value in parameters:
        match keyword, value:
            case "NOTIFY", str():  # RFC 3461 section 4.1: NEVER, or a list of the others
                notify = tuple(word.upper() for word in value.split(","))
                if not notify_valid(notify):
                    return Invalid(usage_with("NOTIFY takes NEVER, or SUCCESS, FAILURE and "
                                              "DELAY separated by commas", RCPT_USAGE))
            case "ORCPT", str() if orcpt_valid(value):  # section 4.2: addr-type ";" xtext
                orcpt = value
            case "ORCPT", _:
                return Invalid(usage_with("ORCPT takes addr-type;xtext, as rfc822;user%2Bx@y",
                                          RCPT_USAGE))
            case _:
                return Invalid(UNKNOWN_PARAMETER)
    return Rcpt(recipient, notify, orcpt)


def is_xtext(text: str) -> bool:
    """RFC 3461 section 4: xtext, printable ASCII in which "+" and "=" are written +2B, +3D."""
    return re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*", text) is not None


def notify_valid(words: tuple[str, ...]) -> bool:
    if words == ("NEVER",):
        return True
    return bool(words) and len(set(words)) == len(words) and set(words) <= {
        "SUCCESS", "FAILURE", "DELAY"}


def orcpt_valid(value: str) -> bool:
    kind, semicolon, address = value.partition(";")
    return (bool(semicolon) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", kind) is not None
            and bool(address) and is_xtext(address) and len(value) <= 500)


def usage_with(problem: str, syntax: Reply) -> Reply:
    """A 501 that says what was wrong, then the syntax."""
    return smtp_reply(501, f"5.5.4 Error: {problem}", *syntax.lines)


def parse_path(text: str) -> tuple[str, list[tuple[str, str | None]]] | None:
    """Split "<address> KEY=VALUE ..." into the address and its parameters, or None.

    The address may come in angle brackets, as RFC 5321 requires, or bare, as many clients
    send it. A source route ("<@relay:user@host>") is accepted and ignored (RFC 5321 section
    4.1.2 and appendix C). A quoted local part may hold spaces and ">" ("john doe"@x).
    """
    text = text.lstrip(" ")  # "MAIL FROM: <a@b>" is wrong but common
    if text.startswith("<"):
        end = path_end(text)
        if end < 0:
            return None
        address, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            return None
    else:
        address, _, rest = text.partition(" ")
        if not address:
            return None  # only "<>" is the null sender
    route, colon, after_route = address.partition(":")
    if address.startswith("@") and colon and all(  # A-d-l ":" Mailbox
            AT_DOMAIN.fullmatch(hop) for hop in route.split(",")):
        address = after_route  # (anything else that starts with "@" fails as a Mailbox)
    parameters = []
    for word in rest.split():
        keyword, equals, value = word.partition("=")
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") (RFC 5321 section 4.1.2)
        if not (keyword.isascii() and keyword.replace("-", "").isalnum() and keyword[0] != "-"):
            return None
        parameters.append((keyword.upper(), value if equals else None))
    return address, parameters


def path_end(text: str) -> int:
    """Where the ">" that closes a path is, passing over quoted strings; if a stray quote
    hides every ">", the first one (the address will then fail as a Mailbox); -1 if none."""
    if '"' not in text:
        return text.find(">")  # nothing quoted: the first ">" it is
    quoted = escaped = False
    for at, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return at
    return text.find(">")


# The grammar of an address, with RFC 5321 section 4.1.2's names, and RFC 6531's additions for
# SMTPUTF8: atext, qtext and sub-domains may hold any character above ASCII (UTF8-non-ascii;
# never a lone surrogate, which is how a byte that was not UTF-8 arrives here).
_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"
ATEXT = f"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\\-{_NON_ASCII}]"
DOT_STRING = f"{ATEXT}+(?:\\.{ATEXT}+)*"
QUOTED_STRING = f'"(?:[ !#-\\[\\]-~{_NON_ASCII}]|\\\\[ -~])*"'  # qtextSMTP / quoted-pairSMTP
LOCAL_PART = f"(?:{DOT_STRING}|{QUOTED_STRING})"
LET_DIG = f"[A-Za-z0-9{_NON_ASCII}]"
SUB_DOMAIN = f"{LET_DIG}(?:[A-Za-z0-9\\-{_NON_ASCII}]*{LET_DIG})?"  # Let-dig [Ldh-str]
DOMAIN = f"{SUB_DOMAIN}(?:\\.{SUB_DOMAIN})*"
ADDRESS_LITERAL = r"\[[^\[\]\\]*\]"  # its inside is checked by address_literal_valid()
MAILBOX = re.compile(f"({LOCAL_PART})@({DOMAIN}|{ADDRESS_LITERAL})")
AT_DOMAIN = re.compile(f"@{DOMAIN}")


def address_literal_valid(inside: str) -> bool:
    """The inside of [...]: an IPv4 address, "IPv6:" and an IPv6 address, or a General-address-
    literal (a tag, a colon, and dcontent: printable ASCII but [ \\ ])."""
    try:
        if inside[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inside[5:])
            return True
        if re.fullmatch(r"[0-9.]+", inside):
            ipaddress.IPv4Address(inside)
            return True
    except ValueError:
        return False
    return re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]:[!-Z^-~]+", inside) is not None


# RFC 5321 section 4.5.3.1: a local part of at most 64 octets, a domain of 255, a path (with
# its angle brackets) of 256. With SMTPUTF8 (RFC 6531) the limits stay, and stay in octets:
# sheesh counts the UTF-8 bytes, as a relay's buffers would, so a path of 256 ASCII
# characters passes and one of 100 Chinese characters (300 octets) does not.
PATH_LIMITS = (("local part", 64, "4.5.3.1.1"), ("domain", 255, "4.5.3.1.2"),
               ("path", 256, "4.5.3.1.3"))


def address_problem(address: str, *, sender: bool) -> Reply | None:
    """What is wrong with an address, as RFC 5321 section 4.1.2 writes it, or None. The null
    sender <> is a sender only; Postmaster without a domain, a recipient only (4.1.1.3)."""
    refused = BAD_SENDER if sender else BAD_RECIPIENT
    if not address:
        return None if sender else refused
    if not sender and address.lower() == "postmaster":
        return None
    found = MAILBOX.fullmatch(address)
    if found is None or found.group(2).startswith("[") and not address_literal_valid(
            found.group(2)[1:-1]):
        return refused
    if len(address) <= 62 and address.isascii():
        return None  # 64 octets with its brackets: within the smallest limit below
    code = "5.1.7" if sender else "5.1.3"
    for (name, limit, section), part in zip(PATH_LIMITS, (*found.groups(), f"<{address}>")):
        if len(part.encode("utf-8")) > limit:
            return smtp_reply(501, f"{code} Error: the {name} is longer than {limit} octets "
                              f"(RFC 5321 section {section})")
    return None


def is_valid_address(address: str, *, null_allowed: bool) -> bool:
    """Whether an address is one a message may be sent to (or from, with null_allowed)."""
    return address_problem(address, sender=null_allowed) is None


def parse_auth(argument: str) -> Auth | Invalid:
    """AUTH mechanism [initial-response] (RFC 4954 section 4)."""
    mechanism, _, initial = argument.partition(" ")
    if not mechanism or " " in initial.strip(" "):
        return Invalid(usage("AUTH mechanism [initial-response]"))
    return Auth(mechanism.upper(), initial.strip(" ") or None)


# ---------------------------------------------------------------------------------------------
# 4. The session
#
# One SMTP conversation, as a state machine that takes the client's bytes and returns the
# replies to send (the "sans-IO" style of h11): it never touches a socket, a file or a clock,
# so the tests drive it directly and read like SMTP transcripts.
#
#   CONNECTED --HELO/EHLO--> GREETED --MAIL--> MAIL --RCPT--> RCPT --DATA--> DATA
#       ^                     |    ^                            |            |
#       |           AUTH <----+    |                            +--BDAT--> CHUNKS
#       |      (334 challenges,    +---- the final dot, BDAT LAST, RSET -----+
#       |       until 235 or 535)
#       +-- STARTTLS comes back here (the client must say EHLO again)
#
#   state      what it accepts, beyond NOOP, RSET, VRFY, HELP and QUIT, which any state takes
#   CONNECTED  HELO, EHLO
#   GREETED    MAIL, AUTH, STARTTLS, HELO/EHLO again
#   MAIL       RCPT, STARTTLS, HELO/EHLO (which start over)
#   RCPT       RCPT, DATA, BDAT, STARTTLS, HELO/EHLO
#   DATA       the message, until CRLF . CRLF
#   CHUNKS     BDAT, until BDAT n LAST; DATA and RCPT are 503 (RFC 3030 section 2)
#   AUTH       one line of base64 (or "*" to give up), then back to GREETED
#
# A command out of its state gets 503 (RFC 5321 section 4.3.2).
#
# Delivery is handed in as a store with one method, begin(envelope), which returns a writer
# with write(bytes), commit() -> queue id, and abort(). The store may raise OSError at any
# step (a full disk, a vanished folder): the client then hears 451 or 452. What Part II adds
# (AUTH's Login, injected faults, the transcript) is lent to the session, never named here.
# ---------------------------------------------------------------------------------------------


class State(enum.Enum):
    CONNECTED = "waiting for HELO or EHLO"
    GREETED = "ready for MAIL"
    MAIL = "have the sender, waiting for RCPT"
    RCPT = "have recipients, waiting for more RCPT or DATA"
    DATA = "reading the message"
    CHUNKS = "have chunks of the message (BDAT), waiting for more"
    AUTH = "in the middle of AUTH"
    CLOSED = "closed"


@dataclass(slots=True)
class Envelope:
    """One mail transaction (RFC 5321 section 3.3): who the message is from, who it is for."""

    sender: str = ""  # the reverse-path; "" for the null sender <>
    recipients: list[str] = field(default_factory=list)  # the forward-paths
    body: str = "7BIT"
    smtputf8: bool = False
    # What the trace headers record (RFC 5321 section 4.4), filled in when DATA begins:
    client_name: str = ""  # what the client said in HELO or EHLO
    peer: str = ""  # the client's IP address
    protocol: str = "SMTP"  # SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848); UTF8SMTP... (6531)
    auth_user: str | None = None
    tls: str | None = None  # the TLS version and cipher, when the session used TLS
    # What the client asked of delivery status notifications (RFC 3461); sheesh sends none,
    # but records them, so that a test can see its app asked:
    dsn_ret: str | None = None  # RET=FULL or HDRS
    dsn_envid: str | None = None  # ENVID=
    dsn_recipients: dict[str, tuple[tuple[str, ...], str | None]] = field(
        default_factory=dict)  # recipient -> (NOTIFY words, ORCPT)


@dataclass(frozen=True)
class Policy:
    """What a session allows and requires; the CLI's Config carries it from the command line."""

    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    tls_available: bool = False  # offer STARTTLS (RFC 3207)
    tls_required: bool = False  # no AUTH or MAIL before STARTTLS
    auth_required: bool = False  # no MAIL before AUTH
    users: dict[str, str] | None = None  # user name -> password; None accepts any credentials


@dataclass(slots=True)  # slots: a smaller session, for servers holding many connections
class Session(TakesTurns):
    """The SMTP state machine for one connection. Feed it with receive(); it returns replies."""

    store: object  # anything with begin(envelope) -> writer; see the section's introduction
    hostname: str = "localhost"
    peer: str = ""
    policy: Policy = field(default_factory=Policy)
    state: State = State.CONNECTED
    client_name: str = ""
    extended: bool = False  # EHLO rather than HELO: ESMTP
    auth_user: str | None = None
    tls: str | None = None  # the TLS version and cipher, once STARTTLS has succeeded
    envelope: Envelope = field(default_factory=Envelope)
    unknown_commands: int = 0
    # What Part II lends a session: failures to inject on purpose (a FaultPlan, --fail),
    # AUTH's exchange (a Login: without one, AUTH is not offered) and a Transcript to keep.
    faults: object = None
    login: object = None
    transcript: object = None
    _turn: Turn = field(default_factory=Turn)  # what the handler is to do, so far
    _tls_pending: bool = False  # STARTTLS accepted: what follows it is never read
    _incoming: Incoming = field(default_factory=lambda: Incoming(COMMAND_LINE_LIMIT))
    _data: DataReader | None = None
    _writer: object = None  # the store's writer for the message in DATA
    _message_size: int = 0
    _data_problem: Reply | None = None  # why the message in DATA will not be stored
    _chunk_left: int = 0  # octets of a BDAT chunk still to come
    _chunk_last: bool = False  # ...and whether it is the message's last
    _chunk_refusal: Reply | None = None  # what to answer once a refused chunk has been read

    def greeting(self) -> Turn:
        if (fault := self.inject("connect")) is not None:
            self.state = State.CLOSED  # a refused connection: say why, then close
            return self.hand_over([fault])
        return self.hand_over([greeting(self.hostname)])

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def in_data(self) -> bool:
        return self.state in (State.DATA, State.CHUNKS) or self._chunk_left > 0

    @property
    def busy(self) -> bool:
        """Whether a command line or a message has begun to arrive and not yet ended: a
        message, in DATA or in chunks, must arrive whole within one timeout."""
        return self.in_data or self._incoming.waiting

    def receive(self, data: bytes) -> Turn:
        """Take the bytes the client sent; return the replies they call for, in order, in
        the Turn that says what else the handler must do.

        A client that pipelines (RFC 2920) sends several commands, or a whole message and the
        next transaction, in one write: they are answered one by one, in the order they came.
        """
        incoming = self._incoming
        if self.state is State.CONNECTED and not incoming.waiting and data.startswith(
                b"\x16\x03"):
            return self.hand_over([self.close(TLS_ON_PLAIN_PORT,
                                              "the client spoke TLS to the plain port")])
        incoming.add(data)
        replies = []
        while not self.closed and not self._tls_pending:
            if self.state is State.DATA:
                if not incoming.held or (done := self.handle_data(incoming.rest())) is None:
                    break
                reply, rest = done
                replies.append(reply)
                incoming.add(rest)
                continue
            if self._chunk_left:  # BDAT: so many octets, exactly, whatever they hold
                if not (chunk := incoming.take(self._chunk_left)):
                    break
                reply = self.handle_chunk(chunk)
            elif (line := incoming.line()) is None:
                break
            else:
                reply = self.handle_raw_line(line)
            if reply is not None:  # BDAT answers once its chunk has come
                replies.append(reply)
        if self.closed or self._tls_pending:
            # After STARTTLS, what the client sent before the handshake is dropped, never
            # read as commands: a man in the middle could have put it there (RFC 3207
            # section 4.2, and CVE-2011-0411, "STARTTLS command injection").
            incoming.clear()
        return self.hand_over(replies)

    def handle_raw_line(self, raw: bytes | Overlong) -> Reply:
        """One command line as bytes, without its LF (a CR before the LF is removed here)."""
        if raw is LINE_TOO_LONG_MARK:
            if self.state is State.AUTH:
                self.state = State.GREETED
            if self.transcript is not None:
                self.transcript.client(f"<a line over {COMMAND_LINE_LIMIT:,} octets>")
            return LINE_TOO_LONG
        # surrogateescape keeps bytes that are not UTF-8, so they can be refused, not mangled.
        line = raw.removesuffix(b"\r").decode("utf-8", "surrogateescape")
        if self.transcript is not None:
            self.transcript.client(self.shown(line))
        return self.handle_line(line)

    def shown(self, line: str) -> str:
        """A command line as the transcript shows it: never a secret of AUTH."""
        if self.state is State.AUTH:
            return "****"
        if line[:5].upper() == "AUTH " and len(words := line.split()) > 2:
            return f"{words[0]} {words[1]} ****"
        return line

    def handle_line(self, line: str) -> Reply:
        """One command line: the heart of SMTP."""
        if self.state is State.AUTH:
            return self.login_step(self.login.answer(line))
        match parse_command(line):
            case Helo(name) | Ehlo(name) as hello:
                if (fault := self.inject("ehlo")) is not None:
                    return fault
                return self.hello(name, extended=isinstance(hello, Ehlo))
            case Mail() as mail:
                return self.mail(mail)
            case Rcpt() as rcpt:
                return self.rcpt(rcpt)
            case Data():
                return self.data()
            case Bdat(size, last):
                return self.bdat(size, last)
            case Rset():
                self.reset_transaction()
                return OK
            case Noop():
                return OK
            case Vrfy():
                return CANNOT_VRFY  # RFC 5321 section 3.5.3: 252 when we will not say
            case Help():
                return HELP
            case Quit():
                self.state = State.CLOSED
                return BYE
            case Auth(mechanism, initial_response):
                return self.auth(mechanism, initial_response)
            case StartTls():
                return self.starttls()
            case NotImplemented_():
                return NOT_IMPLEMENTED
            case Invalid(reply):
                return reply
            case Unknown():
                return self.unknown()

    def hello(self, client_name: str, *, extended: bool) -> Reply:
        # RFC 5321 section 4.1.4: a second HELO or EHLO resets the transaction, as RSET does.
        self.reset_transaction()  # a message in chunks (BDAT) included
        self.client_name, self.extended = client_name, extended
        self.state = State.GREETED
        if not extended:
            return smtp_reply(250, self.hostname)
        return smtp_reply(250, self.hostname, *self.extensions())

    def extensions(self) -> list[str]:
        """What EHLO advertises (RFC 5321 section 4.1.1.1), one keyword per line."""
        extensions = ["PIPELINING", f"SIZE {self.policy.max_size}", "8BITMIME", "SMTPUTF8",
                      "ENHANCEDSTATUSCODES", "CHUNKING", "BINARYMIME", "DSN"]
        if self.policy.tls_available and self.tls is None:
            extensions.append("STARTTLS")
        if self.login is not None and (self.tls is not None or not self.policy.tls_required):
            extensions.append("AUTH " + " ".join(self.mechanisms()))  # no passwords in clear
        return extensions + ["HELP"]

    def mechanisms(self) -> list[str]:
        # CRAM-MD5 proves the client knows a password without sending it, so it needs one to
        # compare with: only with --users.
        return ["PLAIN", "LOGIN"] + (["CRAM-MD5"] if self.policy.users is not None else [])

    def mail(self, mail: Mail) -> Reply:
        if self.state is State.CONNECTED:
            return NEED_HELO
        if self.state in (State.MAIL, State.RCPT, State.CHUNKS):
            return NESTED_MAIL
        if self.policy.tls_required and self.tls is None:
            return self.refuse(NEED_TLS, "MAIL before STARTTLS, with --tls-required")
        if self.policy.auth_required and self.auth_user is None:
            return self.refuse(NEED_AUTH, "MAIL before AUTH, with --auth-required")
        if mail.has_parameters and not self.extended:
            return UNKNOWN_PARAMETER  # parameters are ESMTP: a HELO client cannot use them
        if mail.size is not None and mail.size > self.policy.max_size:
            # RFC 1870 section 6.1: refuse it before it is sent
            return self.refuse(MESSAGE_TOO_BIG, f"SIZE={mail.size} is over --max-size "
                                                f"{self.policy.max_size}, from <{mail.sender}>")
        if not mail.smtputf8 and not mail.sender.isascii():
            return self.refuse(NEEDS_SMTPUTF8, f"<{mail.sender}> without SMTPUTF8")
        if (fault := self.inject("mail", mail.sender)) is not None:
            return fault
        self.envelope = Envelope(sender=mail.sender, body=mail.body, smtputf8=mail.smtputf8,
                                 dsn_ret=mail.ret, dsn_envid=mail.envid)
        self.state = State.MAIL
        return SENDER_OK

    def rcpt(self, rcpt: Rcpt) -> Reply:
        if self.state not in (State.MAIL, State.RCPT):
            return NEED_MAIL if self.state is not State.CHUNKS else MIXED_WITH_BDAT
        if (rcpt.notify or rcpt.orcpt) and not self.extended:
            return UNKNOWN_PARAMETER
        if len(self.envelope.recipients) >= self.policy.max_recipients:
            return self.refuse(TOO_MANY_RECIPIENTS, f"<{rcpt.recipient}>: over --max-recipients "
                                                    f"{self.policy.max_recipients}")
        if not self.envelope.smtputf8 and not rcpt.recipient.isascii():
            return self.refuse(NEEDS_SMTPUTF8, f"<{rcpt.recipient}> without SMTPUTF8")
        if (fault := self.inject("rcpt", rcpt.recipient)) is not None:
            return fault  # this recipient only: the others stay in the transaction
        self.envelope.recipients.append(rcpt.recipient)
        if rcpt.notify or rcpt.orcpt:
            self.envelope.dsn_recipients[rcpt.recipient] = (rcpt.notify, rcpt.orcpt)
        self.state = State.RCPT
        return RECIPIENT_OK

    def data(self) -> Reply:
        if self.state is State.CHUNKS:
            return MIXED_WITH_BDAT  # RFC 3030 section 2: not both in one transaction
        if self.state is State.MAIL:
            return NEED_RCPT
        if self.state is not State.RCPT:
            return NEED_MAIL if self.state is State.GREETED else NEED_HELO
        if self.envelope.body == "BINARYMIME":
            return BINARYMIME_NEEDS_BDAT  # RFC 3030 section 3
        if (fault := self.inject("data")) is not None:
            return fault
        if (problem := self.begin_message()) is not None:
            return problem
        self.state, self._data = State.DATA, DataReader()
        return START_DATA

    def begin_message(self) -> Reply | None:
        """The message begins (DATA, or a first BDAT): the envelope takes what the trace
        headers record, and the store opens its writer; or the storage problem."""
        envelope = self.envelope
        envelope.client_name, envelope.peer, envelope.tls = self.client_name, self.peer, self.tls
        envelope.auth_user = self.auth_user
        # RFC 3848's with-protocol names: ESMTP, S for TLS, A for AUTH; UTF8SMTP... when the
        # client used SMTPUTF8 (RFC 6531 section 3.7.3), so a reader knows it was allowed.
        envelope.protocol = "SMTP" if not self.extended else (
            "UTF8SMTP" if envelope.smtputf8 else "ESMTP") + (
            "S" if self.tls is not None else "") + ("A" if self.auth_user is not None else "")
        try:
            self._writer = self.store.begin(self.envelope)
        except OSError as error:
            return storage_problem(error)
        self._message_size, self._data_problem = 0, None
        return None

    def bdat(self, size: int, last: bool) -> Reply | None:
        """BDAT (RFC 3030): the next `size` octets are the message's, exactly as they are (no
        dot-stuffing, no end line). They are read whatever the answer, which comes after
        them; None until then. LAST ends the message; RSET or a failed chunk drops it."""
        self._chunk_left, self._chunk_last, refusal = size, last, None
        if self.state is State.CONNECTED:
            refusal = NEED_HELO
        elif not self.extended:
            refusal = NEED_EHLO  # CHUNKING is an extension: a HELO client was not offered it
        elif self.state in (State.GREETED, State.MAIL):
            refusal = NEED_MAIL if self.state is State.GREETED else NEED_RCPT
        elif self.state is State.RCPT:  # the first chunk: the message begins
            refusal = self.inject("data") or self.begin_message()
            if refusal is None:
                self.state = State.CHUNKS
        self._chunk_refusal = refusal
        return self.end_chunk() if size == 0 else None

    def handle_chunk(self, data: bytes) -> Reply | None:
        """Octets of a BDAT chunk; once it has all come, the reply."""
        self._chunk_left -= len(data)
        if self._chunk_refusal is None and self._data_problem is None:
            self._message_size += len(data)
            if self._message_size > self.policy.max_size:
                self._drop_message(MESSAGE_TOO_BIG)
            elif data:
                try:
                    self._writer.write(data)
                except OSError as error:
                    self._drop_message(storage_problem(error))
        return None if self._chunk_left else self.end_chunk()

    def end_chunk(self) -> Reply:
        refusal, self._chunk_refusal = self._chunk_refusal, None
        if refusal is not None:
            return refusal  # a BDAT out of place: the transaction, if any, stays as it was
        if self._data_problem is not None or self._chunk_last:
            return self.finish_message()
        return smtp_reply(250, f"2.0.0 Ok: {self._message_size} octets so far")

    def handle_data(self, data: bytes) -> tuple[Reply, bytes] | None:
        """Bytes of the message. Once its end arrives, return the reply and what followed."""
        body, rest = self._data.feed(data)
        self._message_size += len(body)
        if self._message_size > self.policy.max_size and self._data_problem is None:
            self._drop_message(MESSAGE_TOO_BIG)  # read on to the end, then answer once
        if body and self._writer is not None:
            try:
                self._writer.write(body)
            except OSError as error:
                self._drop_message(storage_problem(error))
        if rest is None:
            return None
        return self.finish_message(), rest

    def _drop_message(self, problem: Reply) -> None:
        self._data_problem = problem
        self._abort_writer()

    def _abort_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abort()

    def finish_message(self) -> Reply:
        """The final dot (or BDAT LAST) arrived: store the message and say so, or say why
        not. A failed chunk ends the transaction too (RFC 3030 section 2)."""
        writer, problem = self._writer, self._data_problem
        self._writer, key = None, None
        try:
            if problem is not None:
                if problem is MESSAGE_TOO_BIG:
                    self.refuse(problem, f"the message from <{self.envelope.sender}> was over "
                                         f"--max-size {self.policy.max_size}")
                return problem
            if (fault := self.inject("end-of-data")) is not None:
                writer.abort()  # a refused message leaves nothing behind
                return fault
            key = writer.commit()  # only now is the message on disk: a 250 promises it
            return queued(key)
        except OSError as error:
            return storage_problem(error)
        finally:
            if self.transcript is not None:
                self.transcript.message(self._message_size, key)
            self.reset_transaction()

    def reset_transaction(self) -> None:
        """RSET, a new HELO, or the end of DATA: forget the transaction, keep the session."""
        self._abort_writer()
        self.envelope, self._data, self._data_problem = Envelope(), None, None
        if self.state not in (State.CONNECTED, State.CLOSED):
            self.state = State.GREETED

    def unknown(self) -> Reply:
        self.unknown_commands += 1
        if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
            return self.close(TOO_MANY_UNKNOWN, "too many unrecognized commands")
        return UNKNOWN_COMMAND

    def refuse(self, reply: Reply, why: str) -> Reply:
        """A refusal worth a line in the log, as a stored message has one."""
        self.note(logging.INFO, "refused", f"{reply.code} {reply.lines[0]}: {why}")
        return reply

    def inject(self, stage: str, subject: str = "") -> Reply | None:
        """A failure configured for this point (--fail), or None to go on as usual. A delay
        is left to the handler, which waits before it sends the replies."""
        rule = self.faults.decide(stage, subject) if self.faults is not None else None
        if rule is None:
            return None
        self.note(logging.WARNING, "injected fault",
                  f"{stage} {subject}: {rule.text}".replace("  ", " "))
        if rule.delay:
            self._turn.wait += rule.delay
            return None
        if rule.disconnect:
            self.state = State.CLOSED
            return NO_REPLY
        return rule.reply

    def goodbye(self, reason: str) -> Reply:
        """The last reply when the handler ends the connection: "timeout", "shutdown",
        "busy" (too many connections), "crowded" (too many from this client's address) or
        "error" (a bug, whose details stay in the log)."""
        return {"timeout": TIMEOUT, "shutdown": SHUTTING_DOWN, "busy": TOO_MANY_CONNECTIONS,
                "crowded": CROWDED, "error": INTERNAL_ERROR}[reason]

    def close(self, last_reply: Reply, why: str) -> Reply:
        """End the session from our side, with a last reply and a note for the log."""
        self.state = State.CLOSED
        self.note(logging.INFO, "closed", why)
        return last_reply

    def starttls(self) -> Reply:
        """STARTTLS (RFC 3207): the handler runs the handshake once this reply is sent."""
        if not self.policy.tls_available:
            return NOT_IMPLEMENTED
        if self.tls is not None:
            return TLS_ALREADY_ACTIVE
        if self.state is State.CONNECTED:
            return NEED_EHLO
        self._tls_pending = self._turn.start_tls = True
        return READY_FOR_TLS

    def tls_started(self, description: str) -> None:
        """The handshake succeeded. RFC 3207 section 4.2: forget all that the client said
        before it, since it could have been forged; it must say EHLO again."""
        self.reset_transaction()
        self.state, self.tls, self._tls_pending = State.CONNECTED, description, False
        self.client_name, self.extended, self.auth_user = "", False, None

    def auth(self, mechanism: str, initial_response: str | None) -> Reply:
        """AUTH (RFC 4954). Without a users file any user name and password are accepted, since
        many clients insist on logging in; the name is recorded with each message sent."""
        if self.login is None:
            return NOT_IMPLEMENTED
        if self.state is State.CONNECTED or not self.extended:
            return NEED_EHLO
        if self.state is not State.GREETED:
            return AUTH_IN_TRANSACTION
        if self.auth_user is not None:
            return ALREADY_AUTHENTICATED
        if self.policy.tls_required and self.tls is None:
            return self.refuse(NEED_TLS_FOR_AUTH, "AUTH before STARTTLS, with --tls-required")
        if mechanism not in self.mechanisms():
            return UNKNOWN_MECHANISM
        if (fault := self.inject("auth")) is not None:
            return fault
        return self.login_step(self.login.begin(mechanism, initial_response))

    def login_step(self, reply: Reply) -> Reply:
        """After each step of AUTH: wait for the client's next response, or take the user it
        proved to be, or count a wrong password (each one slows the client down)."""
        login = self.login
        self.state = State.AUTH if login.waiting else State.GREETED
        if login.user is not None:
            self.auth_user = login.user
        if login.refused_user is not None:
            self.refuse(BAD_CREDENTIALS, f"a wrong password for {login.refused_user!r}")
            self._turn.wait += AUTH_FAILURE_DELAY  # slows down guessing; only this client waits
            if login.failures >= MAX_AUTH_FAILURES:
                return self.close(TOO_MANY_AUTH_FAILURES, "too many failed authentications")
        return reply

    def connection_lost(self) -> None:
        """The connection ended, however it ended: a message not yet acknowledged leaves
        no trace."""
        self.reset_transaction()
        self.state = State.CLOSED


# ---------------------------------------------------------------------------------------------
# 5. Reading what the client sends: lines, and DATA
#
# Incoming holds what has arrived and not been read: whole lines for commands, so many octets
# for a BDAT chunk, all of it for a message in DATA. Every line protocol of sheesh reads this way.
#
# After DATA the client sends the message and ends it with a line holding a single dot: the
# five bytes CR LF . CR LF (RFC 5321 section 4.1.1.4). So that a line of the message can begin
# with a dot too, the client doubles that dot ("dot-stuffing") and the server removes one
# again (section 4.5.2). Only CR LF . CR LF ends a message: a bare LF or CR around the dot does
# not, or a second message could be smuggled inside the first (CVE-2023-51766, CVE-2024-27305).
# DataReader does this a buffer at a time with bytes.find() and bytes.replace(), which run in C;
# its one subtlety is the boundary between two buffers: the end of one may hold the start of
# the terminator, so it keeps those bytes back for the next.
# ---------------------------------------------------------------------------------------------

END_OF_DATA = b"\r\n.\r\n"


class Overlong:
    """What Incoming.line() gives for a line that was too long, once its end has come."""


LINE_TOO_LONG_MARK = Overlong()


class Incoming:
    """What a client has sent and is not read yet, as every line protocol reads it (SMTP,
    POP3 and IMAP share this one): a line at a time, so many octets (a BDAT chunk, an IMAP
    literal), or all there is (a message in DATA). A line is bounded: one of `limit` octets
    or more is dropped as it arrives, and comes out once, when its end does, as
    LINE_TOO_LONG_MARK: a client that never sends a line ending holds no more than that."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data, self._at = b"", 0
        self._overlong = False

    def add(self, data: bytes) -> None:
        self._data = self._data[self._at:] + data if self._at < len(self._data) else data
        self._at = 0

    @property
    def waiting(self) -> bool:
        """Whether a line has begun and not ended (or the end of a dropped one is awaited)."""
        return self._at < len(self._data) or self._overlong

    @property
    def held(self) -> int:
        """How many octets it holds: never a line's worth more than its limit."""
        return len(self._data) - self._at

    def line(self) -> bytes | Overlong | None:
        """The next whole line, without its LF; None until one has come."""
        end = self._data.find(b"\n", self._at)
        if end < 0:
            if len(self._data) - self._at >= self.limit:
                self._data, self._at, self._overlong = b"", 0, True
            return None
        line, self._at = self._data[self._at:end], end + 1
        if self._overlong or len(line) >= self.limit:
            self._overlong = False
            return LINE_TOO_LONG_MARK
        return line

    def take(self, count: int) -> bytes:
        """Up to `count` octets, whatever they hold."""
        piece = self._data[self._at:self._at + count]
        self._at += len(piece)
        return piece

    def rest(self) -> bytes:
        """All there is."""
        piece = self._data[self._at:]
        self._data, self._at = b"", 0
        return piece

    def clear(self) -> None:
        """Forget it all: after STARTTLS (nothing sent before the handshake is read), or
        once the session has closed."""
        self._data, self._at, self._overlong = b"", 0, False


class DataReader:
    """Reads one message body: un-stuffs dots and finds the CRLF.CRLF that ends it."""

    def __init__(self) -> None:
        # The CRLF that ended the DATA command counts as the end of a line, so that a dot on
        # the first line of the body is un-stuffed and an empty message (".") is recognised.
        self._held_back = b"\r\n"
        self._skip = 2  # ...but those two bytes are not part of the message

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Return (body bytes, None) while the message goes on, and (body bytes, what follows
        the terminator) once it has ended."""
        buffer = self._held_back + data if self._held_back else data
        end = buffer.find(END_OF_DATA)
        if end >= 0:
            body, rest = buffer[:end + 2], buffer[end + len(END_OF_DATA):]
        else:
            keep = _partial_terminator(buffer)
            body, rest = buffer[:len(buffer) - keep], None
            self._held_back = buffer[len(buffer) - keep:]
        # Every line start in `body` follows a CRLF inside it, so one replace() un-stuffs them all.
        body = body.replace(b"\r\n.", b"\r\n")
        if self._skip:
            skipped = min(self._skip, len(body))
            body, self._skip = body[skipped:], self._skip - skipped
        return body, rest


def _partial_terminator(buffer: bytes) -> int:
    """How many bytes at the end of buffer could be the first bytes of CRLF.CRLF."""
    for length in (4, 3, 2, 1):
        if buffer.endswith(END_OF_DATA[:length]):
            return length
    return 0


# ---------------------------------------------------------------------------------------------
# 6. The store: a Maildir
#
# Where do my emails go? A Maildir is a folder with three folders in it: tmp, new and cur. A
# message is written into tmp/ under a name nobody else will use, flushed to disk, and only then
# renamed into new/, so a reader (mutt, Python's mailbox module) never sees half a message. A
# rename within a filesystem is atomic. Names follow the usual pattern, seconds.M<microseconds>
# P<pid>Q<counter>.<host>, which cannot collide between threads (the counter) or processes (the
# pid). That name is the message's key: it never changes, while its file moves (to cur/ once
# read) and gains flags (cur/KEY:2,S). Every reader names a message by its key.
#
# On top of the message as sent go the trace headers (RFC 5321 section 4.4): Return-Path with
# the envelope sender, Delivered-To with each envelope recipient (so Bcc recipients are kept),
# and Received. Below them, the bytes are exactly the bytes the client sent. The commit is the
# moment a 250 may be sent: the file is on disk, and renamed into new/.
# ---------------------------------------------------------------------------------------------


def storage_problem(error: OSError) -> Reply:
    """A failed write is the server's problem, and a temporary one (RFC 5321 section 4.2.2)."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return STORAGE_FULL
    return STORAGE_FAILED


# Maildir puts flags after ":2," in a file name; Windows cannot have ":" in a name, so the
# mailbox module uses "!" there instead.
MAILDIR_INFO = "!" if os.name == "nt" else ":"

# The flags of https://cr.yp.to/proto/maildir.html, which IMAP maps to its own (section 17):
# Draft, Flagged, Passed, Replied, Seen, Trashed. A name lists them in ASCII order.
MAILDIR_FLAGS = "DFPRST"


def split_name(name: str) -> tuple[str, str]:
    """A file name in new/ or cur/ as (key, flags): "KEY:2,RS" gives ("KEY", "RS")."""
    key, _, info = name.partition(MAILDIR_INFO)
    return key, info[2:] if info.startswith("2,") else ""


def location_with_flags(key: str, flags: str) -> str:
    """Where a message lives once its flags are set: cur/, as mutt puts a message it has seen.
    A message never moves back to new/, which means "not yet seen by any mail reader"."""
    return f"cur/{key}{MAILDIR_INFO}2,{''.join(sorted(set(flags)))}"


def arrival_time(key: str, fallback: float) -> float:
    """When a message arrived, from its key ("seconds.M<microseconds>P..."), or the file's
    time for names that other programs made."""
    found = _ARRIVAL_TIME.match(key)
    return int(found.group(1)) + int(found.group(2)) / 1e6 if found else fallback


_ARRIVAL_TIME = re.compile(r"(\d{1,12})\.M(\d{1,6})P")


@dataclass(frozen=True)
class Delivery:
    """A message the store has just put in new/."""

    queue_id: str  # its key
    path: str
    envelope: Envelope
    # Its size as stored: sheesh's trace headers and the message as sent. The one meaning
    # of "size" everywhere (the log, the API, POP3's LIST, IMAP's RFC822.SIZE): what a
    # reader gets. (--max-size counts the message as sent, as SIZE= does: RFC 1870.)
    size: int
    head: bytes = b""  # its first bytes as written, for the log line: no read before the 250


class Maildir:
    """The folders and files: writes messages into new/, moves, removes and opens them. Safe to
    use from many threads at once. Only the Store (12.4) and the sessions' writers use it."""

    def __init__(self, path: str | os.PathLike, hostname: str = "localhost", *,
                 fsync: bool = True, on_delivery=None) -> None:
        self.path = Path(path)
        # Plain strings for the paths built per message: os.path is several times faster.
        self._root = os.fspath(path)
        self._tmp, self._new = os.path.join(path, "tmp"), os.path.join(path, "new")
        self.hostname = hostname
        self.fsync = fsync
        self.on_delivery = on_delivery  # called with each Delivery, in the delivering thread
        self._counter = itertools.count()
        self._pid = os.getpid()
        # As the mailbox module does: "/" and ":" would break the name (":" starts Maildir flags).
        self._name_host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self._last_error = ""
        self._date = (0, "")  # the Date for the Received header, made once a second
        self._new_fd: int | None = None  # new/, held open to fsync each rename into it

    def create(self) -> None:
        """Make the folders if needed and check a message can be written; OSError if not."""
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = self.path / "tmp" / f"{self._unique_name()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
        if self.fsync and os.name == "posix" and self._new_fd is None:
            self._new_fd = os.open(self._new, os.O_RDONLY)  # Windows cannot open a folder

    def close(self) -> None:
        if self._new_fd is not None:
            os.close(self._new_fd)
            self._new_fd = None

    def _unique_name(self, moment: float | None = None) -> str:
        """A new key: when it arrived (or the moment given: IMAP APPEND's date), and what
        makes it unique (the process and a counter)."""
        now = time.time() if moment is None else moment
        return (f"{int(now)}.M{int(now % 1 * 1e6):06d}P{self._pid}Q{next(self._counter)}"
                f".{self._name_host}")

    def rename_arriving(self, writer: MaildirWriter, moment: float) -> None:
        """A message not yet committed is to arrive as of `moment` (its key says when)."""
        writer.name = self._unique_name(moment)

    def begin(self, envelope: Envelope, *, trace: bool = True,
              on_delivery=None) -> MaildirWriter:
        """A writer for one message. trace=False stores the bytes alone (IMAP's COPY);
        on_delivery, when given, is told of it instead of the Maildir's own (IMAP's APPEND
        and COPY are not SMTP deliveries: not relayed, not logged as one)."""
        name = self._unique_name()
        tmp_path = f"{self._tmp}{os.sep}{name}"
        try:
            # O_EXCL: never write over another file. A raw descriptor, not open(): with many
            # threads every system call is a chance to lose the GIL, and open() makes three.
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
        except OSError as error:
            self.failed(error)
            raise
        writer = MaildirWriter(self, fd, tmp_path, name, envelope,
                               self.trace_headers(envelope, name) if trace else b"")
        writer.on_delivery = on_delivery
        return writer

    def trace_headers(self, envelope: Envelope, queue_id: str) -> bytes:
        recipients = envelope.recipients
        lines = [f"Return-Path: <{envelope.sender}>"]
        lines += [f"Delivered-To: {recipient}" for recipient in recipients]
        lines += dsn_lines(envelope)
        # The client's address as an address literal (RFC 5321 section 4.1.3): [192.0.2.1],
        # or [IPv6:2001:db8::1].
        literal = f"IPv6:{envelope.peer}" if ":" in envelope.peer else envelope.peer
        lines.append(f"Received: from {header_safe(envelope.client_name)} ([{literal}])")
        if envelope.tls is not None:
            lines.append(f"\t(using {envelope.tls})")
        if envelope.auth_user is not None:
            lines.append(f"\t(authenticated as {header_safe(envelope.auth_user)})")
        # One recipient is named in "for"; more are not, so Bcc recipients stay private.
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        lines.append(f"\tby {self.hostname} (sheesh) with {envelope.protocol} id {queue_id}"
                     f"{for_clause}; {self._now()}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _now(self) -> str:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, localtime=True))
        return self._date[1]

    def delivered(self, delivery: Delivery) -> None:
        if self._last_error:
            self._last_error = ""
            log.warning("the Maildir %s works again", self.path)
        if self.on_delivery is not None:
            self.on_delivery(delivery)

    def failed(self, error: OSError) -> None:
        """Log a storage failure once, not once per message, until storing works again."""
        described = error.strerror or str(error)
        if described != self._last_error:
            self._last_error = described
            log.error("cannot store messages in %s: %s", self.path, described)

    # The files, by location: "new/KEY" or "cur/KEY:2,FLAGS".

    def remove_leftovers(self) -> int:
        """Remove files in tmp/ that no delivery will finish, and say how many: those older
        than 36 hours (the Maildir convention), and those of a sheesh on this host whose
        process has gone (killed mid-delivery: its key carries its pid)."""
        removed, now = 0, time.time()
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                try:
                    abandoned = now - entry.stat().st_mtime > TMP_ABANDONED_AFTER
                except OSError:
                    continue
                if abandoned or self.orphaned(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def orphaned(self, name: str) -> bool:
        found = re.fullmatch(r"[0-9]+\.M[0-9]+P([0-9]+)Q[0-9]+\.(.*?)(?:\.probe)?", name)
        if not found or found.group(2) != self._name_host or os.name != "posix":
            return False  # another host's, or Windows (where os.kill cannot just ask)
        pid = int(found.group(1))
        if pid == self._pid:
            return False
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process is there
        except ProcessLookupError:
            return True
        except OSError:
            pass  # there, but another user's
        return False

    def file_path(self, location: str) -> str:
        return os.path.join(self._root, location)

    def open(self, location: str):
        """The message's file, for reading; FileNotFoundError if it is not (or no longer) there."""
        return open(self.file_path(location), "rb")

    @contextlib.contextmanager
    def read(self, location: str):
        """A message's bytes (a map, for a large one), read with as few system calls as the
        index can manage: it reads every message once."""
        fd = os.open(self.file_path(location), os.O_RDONLY | _O_BINARY)
        try:
            size = os.fstat(fd).st_size
            if size > READ_WHOLE_LIMIT:
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                    yield mapped
                return
            data = os.read(fd, size)
            while len(data) < size and (more := os.read(fd, size - len(data))):
                data += more  # a read may come back short
            yield data
        finally:
            os.close(fd)

    def move(self, location: str, new_location: str) -> None:
        os.replace(self.file_path(location), self.file_path(new_location))

    def remove(self, location: str) -> bool:
        """Delete a message's file; False if there was none there."""
        try:
            os.unlink(self.file_path(location))
        except FileNotFoundError:
            return False
        return True

    def scan(self):
        """Every message's location, as os.scandir finds them (no order)."""
        for sub in ("new", "cur"):
            with os.scandir(os.path.join(self._root, sub)) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        yield f"{sub}/{entry.name}", entry

    def folder_times(self) -> tuple[int, int]:
        """The modification times of new/ and cur/: they change when a file comes or goes."""
        return tuple(os.stat(os.path.join(self._root, sub)).st_mtime_ns for sub in ("new", "cur"))


_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise turn LF into CRLF
TMP_ABANDONED_AFTER = 36 * 3600  # the Maildir convention: a file in tmp/ this old is dead


# RFC 5322 section 2.2: a field name is printable ASCII but the colon (and section 4.5.3,
# obsolete syntax, allows blanks before the colon). A line is at most 998 octets and CRLF
# (section 2.1.1): what a first line is, is known by then.
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
FIRST_LINE_LIMIT = 1000


class MaildirWriter:
    """One message on its way into the Maildir."""

    def __init__(self, store: Maildir, fd: int, tmp_path: str, name: str, envelope: Envelope,
                 trace_headers: bytes):
        self.store, self.fd, self.tmp_path, self.name = store, fd, tmp_path, name
        self.envelope = envelope
        self.size = 0
        self.head = b""  # the first HEADER_SCAN_LIMIT bytes written, kept for the log line
        self._unwritten = trace_headers  # written with the first line of the message: one write
        self._first_line = b""  # the message's first bytes, until they make a line
        self.on_delivery = None  # else the Maildir's

    def write(self, data: bytes) -> None:
        if self._unwritten:
            data = self._with_trace_headers(data)
            if data is None:
                return
        self._write(data)

    def _with_trace_headers(self, data: bytes, last: bool = False) -> bytes | None:
        """The trace headers and the message's first line, once that line is whole (or the
        message ends first). A message whose first line is not a header field has no header
        section: "hello" after DATA is all body (RFC 5322 section 2.1), and under the trace
        headers it would read as a header line, which mbsync and fetchmail refuse. A blank
        line between them keeps it the body it was."""
        first = self._first_line + data
        if not last and b"\n" not in first and len(first) < FIRST_LINE_LIMIT:
            self._first_line = first
            return None
        trace, self._unwritten, self._first_line = self._unwritten, b"", b""
        if first and not first.startswith((b"\r\n", b"\n")) and not _HEADER_FIELD.match(first):
            trace += b"\r\n"
        return trace + first

    def _write(self, chunk: bytes) -> None:
        try:
            write_all(self.fd, chunk)
        except OSError as error:
            self.store.failed(error)
            raise
        self.size += len(chunk)
        if len(self.head) < HEADER_SCAN_LIMIT:
            self.head += chunk[:HEADER_SCAN_LIMIT - len(self.head)]

    def commit(self) -> str:
        """Put the message on disk and move it into new/; return its queue id."""
        final_path = f"{self.store._new}{os.sep}{self.name}"
        try:
            if self._unwritten:  # a message of less than a line, or an empty one
                self._write(self._with_trace_headers(b"", last=True))
            if self.store.fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp_path, final_path)  # atomic: readers see all of it or nothing
            if self.store._new_fd is not None:
                os.fsync(self.store._new_fd)  # so that the rename itself survives a crash
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError):
                self.store.failed(error)
            raise
        delivery = Delivery(self.name, final_path, self.envelope, self.size, self.head)
        if self.on_delivery is not None:
            self.on_delivery(delivery)
        else:
            self.store.delivered(delivery)
        return self.name

    def abort(self) -> None:
        """Forget the message: close and remove the file in tmp/."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        except OSError as error:
            self.store.failed(error)


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than it was given (a full disk, a signal): write the rest."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def dsn_lines(envelope: Envelope) -> list[str]:
    """What the client asked of delivery status notifications (RFC 3461), as trace lines: the
    transaction's RET and ENVID, and each recipient's NOTIFY and ORCPT. All of it is ASCII
    that parse_mail and parse_rcpt checked (xtext), so it cannot break a header."""
    lines = []
    if envelope.dsn_ret or envelope.dsn_envid:
        lines.append("X-Sheesh-DSN:" + "".join(
            f" {name}={value}" for name, value in (("RET", envelope.dsn_ret),
                                                   ("ENVID", envelope.dsn_envid)) if value))
    for recipient, (notify, orcpt) in envelope.dsn_recipients.items():
        lines.append(f"X-Sheesh-DSN: <{recipient}>" + (f" NOTIFY={','.join(notify)}" * bool(
            notify)) + (f" ORCPT={orcpt}" if orcpt else ""))
    return lines


def header_safe(text: str) -> str:
    """Client text made fit for a header comment: printable ASCII, no parentheses."""
    return _NOT_HEADER_SAFE.sub("?", text) or "unknown"


_NOT_HEADER_SAFE = re.compile(r"[^ -'*-\[\]-~]")  # all but printable ASCII, ( ) and backslash


def escape_for_log(text: str) -> str:
    """Client text made safe for a terminal: control characters and stray bytes as escapes."""
    return "".join(ch if ch.isprintable() else
                   f"\\x{ord(ch) & 0xFF:02x}" if "\udc80" <= ch <= "\udcff" or ord(ch) < 0x100
                   else f"\\u{ord(ch):04x}" for ch in text)


READ_WHOLE_LIMIT = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# 7. The handler
#
# socketserver gives each connection a thread and a StreamRequestHandler, with rfile and wfile
# over the socket. The handler moves bytes between the socket and the session and does nothing
# else: it reads what has arrived, hands it to the session, and does what the Turn says: waits,
# writes the replies in one write (a reply per packet waits on delayed ACKs under Nagle), starts
# TLS, or hangs up. converse() is the loop.
# ---------------------------------------------------------------------------------------------


class Streamed:
    """Bytes too many to hold at once (a message over POP3 or IMAP, an attachment): made as
    they are sent. chunks() gives the pieces; close() lets go of the file they come from."""

    def __init__(self, produce, length: int | None = None, close=None,
                 shown: str | None = None) -> None:
        self.produce, self.length, self._close = produce, length, close
        self.shown = shown  # what a transcript says of it (never the message itself)

    def chunks(self):
        return self.produce()

    refusal = False

    def transcript_lines(self) -> list[str]:
        if self.shown is not None:
            return [self.shown]
        return [f"<{self.length:,} octets>" if self.length is not None else "<octets>"]

    def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            close()


class ConnectionHandler(socketserver.StreamRequestHandler):
    """The only code that reads from or writes to an SMTP (or POP3) connection."""

    disable_nagle_algorithm = True  # replies are small and already batched: send them now
    # read1() reads straight into the bytes it returns and never uses rfile's buffer, so a
    # 1-byte buffer instead of 8 KiB saves memory on every idle connection (3.6 KB each).
    rbufsize = 1
    _woken: socket.socket | None = None  # IMAP's: readable when the store woke the session

    def setup(self) -> None:
        if not hasattr(self, "plain_socket"):
            self.plain_socket = self.request
        super().setup()
        # Wait for input with poll() before reading: read1() allocates its 64 KiB result before
        # it blocks, and a thousand idle connections would each hold one (4-9 KB of memory
        # each). Not over TLS, whose buffers can hold bytes that poll() cannot see, nor where
        # there is no poll() (Windows): there read1() waits, under the socket's timeout.
        is_tls = self.request is not self.plain_socket
        self.poller = select.poll() if hasattr(select, "poll") and not is_tls else None
        if self.poller is not None:
            self.poller.register(self.connection, select.POLLIN)
            self.connection.settimeout(self.server.idle_timeout)  # for sends: poll() waits

    def handle(self) -> None:
        server: Listener = self.server
        self.session = server.make_session(self.client_address[0])
        self.transcript = self.session.transcript = server.new_transcript(self.client_address[0])
        refusal = server.admit(self)
        if refusal is not None:
            if self.transcript is not None:
                self.transcript.note({"busy": "refused: --max-connections reached",
                                      "crowded": "refused: --max-connections-per-ip reached",
                                      "shutdown": "refused: sheesh is stopping"}[refusal])
            self.send_last(self.session.goodbye(refusal))
            server.transcript_done(self.transcript)
            return
        try:
            self.converse()
        except TimeoutError:
            self.ended_badly(f"no complete command within {self.idle_timeout():g} s")
            self.send_last(self.session.goodbye("timeout"))
        except OSError:
            pass  # the client went away; the session below cleans up
        except Exception:
            log.exception("unexpected error in the session with %s", self.client_address[0])
            self.ended_badly("an internal error (see the log)")
            self.send_last(self.session.goodbye("error"))  # never the exception's text
        finally:
            session = self.session
            if not session.closed and session.busy:
                self.ended_badly("the connection ended in the middle of a command or message")
            session.connection_lost()
            server.forget(self)
            if self.transcript is not None:
                self.transcript.user = getattr(session, "auth_user", None) or getattr(
                    session, "user", None)
                server.transcript_done(self.transcript)

    def ended_badly(self, why: str) -> None:
        if self.transcript is not None and self.transcript.error is None:
            self.transcript.error = why
            self.transcript.note(why)

    def finish(self) -> None:
        super().finish()
        if self.request is not self.plain_socket:
            self.request.close()  # the TLS socket; socketserver closes only the one it made
        if self._woken is not None:
            self.waker.close()
            self._woken.close()

    def converse(self) -> None:
        """The connection loop: read, let the session answer, do what its Turn says."""
        session, server = self.session, self.server
        if server.implicit_tls and not self.start_tls():
            return
        if not self.carry_out(session.greeting()):
            return
        self.unit_started = self.quiet_since = time.monotonic()
        busy = session.busy
        if self.poller is not None and hasattr(session, "wake"):  # IMAP, for IDLE
            self.waker, self._woken = socket.socketpair()
            for end in (self.waker, self._woken):
                end.setblocking(False)
            self.poller.register(self._woken, select.POLLIN)
            session.wake = self.wake
        while True:
            data = self.read(busy)
            if data is None:  # nothing came, and the session asked to look (IMAP's IDLE)
                if not self.carry_out(session.tick()):
                    return
                busy = session.busy
                continue
            if not data:
                if server.stopping:
                    self.send_last(session.goodbye("shutdown"))
                return
            if not self.carry_out(session.receive(data)):
                return
            if session.busy != busy:
                busy = not busy
                if busy:  # a command or a message has begun: it has one timeout in all
                    self.unit_started = time.monotonic()
            if server.stopping and not busy:
                self.send_last(session.goodbye("shutdown"))
                return

    def read(self, busy: bool) -> bytes | None:
        """The client's next bytes, within the timeout (RFC 5321 section 4.5.3.2.7). A line or a
        message that has begun must end within one timeout in all, so a client that trickles
        a byte at a time cannot hold a connection forever. None when the session asked to be
        ticked (tick_interval: IMAP's IDLE) and nothing came meanwhile."""
        started = self.unit_started if busy else self.quiet_since
        timeout = self.idle_timeout() - (time.monotonic() - started)
        if timeout <= 0:
            raise TimeoutError
        tick = getattr(self.session, "tick_interval", None)
        wait = timeout if tick is None else min(timeout, tick)
        try:
            if self.poller is not None:
                ready = self.poller.poll(wait * 1000)
                if not ready:
                    raise TimeoutError
                if self._woken is not None and any(fd == self._woken.fileno() for fd, _ in ready):
                    with contextlib.suppress(BlockingIOError):
                        while self._woken.recv(4096):
                            pass
                    if len(ready) == 1:  # the store's news, and nothing from the client
                        return None
            else:
                self.set_timeout(wait)  # over TLS, read1() itself waits
            data = self.rfile.read1(READ_SIZE)
        except TimeoutError:
            if tick is not None and wait < timeout:
                return None
            raise
        self.quiet_since = time.monotonic()
        return data

    def idle_timeout(self) -> float:
        return min(self.server.idle_timeout, self.session.idle_limit or math.inf)

    def wake(self) -> None:
        """The store has news for the session (IMAP's IDLE): end the wait in read()."""
        with contextlib.suppress(OSError):  # full (a wake is pending) or closed: fine
            self.waker.send(b"!")

    def set_timeout(self, seconds: float) -> None:
        """For reads, and for sends too: a client must read its replies."""
        if seconds != self.connection.gettimeout():  # most calls set what is already set
            self.connection.settimeout(seconds)

    def start_tls(self) -> bool:
        """Run the TLS handshake on this connection, after STARTTLS or at once on the SMTPS
        port. Whatever the client sent before it stays unread in the plain socket's buffers,
        which are dropped with it. False if the handshake failed (then the connection ends)."""
        self.connection.settimeout(self.server.idle_timeout)
        try:
            tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
        except OSError as error:  # ssl.SSLError and timeouts are OSErrors too
            log.info("TLS handshake with %s failed: %s", self.client_address[0],
                     tls_failure(error))
            self.ended_badly(f"the TLS handshake failed: {tls_failure(error)}")
            return False
        self.request = tls
        self.setup()  # rfile and wfile over TLS now
        described = f"{tls.version()} with cipher {tls.cipher()[0]}"
        self.session.tls_started(described)
        if self.transcript is not None:
            self.transcript.tls = described
            self.transcript.note(f"TLS started: {described}")
        return True

    def carry_out(self, turn: Turn) -> bool:
        """Do what the session asked (see Turn): log, wait, send the replies, then start TLS
        or hang up. Whether the conversation goes on."""
        for level, what, text in turn.log:
            log.log(level, "%s for %s: %s", what, self.client_address[0], escape_for_log(text))
            if self.transcript is not None:
                self.transcript.note(f"{what}: {text}")
        if turn.wait:
            self.pause(turn.wait)
        self.send(turn)
        if turn.hang_up:
            return False
        return self.start_tls() if turn.start_tls else True

    def pause(self, seconds: float) -> None:
        """Wait before answering (after a failed login, for an injected delay), but no longer
        than the client stays, sheesh runs, or the fault rules stay as they were: a waiting
        connection holds a slot that others may need."""
        faults = self.server.faults
        generation = faults.generation if faults is not None else 0
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.server.stopping:
            if faults is not None and faults.generation != generation:
                return
            if self.poller is not None and self.poller.poll(min(left, 0.25) * 1000):
                if not self.connection.recv(1, socket.MSG_PEEK):
                    raise ConnectionResetError("the client hung up while it was kept waiting")
            time.sleep(min(left, 0.25) if self.poller is None else min(left, 0.05))

    def send(self, replies: list) -> None:
        """Write replies in one write; a Streamed one (a message over POP3) piece by piece."""
        if self.poller is None:
            self.set_timeout(self.server.idle_timeout)  # not a tick's short wait
        waiting, transcript = [], self.transcript
        for reply in replies:
            if transcript is not None:
                transcript.server(reply)
            if not isinstance(reply, Streamed):
                waiting.append(reply.wire)
                continue
            try:
                for chunk in reply.chunks():
                    waiting.append(chunk)
                    if sum(map(len, waiting)) >= READ_SIZE:
                        self.wfile.write(b"".join(waiting))
                        waiting = []
            finally:
                reply.close()
        if waiting:
            self.wfile.write(b"".join(waiting))

    def send_last(self, reply) -> None:
        """A reply on the way out: the client may already be gone, and that is fine."""
        try:
            self.send([reply])
        except OSError:
            pass

    def hang_up(self) -> None:
        """From another thread: end the connection's reads, so its loop sees the end of input."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RD)
        except OSError:
            pass


def tls_failure(error: OSError) -> str:
    """Why a TLS handshake failed, for the log. A client that does not trust the certificate
    (Nodemailer's default, with --tls-self-signed) mostly just hangs up, or says so with an
    alert: that is the likely cause, and the log says it in words."""
    text = str(error)
    # OpenSSL builds differ in how a hang-up mid-handshake surfaces: a reset, an EOF, or a
    # "zero return" (Debian's Python 3.11 says "TLS/SSL connection has been closed (EOF)").
    hung_up = (ConnectionResetError,) + (
        (ssl.SSLEOFError, ssl.SSLZeroReturnError) if ssl is not None else ())
    refused = ("UNEXPECTED_EOF", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "BAD_CERTIFICATE")
    if isinstance(error, hung_up) or any(alert in text for alert in refused):
        return ("the client closed the connection during the TLS handshake: it probably does "
                "not trust the certificate (see the README's TLS section)")
    return escape_for_log(text)


# ---------------------------------------------------------------------------------------------
# 8. The listener
#
# Listener is socketserver's ThreadingTCPServer with the limits a long-running server needs:
# a deep listen backlog, a cap on connections (and on connections from one address), and a stop
# that lets messages in DATA finish. One listens on each port; Part II's Server builds them.
# ---------------------------------------------------------------------------------------------


class Listener(socketserver.ThreadingTCPServer):
    """One listening port: SMTP, SMTPS, POP3 or POP3S. make_session(peer) makes the session
    for each connection; with implicit_tls, TLS starts at the first byte (RFC 8314)."""

    daemon_threads = True
    block_on_close = False  # stop() waits for the sessions itself, with a deadline
    request_queue_size = 1024  # socketserver's listen backlog of 5 drops a burst of connections
    allow_reuse_address = os.name != "nt"  # on Windows it would let two servers share a port
    serving = False  # set when a thread runs serve_forever(): shutdown() waits for that thread

    def __init__(self, host: str, port: int, make_session, *, idle_timeout: float,
                 max_connections: int, addresses: ConnectionsByAddress, tls_context=None,
                 implicit_tls: bool = False, protocol: str = "SMTP", store=None,
                 faults=None) -> None:
        self.make_session, self.protocol = make_session, protocol
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self.addresses = addresses  # connections by client address, on every port
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.store = store  # keeps the transcripts (Part II), if given
        self.faults = faults  # a wait for an injected delay ends when its rules change
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.stopping = False
        self._handlers: set[ConnectionHandler] = set()
        self._changed = threading.Condition()
        super().__init__((host, port), ConnectionHandler)

    def admit(self, handler: ConnectionHandler) -> str | None:
        """Register a new connection, or say why it is refused."""
        with self._changed:
            if self.stopping:
                return "shutdown"
            if len(self._handlers) >= self.max_connections:
                log.warning("refused a connection from %s: already %d connections",
                            handler.client_address[0], len(self._handlers))
                return "busy"
            if not self.addresses.take(handler.client_address[0]):
                return "crowded"
            self._handlers.add(handler)
            return None

    @property
    def connections(self) -> int:
        return len(self._handlers)

    def new_transcript(self, peer: str):
        """A transcript for a new session, from the store (Part II), if there is one."""
        return self.store.session_started(self.protocol, peer) if self.store else None

    def transcript_done(self, transcript) -> None:
        if transcript is not None:
            self.store.session_ended(transcript)

    def forget(self, handler: ConnectionHandler) -> None:
        with self._changed:
            if handler in self._handlers:
                self._handlers.discard(handler)
                self.addresses.give(handler.client_address[0])
            self._changed.notify_all()

    def stop_accepting(self) -> None:
        """Close the listening socket, and end the sessions that are not in DATA."""
        if self.stopping:
            return
        if self.serving:
            self.shutdown()
        self.server_close()
        with self._changed:
            self.stopping = True
            for handler in self._handlers:
                if not handler.session.in_data:
                    handler.hang_up()

    def in_data(self) -> int:
        """How many sessions are receiving a message just now."""
        with self._changed:
            return sum(handler.session.in_data for handler in self._handlers)

    def finish_sessions(self, deadline: float) -> None:
        """Let messages in DATA finish until the deadline; then cut them off, unstored."""
        with self._changed:
            self._changed.wait_for(lambda: not self._handlers, deadline - time.monotonic())
            for handler in self._handlers:
                handler.hang_up()
            self._changed.wait_for(lambda: not self._handlers, timeout=2.0)

    def handle_error(self, request, client_address) -> None:
        """An exception outside a session (setting up a connection): log it, keep serving."""
        log.exception("error on a connection from %s", client_address[0])


class ConnectionsByAddress:
    """How many connections each client address has open, on every port at once (SMTP,
    POP3, IMAP and the web): one peer cannot take every slot (--max-connections-per-ip).
    This machine's own clients (loopback) are counted but never refused here. The first
    refusal in a minute from an address is logged."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: collections.Counter[str] = collections.Counter()
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, peer: str) -> bool:
        with self._lock:
            if self._open[peer] < self.limit or is_loopback(peer):
                self._open[peer] += 1
                return True
            if time.monotonic() - self._logged.get(peer, -math.inf) >= REFUSAL_LOG_INTERVAL:
                self._logged[peer] = time.monotonic()
                log.warning("refused connections from %s: it has %d open already "
                            "(--max-connections-per-ip)", peer, self._open[peer])
            return False

    def give(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]


# =============================================================================================
# PART II. WHAT A DEV SINK ALSO NEEDS
#
# AUTH and TLS; failures on purpose; transcripts; the index every reader shares, with search
# and message checks; the in-process Server; the web inbox; forwarding; POP3 and IMAP, in the
# same shape as SMTP (a pure session, the same handler); the command line; and where the speed
# comes from.
# =============================================================================================


# ---------------------------------------------------------------------------------------------
# 9. AUTH and TLS
#
# AUTH (RFC 4954) proves who the client is: a Login carries one session's exchange, and a
# LoginGuard counts failures by address across every session and protocol. TLS (RFC 3207,
# 8314) needs a certificate: the one given, or a throwaway one made at start-up.
# ---------------------------------------------------------------------------------------------

# Failed logins from one client address, across every session and protocol: at most so many in
# so long, then refused until the oldest age out. A person who mistypes fails a few times; a
# guesser, at three a connection and a thousand connections a minute, would try thousands.
LOGIN_FAILURES_ALLOWED = 10
LOGIN_FAILURE_WINDOW = 600.0
LOGIN_LOG_INTERVAL = 60.0  # an address's failures are logged once a minute, not each one
LOGIN_ADDRESSES_KEPT = 10_000  # addresses remembered; the oldest are forgotten first


class Login:
    """SMTP AUTH's exchange (RFC 4954), one step at a time, and the session's count of wrong
    passwords. PLAIN (RFC 4616) sends "authzid NUL user NUL password"; LOGIN sends the user
    name, then the password, each when asked; CRAM-MD5 (RFC 2195) answers a challenge with
    an HMAC of it, so the password never travels. Each response is a line of base64; "*"
    gives up. After each step: waiting (a 334 is out), user (who it proved to be), or
    refused_user (a wrong password for that name)."""

    def __init__(self, users: dict[str, str] | None, peer: str, hostname: str,
                 guard: LoginGuard | None = None) -> None:
        self.users, self.peer, self.hostname, self.guard = users, peer, hostname, guard
        self.failures = 0  # distinct wrong credentials: see same_mistake
        self.waiting, self.user, self.refused_user = False, None, None
        self._mechanism, self._username, self._challenge = "", None, b""
        # The wrong credentials tried so far, each (user, password) or, for CRAM-MD5, (user,
        # (challenge, digest)): smtplib.login() tries CRAM-MD5, PLAIN and LOGIN in turn, and
        # one mistyped password must not use all three tries of the session.
        self._mistakes: list[tuple[str, bytes | tuple[bytes, bytes]]] = []

    def begin(self, mechanism: str, initial_response: str | None) -> Reply:
        self._mechanism, self._username = mechanism, None
        self.user = self.refused_user = None
        if mechanism == "CRAM-MD5":  # RFC 2195: the server speaks first, with a fresh challenge
            self._challenge = f"<{secrets.token_hex(12)}@{self.hostname}>".encode()
            self.waiting = True
            return smtp_reply(334, base64.b64encode(self._challenge).decode())
        if initial_response is None:
            self.waiting = True
            return AUTH_GO_ON if mechanism == "PLAIN" else AUTH_USERNAME
        return self.answer(initial_response)

    def answer(self, response: str) -> Reply:
        """The client's answer to a 334 challenge: a line of base64, or "*" to give up."""
        self.waiting, self.refused_user = False, None  # unless a further challenge is sent
        if response == "*":
            return AUTH_CANCELLED
        try:
            decoded = base64.b64decode(response.encode("ascii"), validate=True)
        except (UnicodeError, binascii.Error):
            return BAD_BASE64
        match self._mechanism:
            case "LOGIN" if self._username is None:
                self._username, self.waiting = decoded.decode("utf-8", "replace"), True
                return AUTH_PASSWORD
            case "LOGIN":
                return self.check_password(self._username, decoded)
            case "PLAIN":
                if (credentials := sasl_plain(decoded)) is None:
                    return BAD_BASE64
                return self.check_password(*credentials)
            case _:  # CRAM-MD5: "user hex(HMAC-MD5(password, challenge))"
                user, _, digest = decoded.decode("utf-8", "replace").rpartition(" ")
                return self.check_cram_md5(user, digest.lower().encode())

    def check_password(self, user: str, password: bytes) -> Reply:
        if self.guard is not None and self.guard.refuses(self.peer):
            return TOO_MANY_LOGIN_FAILURES  # even a right password: the guessing stops here
        if self.users is None or password_matches(self.users, user, password):
            return self.accepted(user)
        return self.refused(user, password)

    def check_cram_md5(self, user: str, digest: bytes) -> Reply:
        if self.guard is not None and self.guard.refuses(self.peer):
            return TOO_MANY_LOGIN_FAILURES
        known = self.users.get(user)
        expected = hmac.new((known or "\0 unknown").encode(), self._challenge, "md5")
        same = hmac.compare_digest(digest, expected.hexdigest().encode())
        if same and known is not None:
            return self.accepted(user)
        return self.refused(user, (self._challenge, digest))

    def accepted(self, user: str) -> Reply:
        self.user = user
        return AUTH_OK

    def refused(self, user: str, secret: bytes | tuple[bytes, bytes]) -> Reply:
        """A wrong password: the address's guard counts every one; the session counts only
        a mistake it has not seen, so one typo retried over three mechanisms is one."""
        if self.guard is not None:
            self.guard.failed(self.peer, user, "SMTP")
        mistake = (user, secret)
        if not any(same_mistake(mistake, earlier) for earlier in self._mistakes):
            self.failures += 1
            self._mistakes.append(mistake)
        elif isinstance(secret, bytes) and mistake not in self._mistakes:
            # A password that made an earlier CRAM-MD5 answer is kept too: the next CRAM-MD5
            # answer, to a new challenge, can be compared with it only. There is one such
            # password for each counted CRAM-MD5 mistake, so the list stays short.
            self._mistakes.append(mistake)
        self.refused_user = user
        return BAD_CREDENTIALS


def same_mistake(one: tuple, other: tuple) -> bool:
    """Whether two wrong credentials are the same user and password. A CRAM-MD5 answer
    (challenge, digest) hides its password, but a plain password shows whether it made that
    answer; two CRAM-MD5 answers to different challenges cannot be compared, and count apart."""
    (user, secret), (other_user, other_secret) = one, other
    if user != other_user:
        return False
    passwords = [s for s in (secret, other_secret) if isinstance(s, bytes)]
    answers = [s for s in (secret, other_secret) if isinstance(s, tuple)]
    if len(passwords) == 2:
        return hmac.compare_digest(*passwords)
    if len(answers) == 2:
        return answers[0] == answers[1]
    [password], [(challenge, digest)] = passwords, answers
    return hmac.compare_digest(hmac.new(password, challenge, "md5").hexdigest().encode(), digest)


class LoginGuard:
    """Failed logins, counted by client address across every session and protocol (SMTP,
    POP3, IMAP and the web), so that a guesser who opens a new connection every three
    guesses gets no further: past LOGIN_FAILURES_ALLOWED in LOGIN_FAILURE_WINDOW, logins from
    that address are refused, right password or not, until the oldest failures age out.
    Each address's failures are logged once a minute, as a warning (seen even with --quiet)."""

    def __init__(self) -> None:
        self._failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._unlogged: dict[str, list] = {}  # address -> [failures, user names, last logged]
        self._lock = threading.Lock()

    def refuses(self, peer: str) -> bool:
        with self._lock:
            failures = self._failures.get(peer)
            if failures is None:
                return False
            while failures and failures[0] < time.monotonic() - LOGIN_FAILURE_WINDOW:
                failures.popleft()
            return len(failures) >= LOGIN_FAILURES_ALLOWED

    def failed(self, peer: str, user: str, protocol: str) -> None:
        now = time.monotonic()
        with self._lock:
            failures = self._failures.setdefault(peer, collections.deque(
                maxlen=LOGIN_FAILURES_ALLOWED))
            failures.append(now)
            self._failures.move_to_end(peer)
            while len(self._failures) > LOGIN_ADDRESSES_KEPT:
                forgotten, _ = self._failures.popitem(last=False)
                self._unlogged.pop(forgotten, None)
            count, users, logged = self._unlogged.get(peer, [0, set(), -math.inf])
            count, users = count + 1, users | {user}
            if now - logged < LOGIN_LOG_INTERVAL:
                self._unlogged[peer] = [count, users, logged]
                return
            self._unlogged[peer] = [0, set(), now]
        log.warning("%d failed login%s from %s (%s as %s)", count, "s" * (count > 1), peer,
                    protocol, escape_for_log(", ".join(sorted(users))[:200]))


def sasl_plain(decoded: bytes) -> tuple[str, bytes] | None:
    """The user name and password of a PLAIN response (RFC 4616: authorization identity,
    NUL, user name, NUL, password), for SMTP AUTH and IMAP AUTHENTICATE; None if malformed."""
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[1].decode("utf-8", "replace"), parts[2]


def password_matches(users: dict[str, str], user: str, password: bytes) -> bool:
    """Whether the password is the user's. compare_digest takes as long whatever the bytes,
    and an unknown user is compared too, so the time an answer takes tells nothing about a
    password or a user name. (SMTP AUTH, POP3, IMAP and the web inbox all ask here.)"""
    known = users.get(user)
    same = hmac.compare_digest(password, (known or "\0 unknown").encode())
    return same and known is not None


def make_tls_context(config: Config):
    """The server's TLS settings: Python's defaults for a server (TLS 1.2 or later), with
    the configured certificate or a throwaway self-signed one."""
    if ssl is None:
        raise OSError("this Python was built without the ssl module")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if config.tls_cert:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        return context
    with tempfile.TemporaryDirectory(prefix="sheesh-tls-") as directory:
        cert, key = make_self_signed_certificate(config.hostname, Path(directory))
        context.load_cert_chain(cert, key)  # the key lives on only in memory
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
        fingerprint = ":".join(re.findall("..", digest.upper()))  # as openssl x509 shows it
    log.warning("using a self-signed certificate for %s, SHA-256 fingerprint %s",
                config.hostname, fingerprint)
    return context


def make_self_signed_certificate(hostname: str, directory: Path) -> tuple[Path, Path]:
    """A certificate valid 30 days for hostname and loopback, made with the openssl command
    (the ssl module can use certificates but not make them)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise OSError("--tls-self-signed needs the openssl command, which was not found")
    cert, key = directory / "cert.pem", directory / "key.pem"
    names = f"DNS:{hostname},DNS:localhost,IP:127.0.0.1,IP:::1"
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "30", "-subj", f"/CN={hostname}", "-addext",
         f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"openssl could not make a certificate: {last}")
    return cert, key


# ---------------------------------------------------------------------------------------------
# 10. Fault injection
#
# An app that sends mail must be tested against a server that says no, says "later", is slow,
# or hangs up. A rule says where it applies, what it matches, what happens, and how often:
#
#     STAGE [PATTERN]: ACTION [, FREQUENCY]
#
#     rcpt *@bounce.test: 550 5.1.1 No such user          every mail to @bounce.test bounces
#     data: 451 4.3.0 Try again later, 10%                one message in ten is deferred
#     end-of-data: disconnect                             hang up after the message, unanswered
#     mail: delay 5, first 3                              the first three MAILs wait 5 seconds
#
# STAGE is connect, ehlo, auth, mail, rcpt, data or end-of-data; PATTERN, for mail and rcpt
# only, is a shell-style pattern on the address; ACTION is a reply ("550 5.1.1 No such user"),
# "delay SECONDS" (then the command goes on as usual) or "disconnect"; FREQUENCY is "always"
# (the default), a percentage, or "first N". The first rule that matches and fires decides.
# ---------------------------------------------------------------------------------------------

FAULT_STAGES = ("connect", "ehlo", "auth", "mail", "rcpt", "data", "end-of-data")
FAULT_SYNTAX = "STAGE [PATTERN]: REPLY | delay SECONDS | disconnect [, always | N% | first N]"


@dataclass
class FaultRule:
    text: str  # the rule as written, which is also how it is shown
    stage: str
    pattern: str = ""  # fnmatch-style, on the MAIL or RCPT address; "" matches everything
    reply: Reply | None = None
    delay: float = 0.0
    disconnect: bool = False
    probability: float = 1.0
    times_left: int | None = None  # for "first N"

    def as_json(self) -> dict:
        action = ("disconnect" if self.disconnect else f"delay {self.delay:g}" if self.delay
                  else " ".join([str(self.reply.code), *self.reply.lines]))
        frequency = (f"first {self.times_left} (left)" if self.times_left is not None
                     else "always" if self.probability == 1 else f"{self.probability * 100:g}%")
        return {"rule": self.text, "stage": self.stage, "match": self.pattern,
                "action": action, "frequency": frequency}


def parse_fault(text: str) -> FaultRule:
    """A rule from its one-line form; ValueError, saying what is wrong, if it is not one."""
    head, colon, tail = text.partition(":")
    stage, _, pattern = head.strip().partition(" ")
    if not colon or stage.lower() not in FAULT_STAGES:
        raise ValueError(f"{text!r} is not a rule: {FAULT_SYNTAX}, where STAGE is one of "
                         f"{', '.join(FAULT_STAGES)}")
    rule = FaultRule(" ".join(text.split()), stage.lower(), pattern.strip().lower())
    if rule.pattern and rule.stage not in ("mail", "rcpt"):
        raise ValueError(f"{text!r}: only mail and rcpt rules take an address pattern")
    action, frequency = tail.strip(), "always"
    # Numbers in ASCII digits only, and of a sane size; a reply's text in printable ASCII (a
    # CR in it would end the reply line early and write whatever follows as another reply).
    found = re.search(r",\s*(always|[0-9]{1,3}(?:\.[0-9]{1,6})?%|first\s+[0-9]{1,9})\s*$",
                      action, re.I)
    if found:
        action, frequency = action[:found.start()].strip(), found.group(1).lower()
    if frequency.endswith("%"):
        rule.probability = min(float(frequency[:-1]) / 100, 1.0)
    elif frequency.startswith("first"):
        rule.times_left = int(frequency.split()[1])
    if action.lower() == "disconnect":
        rule.disconnect = True
    elif found := re.fullmatch(r"delay\s+([0-9]{1,9}(?:\.[0-9]{1,6})?)", action, re.I):
        rule.delay = float(found.group(1))
    elif found := re.fullmatch(r"([45][0-9][0-9])(?:\s+([!-~][ -~]*))?", action):
        rule.reply = smtp_reply(int(found.group(1)), found.group(2) or "Error: failure injected")
    else:
        raise ValueError(f"{text!r}: the action must be a 4xx or 5xx reply, "
                         "'delay SECONDS' or 'disconnect'")
    return rule


def fault_from_json(value) -> FaultRule:
    """A rule from the API: its one-line form, or an object with the same parts by name."""
    if isinstance(value, str):
        return parse_fault(value)
    if not isinstance(value, dict) or not {"stage", "action"} <= value.keys():
        raise ValueError('a rule is a string, or an object with "stage", "action" and '
                         'optionally "match" and "frequency"')
    text = f'{value["stage"]} {value.get("match", "")}: {value["action"]}, ' \
           f'{value.get("frequency", "always")}'
    return parse_fault(text)


class FaultPlan:
    """The rules in force, shared by every session; replaced at run time through the API. A
    delay may be at most max_delay (the server's --timeout): a client would have hung up
    long before, and its connection slot held for nothing."""

    def __init__(self, rules: list[FaultRule] = (), seed: int | None = None,
                 max_delay: float = DEFAULT_TIMEOUT) -> None:
        self._lock = threading.Lock()
        self.max_delay = max_delay
        self.generation = 0  # bumped by every replace(): a delay under way ends with its rule
        self.replace(rules, seed)

    def replace(self, rules: list[FaultRule], seed: int | None = None) -> None:
        """Put these rules in force; ValueError (and nothing changed) if one cannot run."""
        for rule in rules:
            if rule.delay > self.max_delay:
                raise ValueError(f"{rule.text!r}: a delay is at most {self.max_delay:g} seconds "
                                 "(the --timeout): the client would have gone by then")
        with self._lock:
            self.rules, self.seed = list(rules), seed
            self._random = random.Random(seed)  # a seed makes a run of chances repeatable
            self.generation += 1

    def decide(self, stage: str, subject: str = "") -> FaultRule | None:
        if not self.rules:
            return None
        with self._lock:
            for rule in self.rules:
                if rule.stage != stage or not fnmatch.fnmatchcase(subject.lower(),
                                                                   rule.pattern or "*"):
                    continue
                if rule.times_left is not None:
                    if rule.times_left == 0:
                        continue
                    rule.times_left -= 1
                elif rule.probability < 1 and self._random.random() >= rule.probability:
                    continue
                return rule
        return None

    def as_json(self) -> dict:
        with self._lock:
            return {"seed": self.seed, "rules": [rule.as_json() for rule in self.rules]}


# ---------------------------------------------------------------------------------------------
# 11. Transcripts
#
# The handler keeps each session's transcript: what the client said (as the session shows it:
# no password, no message), what sheesh answered, and what happened around it (TLS, a timeout).
# A developer whose app "sends no mail" reads it in the web inbox. The Store keeps them.
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_SESSIONS = 1000  # session transcripts kept (section 11)


TRANSCRIPT_LIMIT = 8 * 1024  # characters of conversation kept per session; the rest is counted
TRANSCRIPT_LINE_LIMIT = 300  # characters of one line
TRANSCRIPT_KEYS_KEPT = 100  # messages a transcript names (a session may store thousands)


@dataclass
class Transcript:
    """One session's conversation, for people: bounded, without secrets or message bodies.
    Recording is cheap, since every session keeps one: a line is a reference and a time, and
    text is made only when someone reads it."""

    protocol: str  # SMTP, POP3, IMAP
    peer: str
    started: float = field(default_factory=time.time)
    id: int = 0  # given by the store
    tls: str | None = None
    user: str | None = None
    ended: float | None = None
    stored: list[str] = field(default_factory=list)  # keys of the messages it stored
    stored_count: int = 0
    refused: int = 0  # replies that refused something
    first_refusal: object = None  # the first of them, made text only when asked for
    error: str | None = None  # how it ended, if not as it should
    lines: list = field(default_factory=list)  # (seconds since start, who, text or reply)
    left_out: int = 0  # lines past TRANSCRIPT_LIMIT
    _size: int = 0

    def client(self, text: str) -> None:
        self._add("client", text, len(text))

    def server(self, reply) -> None:
        if reply.refusal:
            self.refused += 1
            if self.first_refusal is None:
                self.first_refusal = reply
        self._add("server", reply, 40)

    def note(self, text: str) -> None:
        """What sheesh did or saw: TLS, a fault rule, a limit, a timeout."""
        self._add("sheesh", text, len(text))

    def message(self, size: int, key: str | None) -> None:
        if key is not None:
            self.stored_count += 1
            if len(self.stored) < TRANSCRIPT_KEYS_KEPT:
                self.stored.append(key)
        if self._size >= TRANSCRIPT_LIMIT:
            self.left_out += 1
        else:
            self.client(f"<{size:,} octets of message, "
                        f"{f'stored as {key}' if key else 'not stored'}>")

    def _add(self, who: str, item, size: int) -> None:
        if self._size >= TRANSCRIPT_LIMIT:
            self.left_out += 1
            return
        self._size += size
        self.lines.append((time.time() - self.started, who, item))

    @property
    def outcome(self) -> str:
        """error (it ended badly), refused (something was), stored, or none."""
        if self.error:
            return "error"
        return "refused" if self.refused else "stored" if self.stored_count else "none"

    def summary(self) -> dict:
        return {"id": self.id, "protocol": self.protocol, "peer": self.peer,
                "started": self.started, "ended": self.ended, "open": self.ended is None,
                "tls": self.tls, "user": self.user, "outcome": self.outcome,
                "error": self.error or self.refusal(), "messages": self.stored_count}

    def refusal(self) -> str | None:
        """Why a refused session was: its first refusal, as the client was told it."""
        if self.first_refusal is None:
            return None
        lines = self.first_refusal.transcript_lines()
        return f"refused: {lines[-1] if lines else ''}"[:TRANSCRIPT_LINE_LIMIT]

    def as_json(self) -> dict:
        """As the API gives it (JSON escapes what a terminal would act on; the page shows
        text as text)."""
        lines = []
        for at, who, item in list(self.lines):
            texts = [item] if isinstance(item, str) else item.transcript_lines()
            lines += [{"t": round(at, 3), "from": who, "text": text[:TRANSCRIPT_LINE_LIMIT]}
                      for text in texts]
        if self.left_out:
            lines.append({"t": None, "from": "sheesh", "text": f"({self.left_out:,} more lines "
                          f"not kept: a transcript keeps {TRANSCRIPT_LIMIT:,} characters)"})
        return {**self.summary(), "stored": list(self.stored), "transcript": lines}


# ---------------------------------------------------------------------------------------------
# 12. The index: one picture of the Maildir for every reader
#
# 12.1 reads a stored message back (without holding it in memory), 12.2 is the index, 12.3 its
# search syntax, 12.4 the Store that keeps the index in step with the folders and serves the
# web inbox, POP3, IMAP, the relay and the in-process API alike, and 12.5 checks a message for
# what real servers will object to.
# ---------------------------------------------------------------------------------------------


# -- 12.1 Reading a stored message ------------------------------------------------------------
#
# A reader must not hold a whole message in memory, nor read a part that it does not return: a
# 40 MB attachment is not read to show the text beside it. So a message is read through its
# outline: where each MIME part (RFC 2045, 2046) starts and ends in the file, found with
# bytes.find() on the boundaries, which runs in C. Messages up to a megabyte are read whole
# (that is faster than mapping them); larger ones are mapped, so that the operating system
# reads only the pages a reader touches.

# How far into a message sheesh looks for its Subject (for the log line).
HEADER_SCAN_LIMIT = 64 * 1024
MIME_DEPTH_LIMIT = 16  # multiparts nested deeper than this are read as one part
MIME_PARTS_LIMIT = 1000  # and a message with more parts lists only the first ones


@contextlib.contextmanager
def message_bytes(file):
    """The file's bytes, as bytes or as a read-only map: both have find() and slices."""
    size = os.fstat(file.fileno()).st_size
    if size <= READ_WHOLE_LIMIT:
        yield file.read()
        return
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield mapped


def count_in(buffer, needle: bytes, start: int = 0, end: int | None = None) -> int:
    """bytes.count() for a map too (which has no count), a megabyte at a time."""
    end = len(buffer) if end is None else end
    if isinstance(buffer, bytes):
        return buffer.count(needle, start, end)
    total, step = 0, 1 << 20
    for window in range(start, end, step):  # a needle across two windows is seen by the first
        total += buffer[window:min(window + step + len(needle) - 1, end)].count(needle)
    return total


def crlf_size(buffer) -> int:
    """The message's size as POP3 and IMAP send it, every line ending in CRLF (RFC 1939
    section 11, RFC 3501 section 2.3.1.1): a bare LF counts one more, and a last line
    without its line ending two more."""
    if not len(buffer):
        return 0
    bare_lf = count_in(buffer, b"\n") - count_in(buffer, b"\r\n")
    return len(buffer) + bare_lf + (0 if buffer[-1:] == b"\n" else 2)


def with_crlf(data: bytes) -> bytes:
    """A message as POP3 and IMAP send it: every line ending in CRLF, the last one too."""
    if data.count(b"\n") != data.count(b"\r\n"):
        data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def crlf_chunks(file):
    """A message's file as POP3 and IMAP send it (with_crlf), in pieces that each begin a
    line, so that dot-stuffing or counting lines can go piece by piece."""
    carry = b""
    for block in iter(functools.partial(file.read, READ_SIZE), b""):
        block = carry + block
        cut = block.rfind(b"\n") + 1
        lines, carry = block[:cut], block[cut:]
        if lines:
            yield with_crlf(lines)
    if carry:
        yield with_crlf(carry)


# The headers of every part are parsed by this one parser. compat32 because it is ten times
# faster than policy.default (33 against 352 microseconds for an attachment's three headers);
# the values are decoded for people by decode_words().
_HEADER_PARSER = email.parser.HeaderParser(policy=email.policy.compat32)


# A header section is parsed this far: the email package takes about a second a megabyte of
# header lines, and real ones (a long Received chain, DKIM) are a few KiB.
HEADER_PARSE_LIMIT = 128 * 1024


def parse_headers(raw: bytes) -> email.message.Message:
    """A header block, its first HEADER_PARSE_LIMIT octets. Raw 8-bit bytes are UTF-8 (RFC
    6532); what is not becomes U+FFFD."""
    return _HEADER_PARSER.parsestr(raw[:HEADER_PARSE_LIMIT].decode("utf-8", "replace"))


HEADER_DECODE_LIMIT = 16 * 1024  # characters of a value decoded: the email package's decoder
# is quadratic on folded encoded-words (1.6 MB of them took 15 s), and no reader shows more


def decode_words(text: str) -> str:
    """A header value for people: unfolded, and decoded from RFC 2047 encoded-words
    (=?UTF-8?B?...?=), its first HEADER_DECODE_LIMIT characters. Never an exception,
    whatever the value holds."""
    text = text[:HEADER_DECODE_LIMIT]
    if "\n" in text:
        text = re.sub(r"\r?\n(?=[ \t])", "", text)
    text = text.strip()
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (ValueError, LookupError, email.errors.MessageError):
            pass
    return text


def header_bounds(buffer, start: int, end: int) -> tuple[int, int]:
    """Where a header block ends (after its last line ending) and the body begins."""
    if buffer[start:start + 2] == b"\r\n":
        return start, start + 2  # no headers at all
    if buffer[start:start + 1] == b"\n":
        return start, start + 1
    crlf = buffer.find(b"\r\n\r\n", start, end)
    lf = buffer.find(b"\n\n", start, crlf + 1 if crlf >= 0 else end)  # bare LFs, before it?
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 2, crlf + 4
    if lf >= 0:
        return lf + 1, lf + 2
    return end, end


# A part's own headers, found as the index's are (see scan_headers); its other headers are
# parsed only when asked for (IMAP's BODYSTRUCTURE and MIME sections).
_PART_HEADER = re.compile(
    rb"^(content-type|content-disposition|content-transfer-encoding|content-id)[ \t]*:[ \t]*"
    rb"(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def value_and_parameters(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type or Content-Disposition (RFC 2045 section 5.1) as its lower-case value
    and its parameters; "type/subtype; charset=utf-8" gives ("type/subtype", {"charset":
    "utf-8"}). Parameter names in lower case; quoted values unquoted."""
    main, _, rest = value.partition(";")
    parameters: dict[str, str] = {}
    for name, raw in _PARAMETER.findall(";" + rest):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) > 1:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        parameters.setdefault(name.lower(), raw)
    return main.strip().lower(), parameters


class MimePart:
    """One part of a message, by where it lies in the stored bytes."""

    def __init__(self, buffer, start: int, end: int, default_type: str = "text/plain") -> None:
        header_end, self.body_start = header_bounds(buffer, start, end)
        self.start, self.end = start, end  # the line ending before a boundary is not its own
        self.raw_headers = bytes(buffer[start:header_end])
        self.parts: list[MimePart] = []  # of a multipart, or the message in a message/rfc822
        fields = {name.lower(): re.sub(r"\r?\n[ \t]+", " ", value.decode("utf-8", "replace"))
                  for name, value in reversed(_PART_HEADER.findall(self.raw_headers))}
        content_type, self.parameters = value_and_parameters(fields.get(b"content-type", ""))
        # RFC 2045 section 5.2: without a valid Content-Type, text/plain (or the multipart's
        # default for its parts: message/rfc822 in a multipart/digest).
        if b"content-type" not in fields:
            content_type = default_type
        elif content_type.count("/") != 1 or " " in content_type:
            content_type = "text/plain"
        self.content_type = content_type
        disposition, self.disposition_parameters = value_and_parameters(
            fields.get(b"content-disposition", ""))
        self.disposition = disposition or None
        self.transfer_encoding = fields.get(b"content-transfer-encoding", "7bit").strip().lower()
        self.content_id = fields.get(b"content-id", "").strip().removeprefix("<").removesuffix(
            ">")

    @functools.cached_property
    def headers(self) -> email.message.Message:
        return parse_headers(self.raw_headers)

    @property
    def filename(self) -> str | None:
        name = self.disposition_parameters.get("filename") or self.parameters.get("name")
        if name is None and any("*" in key for key in [*self.parameters,
                                                      *self.disposition_parameters]):
            try:  # RFC 2231's name*=utf-8''... and continuations: the email package knows them
                name = self.headers.get_filename()
            except (ValueError, LookupError, TypeError):
                name = None
        return decode_words(name) if name else None

    @property
    def charset(self) -> str:
        return self.parameters.get("charset", "").strip().lower() or "utf-8"

    @property
    def inline(self) -> bool:
        """A part the HTML shows by its Content-ID (RFC 2392: a cid: image), not a file the
        reader is meant to save: it is not counted or listed as an attachment."""
        return bool(self.content_id) and self.disposition != "attachment"

    def leaves(self, into_messages: bool = False):
        """The parts that hold content, in order; a message/rfc822 part counts as one, or,
        `into_messages`, its message's parts do (what IMAP's SEARCH BODY reads)."""
        if self.parts and (self.content_type.startswith("multipart/") or (
                into_messages and self.content_type in RFC822_TYPES)):
            for part in self.parts:
                yield from part.leaves(into_messages)
        else:
            yield self


def outline(buffer, start: int = 0, end: int | None = None, *, default_type: str = "text/plain",
            depth: int = 0, budget: list | None = None) -> MimePart:
    """The MIME structure of the bytes between start and end (all of them by default)."""
    end = len(buffer) if end is None else end
    budget = [MIME_PARTS_LIMIT] if budget is None else budget
    budget[0] -= 1
    part = MimePart(buffer, start, end, default_type)
    if depth >= MIME_DEPTH_LIMIT or budget[0] <= 0:
        return part
    boundary = part.parameters.get("boundary") if part.content_type.startswith(
        "multipart/") else None
    if boundary:
        child_type = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
        for child_start, child_end in multipart_bounds(buffer, part.body_start, end, boundary):
            if budget[0] <= 0:
                break
            part.parts.append(outline(buffer, child_start, child_end, default_type=child_type,
                                      depth=depth + 1, budget=budget))
    elif part.content_type in ("message/rfc822", "message/global"):
        part.parts.append(outline(buffer, part.body_start, end, depth=depth + 1, budget=budget))
    return part


def multipart_bounds(buffer, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """Where each body part of a multipart lies (RFC 2046 section 5.1.1): between delimiter
    lines, "--" and the boundary at the start of a line; "--boundary--" closes the last. The
    line ending before a delimiter belongs to the delimiter, not to the part above it."""
    delimiter = b"--" + boundary.encode("utf-8", "replace")
    bounds, part_start, position = [], None, start
    while position < end:
        if position == start and buffer[start:start + len(delimiter)] == delimiter:
            found = start
        else:
            found = buffer.find(b"\n" + delimiter, position, end)
            if found < 0:
                break
            found += 1
        line_end = buffer.find(b"\n", found, end)
        line_end = end if line_end < 0 else line_end + 1
        rest = bytes(buffer[found + len(delimiter):line_end]).rstrip(b" \t\r\n")
        position = line_end
        if rest not in (b"", b"--"):
            continue  # a line that only begins like the delimiter
        if part_start is not None:
            before = found - 2 if buffer[found - 2:found] == b"\r\n" else found - 1
            bounds.append((part_start, max(before, part_start)))
        if rest == b"--":
            return bounds
        part_start = line_end
    if part_start is not None:  # never closed: the last part runs to the end
        bounds.append((part_start, end))
    return bounds


def decoded_chunks(buffer, part: MimePart, size: int = 1 << 20):
    """A part's body, decoded from base64 or quoted-printable, a piece at a time."""
    return decode_range(buffer, part.body_start, part.end, part.transfer_encoding, size)


def decode_range(buffer, start: int, end: int, encoding: str, size: int = 1 << 20):
    """The bytes between start and end, decoded from their Content-Transfer-Encoding (RFC
    2045 section 6), a piece of at most `size` encoded bytes at a time."""
    position, carry = start, b""
    while position < end:
        chunk = carry + bytes(buffer[position:min(position + size, end)])
        position += size
        if encoding == "base64":
            chunk = chunk.translate(None, b" \t\r\n")
            cut = len(chunk) if position >= end else len(chunk) - len(chunk) % 4
            chunk, carry = chunk[:cut], chunk[cut:]
            yield decode_base64(chunk)
        elif encoding == "quoted-printable":
            cut = len(chunk) if position >= end else chunk.rfind(b"\n") + 1
            if not cut:  # a line longer than a piece: cut it, but not inside an =XX escape
                cut = len(chunk) - 2 + chunk[-2:].rfind(b"=") if b"=" in chunk[-2:] else len(chunk)
            chunk, carry = chunk[:cut], chunk[cut:]
            yield binascii.a2b_qp(chunk)
        else:
            yield chunk


def decode_base64(data: bytes) -> bytes:
    """Base64 as mail readers decode it: stray characters skipped, missing padding forgiven."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        data = data[:len(data) - len(data) % 4] if len(data) % 4 == 1 else data + b"=" * (
            -len(data) % 4)
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            return b""


SHOWN_TEXT_LIMIT = 1024 * 1024  # characters of a text or HTML part that a view shows


def part_bytes(buffer, part: MimePart) -> bytes:
    return b"".join(decoded_chunks(buffer, part))


def part_text(buffer, part: MimePart, limit: int) -> str:
    """About the first `limit` characters of a text part, decoded in its charset (an unknown
    one is read as UTF-8)."""
    return text_start(buffer, part.body_start, part.end, part.transfer_encoding, part.charset,
                      limit)


def shown_text(name: str, buffer, part: MimePart | None) -> dict:
    """A text or HTML part as a reader is given it, `name` and `name_cut` (whether it was cut):
    the first SHOWN_TEXT_LIMIT characters, so that a 10 MB part costs each view a bounded
    amount of memory (the whole message is at /raw)."""
    if part is None:
        return {name: "", f"{name}_cut": False}
    text = part_text(buffer, part, SHOWN_TEXT_LIMIT + 1)
    cut = len(text) > SHOWN_TEXT_LIMIT
    return {name: text[:SHOWN_TEXT_LIMIT].replace("\r\n", "\n"), f"{name}_cut": cut}


def text_start(buffer, start: int, end: int, encoding: str, charset: str, limit: int) -> str:
    """The first `limit` characters of a text, decoded: read a piece at a time, so that the
    start of a 50 MB part costs no more than the start of a small one."""
    decoder = text_decoder(charset)
    pieces, length = [], 0
    for chunk in decode_range(buffer, start, end, encoding, size=min(limit + 4, 1 << 20)):
        pieces.append(decoder.decode(chunk))
        length += len(pieces[-1])
        if length >= limit:
            break
    else:
        pieces.append(decoder.decode(b"", final=True))
    return "".join(pieces)[:limit]


def text_decoder(charset: str) -> codecs.IncrementalDecoder:
    """A decoder for a charset; an unknown charset is read as UTF-8, and wrong bytes as U+FFFD."""
    try:
        return codecs.getincrementaldecoder(charset)("replace")
    except LookupError:
        return codecs.getincrementaldecoder("utf-8")("replace")


def decoded_size(buffer, part: MimePart) -> int:
    """The size of a part once decoded, without keeping it: for base64, from its length."""
    if part.transfer_encoding == "base64":
        encoded = sum(len(bytes(buffer[at:min(at + (1 << 20), part.end)]).translate(
            None, b" \t\r\n=")) for at in range(part.body_start, part.end, 1 << 20))
        return encoded * 3 // 4
    return sum(len(chunk) for chunk in decoded_chunks(buffer, part))


@dataclass
class MessageParts:
    """What a message holds for a reader: its text, its HTML, and everything else."""

    text: MimePart | None
    html: MimePart | None
    attachments: list[MimePart]


def message_parts(root: MimePart) -> MessageParts:
    """The first text/plain and text/html parts that are not attachments are the message's
    text and HTML; every other part is an attachment (images, files, forwarded messages)."""
    parts = MessageParts(None, None, [])
    for leaf in root.leaves():
        is_body = leaf.disposition != "attachment" and leaf.filename is None
        if is_body and leaf.content_type == "text/plain" and parts.text is None:
            parts.text = leaf
        elif is_body and leaf.content_type == "text/html" and parts.html is None:
            parts.html = leaf
        else:
            parts.attachments.append(leaf)
    return parts


def attachment_name(part: MimePart, number: int) -> str:
    """An attachment's file name, fit to be shown and to be a download's name: its last path
    component only, without control characters, nor Unicode's format characters (category
    Cf), which can turn "invoice\u202efdp.exe" into what looks like "invoiceexe.pdf"."""
    name = (part.filename or "").replace("\\", "/").rpartition("/")[2]
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f"
                   and unicodedata.category(ch) != "Cf")
    return name or f"attachment-{number + 1}"


# Messages for people, in full: the in-process API's StoredMessage.message.
_MESSAGE_PARSER = email.parser.BytesParser(policy=email.policy.default)


class StoredMessage:
    """A message in the store: what the index knows of it, and its file for the rest."""

    def __init__(self, store: Store, summary: Summary) -> None:
        self.store, self.summary = store, summary
        self.key, self.uid = summary.key, summary.uid
        self.sender, self.recipients = summary.sender, summary.recipients

    def __repr__(self) -> str:
        return f"<StoredMessage {self.key} from {self.sender!r} to {self.recipients!r}>"

    @property
    def path(self) -> Path:
        """Where its file is now (it moves when it is read or flagged)."""
        location = self.store.locate(self.key) or self.summary.location
        return Path(self.store.maildir.file_path(location))

    def open(self):
        """Its file, for reading; LookupError if the message is gone."""
        return self.store.open_file(self.key)

    @property
    def raw(self) -> bytes:
        with self.open() as file:
            return file.read()

    def checks(self) -> list[Finding]:
        """What real mail servers will say of it (12.5): an empty list for a clean message."""
        return self.store.checks(self.summary) or []

    @functools.cached_property
    def message(self) -> EmailMessage:
        """The whole message parsed by the email package (for tests: it reads every byte)."""
        with self.open() as file:
            return _MESSAGE_PARSER.parse(file)


# -- 12.2 The index ---------------------------------------------------------------------------
#
# Every reader asks the index, not the folders: which messages there are, in what order, what
# each is about, which match a search. It lives beside the Maildir, as Dovecot keeps its
# dovecot.index, in one SQLite file (sheesh.index in the Maildir's root, which mutt and the
# mailbox module ignore). The Maildir stays the source of truth: the index holds nothing that
# cannot be read again from the files, so a missing, corrupt or foreign index file is set aside
# and built again. A Python built without sqlite3 keeps the same index in memory instead.
#
# Each message has a UID: a number given in arrival order and never given again, as IMAP
# requires (RFC 3501 section 2.3.1.1), with a UIDVALIDITY that changes only when the index is
# built anew (and UIDs with it). A modification sequence, bumped by each change, tells IMAP
# sessions what changed since they last looked.

DATABASE_ERRORS = (sqlite3.DatabaseError,) if sqlite3 is not None else ()
INDEX_RETRY_MAX = 30.0  # seconds between two tries of an index that goes on failing


class UidsRenumbered(Exception):
    """The index was built anew: UIDs from before name other messages, or none."""


def index_damaged(error: Exception) -> bool:
    """Whether an index error means the file is damaged, and only a new one will do: not a
    database, a malformed page, a table gone. A locked, full, read-only or failing disk is
    not damage: it passes, and the index is still right when it does."""
    name = getattr(error, "sqlite_errorname", "")  # Python 3.11+
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    text = str(error)
    return name == "SQLITE_ERROR" and text.startswith(("no such table", "no such column")) or (
        not name and ("malformed" in text or "not a database" in text))


INDEX_FILE = "sheesh.index"
INDEX_APPLICATION_ID = 0x73687368  # "shsh", so that a foreign SQLite file is recognised
INDEX_VERSION = 2
SEARCH_TEXT_LIMIT = 2048  # search sees this many characters of each message's text
INDEX_HEAD_LIMIT = 64 * 1024  # headers longer than this are not read for the index
READER_CACHE_KIB = 512
INDEX_BATCH = 500  # messages indexed per transaction while the index is built
EXPUNGED_KEPT = 100_000  # removals remembered for IMAP sessions, by modification sequence


@dataclass
class Summary:
    """What the index knows of one message: enough to list, search and serve it."""

    uid: int
    key: str
    location: str  # "new/KEY" or "cur/KEY:2,FLAGS"
    flags: str  # Maildir flags: "S" seen, "R" replied, "F" flagged, "T" trashed, "D" draft
    time: float  # when it arrived
    size: int  # its file, in bytes
    crlf_size: int  # as POP3 and IMAP send it
    sender: str  # the envelope: the reverse-path...
    recipients: list[str]  # ...and the forward-paths, from the trace headers
    from_: str = ""
    to: str = ""
    cc: str = ""
    subject: str = ""
    date: str = ""
    message_id: str = ""
    attachments: list[str] = field(default_factory=list)  # their file names
    modseq: int = 0
    dsn: dict | None = None  # what the client asked of delivery notifications (RFC 3461)
    checks: dict | None = None  # findings by severity (12.5), once someone has looked
    keywords: str = ""  # IMAP's keywords ($Important, $Label1), one space apart

    @property
    def seen(self) -> bool:
        return "S" in self.flags

    def as_json(self) -> dict:
        return {"id": self.key, "uid": self.uid, "time": self.time, "size": self.size,
                "sender": self.sender, "recipients": self.recipients, "from": self.from_,
                "to": self.to, "cc": self.cc, "subject": self.subject, "date": self.date,
                "message_id": self.message_id, "attachments": len(self.attachments),
                "seen": self.seen, "flags": self.flags, "dsn": self.dsn,
                "checks": self.checks, "keywords": self.keywords.split()}


@dataclass
class IndexEntry:
    """A message read for the index: its summary, and the text that search looks through."""

    summary: Summary
    body: str

    def texts(self) -> tuple[str, str, str, str]:
        """What search matches, by column: who sent it, who it is for, subject, text."""
        s = self.summary
        return (f"{s.sender} {s.from_}", " ".join(s.recipients + [s.to, s.cc]), s.subject,
                self.body)

    def columns(self) -> tuple[str, ...]:
        """The texts as the search table takes them: folded (see SEARCH_FOLDING)."""
        return tuple(map(search_text, self.texts()))

    @functools.cached_property
    def tokens(self) -> list[list[str]]:
        """The columns' words, made once for all the waiters that look at this message."""
        return [search_tokens(text) for text in self.texts()]


# The headers the index keeps, found by one regular expression that runs in C. Indexing reads
# every message once, and the email package spends ten times as long on a message's headers
# (40 microseconds against 4 on the benchmark's messages): for 100,000 messages, seconds.
_INDEXED_HEADER = re.compile(
    rb"^(return-path|delivered-to|x-sheesh-dsn|received|from|to|cc|subject|date|message-id|"
    rb"content-type|"
    rb"content-transfer-encoding|content-disposition)[ \t]*:[ \t]*(.*(?:\n[ \t].*)*)",
    re.IGNORECASE | re.MULTILINE)


def scan_headers(head: bytes) -> dict[bytes, list[bytes]]:
    """The indexed headers of a header block, unfolded, by lower-case name. Return-Path,
    Delivered-To and X-Sheesh-DSN count only above the first Received: they are sheesh's
    envelope."""
    found: dict[bytes, list[bytes]] = {}
    received = False
    for name, value in _INDEXED_HEADER.findall(head):
        name = name.lower()
        if name == b"received":
            received = True
        elif not (received and name in (b"return-path", b"delivered-to", b"x-sheesh-dsn")):
            if b"\n" in value:
                value = re.sub(rb"\r?\n[ \t]+", b" ", value)
            found.setdefault(name, []).append(value.strip())
    return found


def index_entry(uid: int, key: str, location: str, flags: str, time_: float, buffer) -> IndexEntry:
    """Read a stored message for the index: the headers the list shows, the envelope, the
    attachments' names, the size as sent over POP3 and IMAP, and the start of its text."""
    header_end, body_start = header_bounds(buffer, 0, min(len(buffer), INDEX_HEAD_LIMIT))
    headers = scan_headers(bytes(buffer[:header_end]))

    def first(name: bytes) -> str:
        values = headers.get(name)
        return decode_words(values[0].decode("utf-8", "replace")) if values else ""

    def address(value: bytes) -> str:
        return value.decode("utf-8", "replace").strip().removeprefix("<").removesuffix(">")

    summary = Summary(uid, key, location, flags, time_, len(buffer), crlf_size(buffer),
                      address(headers.get(b"return-path", [b""])[0]),
                      [address(value) for value in headers.get(b"delivered-to", [])],
                      first(b"from"), first(b"to"), first(b"cc"), first(b"subject"),
                      first(b"date"), first(b"message-id"))
    summary.dsn = parse_dsn_lines(headers.get(b"x-sheesh-dsn", []))
    content_type = headers.get(b"content-type", [b""])[0].lower()
    disposition = headers.get(b"content-disposition", [b""])[0].lower()
    if content_type.lstrip().startswith(b"multipart/") or disposition.startswith(
            b"attachment"):
        parts = message_parts(outline(buffer))
        summary.attachments = [attachment_name(part, n) for n, part in
                               enumerate(parts.attachments) if not part.inline]
        body = parts.text or parts.html
        text = part_text(buffer, body, SEARCH_TEXT_LIMIT) if body is not None else ""
        html = body is parts.html and body is not None
    else:  # one part: the common case, read without the email package (see scan_headers)
        is_text = not content_type.strip() or content_type.lstrip().startswith(b"text/")
        encoding = headers.get(b"content-transfer-encoding", [b"7bit"])[0].strip().lower()
        charset = re.search(rb'charset\s*=\s*"?([^";\s]+)', content_type)
        text = text_start(buffer, body_start, len(buffer), encoding.decode("ascii", "replace"),
                          charset.group(1).decode("ascii", "replace") if charset else "utf-8",
                          SEARCH_TEXT_LIMIT) if is_text else ""
        html = b"html" in content_type
    if html:
        text = html_to_text(text)
    return IndexEntry(summary, text)


def parse_dsn_lines(values: list[bytes]) -> dict | None:
    """The X-Sheesh-DSN lines back as {"ret", "envid", "recipients": {address: {"notify",
    "orcpt"}}}; None if the client asked for nothing."""
    if not values:
        return None
    dsn = {"ret": None, "envid": None, "recipients": {}}
    for value in values:
        text = value.decode("utf-8", "replace")
        recipient = None
        if text.startswith("<"):  # a recipient's line; its address may be quoted ("a b"@c)
            end = path_end(text)
            recipient, text = text[1:end], text[end + 1:]
        fields = dict(word.partition("=")[::2] for word in text.split())
        if recipient is None:
            dsn.update((name.lower(), field) for name, field in fields.items())
        else:
            dsn["recipients"][recipient] = {
                "notify": fields["NOTIFY"].split(",") if "NOTIFY" in fields else None,
                "orcpt": fields.get("ORCPT")}
    return dsn


def html_to_text(html: str) -> str:
    """Roughly the words a person sees in an HTML part: enough for search."""
    html = re.sub(r"(?is)<(style|script)\b.*?</\1\s*>", " ", html)
    return re.sub(r"\s+", " ", html_unescape(re.sub(r"<[^>]*>", " ", html))).strip()


def subject_of(head: bytes) -> str:
    """A just-delivered message's Subject, decoded, for the log line; "" if it has none."""
    subject = scan_headers(head[:header_bounds(head, 0, len(head))[0]]).get(b"subject")
    return decode_words(subject[0].decode("utf-8", "replace")) if subject else ""


# -- 12.3 The search syntax -------------------------------------------------------------------
#
# The syntax people know from Mailpit: plain words match anything (a word matches a word that
# starts with it), "a quoted phrase" matches those words in a row, and a field narrows a term:
#
#     from:app@example.com   to:user@example.com   subject:welcome   is:unread   is:read
#     has:attachment   before:2026-11-30   after:2026-11-01T08:00   -word (not)   -from:x
#
# Addresses and words match the envelope and the headers alike: to: looks at the envelope's
# recipients and at To and Cc. Dates are the server's local time; after: includes its day,
# before: does not. Terms are all required.

SEARCH_FIELDS = ("from", "to", "subject", "is", "has", "before", "after")
# The last word of each term is a prefix, which SQLite's full-text index reads the list of every
# matching word for: "a" is most of the index. "a" 25 times took 13.6 s of CPU on 20,000
# messages, so a search has at most so many words, and at most so many terms that end in a word
# of one or two letters (a kana, an ideograph or an emoji is a whole word: see SEARCH_FOLDING).
SEARCH_WORDS_LIMIT = 16
SEARCH_SHORT_WORDS_LIMIT = 3


class BadQuery(ValueError):
    pass


@dataclass(frozen=True)
class Condition:
    kind: str  # "words" (in `field`), "seen", "attachment", "before", "after"
    field: str = ""  # for words: "", "from", "to" or "subject"
    value: object = None  # the words (a tuple), True/False for seen, a Unix time for dates
    negated: bool = False


@dataclass(frozen=True)
class Query:
    conditions: tuple[Condition, ...] = ()

    def could_match(self, words: list[str]) -> bool:
        """Whether messages whose words (sorted) are these could match: each word the query
        requires begins one of them."""
        for condition in self.conditions:
            if condition.kind == "words" and not condition.negated:
                for word in condition.value:
                    at = bisect.bisect_left(words, word)
                    if at == len(words) or not words[at].startswith(word):
                        return False
        return True

    def matches(self, entry: IndexEntry) -> bool:
        """The same answer as the index's SQL, for one message in hand (waiters, no SQLite)."""
        for condition in self.conditions:
            if condition.kind == "words":
                columns = entry.tokens
                picked = columns if not condition.field else [
                    columns[("from", "to", "subject").index(condition.field)]]
                hit = any(phrase_in(condition.value, tokens) for tokens in picked)
            elif condition.kind == "seen":
                hit = entry.summary.seen == condition.value
            elif condition.kind == "attachment":
                hit = bool(entry.summary.attachments)
            elif condition.kind == "before":
                hit = entry.summary.time < condition.value
            else:
                hit = entry.summary.time >= condition.value
            if hit == condition.negated:
                return False
        return True


# Search folds what it indexes and what it is asked alike, in Python, with one function:
# SQLite's own folding (unicode61 remove_diacritics 2) takes accents off Latin letters only, so
# "русский" (with the breve of й) and "Grüße" were indexed as written and never found by their
# folded queries. Case goes by casefold (ß is ss, final ς is σ), accents by NFKD and dropping every
# combining mark (й, ё, Greek tonos, the dakuten of が); Turkish dotless ı is taken as i, so
# that İstanbul, ISTANBUL and ıstanbul are one word. Kana and ideographs are a word each, as
# Japanese and Chinese put no spaces between words: a query of several is a phrase of them.
# Emoji are words too. SEARCH_FOLDING names this folding in the index: an index folded another
# way has its words read again (SqlIndex._refold).
SEARCH_FOLDING = 3  # 3: and inline parts are not attachments
_EACH_ALONE = ("\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, ideographs
               "\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\U0001f000-\U0001faff")  # emoji
_SEARCH_WORD = re.compile(rf"[{_EACH_ALONE}]|(?:(?![{_EACH_ALONE}])[^\W_])+")
_SEARCH_WORD_ALONE = re.compile(f"[{_EACH_ALONE}]")


@functools.cache
def combining_marks() -> re.Pattern:
    """Every character with a combining class (accents, breves, dakuten), as one class of a
    regular expression, so that dropping them runs in C: made at the first text that is not
    ASCII (about 20 ms)."""
    marks = [code for code in range(0x300, 0x20000) if unicodedata.combining(chr(code))]
    ranges, start = [], marks[0]
    for before, code in zip(marks, marks[1:] + [None]):
        if code != before + 1:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(before))}")
            start = code
    return re.compile(f"[{''.join(ranges)}]")


def search_tokens(text: str) -> list[str]:
    """The words search sees in a text, folded: the same for what is indexed and what is
    asked (see SEARCH_FOLDING)."""
    if text.isascii():
        return _SEARCH_WORD.findall(text.lower())
    text = unicodedata.normalize("NFKD", text.casefold())
    return _SEARCH_WORD.findall(combining_marks().sub("", text).replace("\u0131", "i"))


def search_text(text: str) -> str:
    """What the search table is given for a text: its folded words, one space apart. ASCII
    goes as it is, since SQLite's tokenizer makes the same words of it, faster."""
    return text if text.isascii() else " ".join(search_tokens(text))


def parse_search(text: str) -> Query:
    """A search as typed, or BadQuery saying what is wrong with it."""
    if len(text) > 1000:
        raise BadQuery("the search is longer than 1000 characters")
    conditions, position = [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        negated = text[position] == "-" and len(text) > position + 1
        position += negated
        field_name = ""
        if found := re.match(r"([A-Za-z]+):", text[position:]):
            if found.group(1).lower() in SEARCH_FIELDS:
                field_name, position = found.group(1).lower(), position + found.end()
        if text[position:position + 1] == '"':
            end = text.find('"', position + 1)
            if end < 0:
                raise BadQuery('a quoted phrase is not closed: add a "')
            value, position = text[position + 1:end], end + 1
        else:
            value = re.match(r"[^\s]*", text[position:]).group()
            position += len(value)
        if (condition := search_condition(field_name, value, negated)) and (
                condition not in conditions):  # "a a a" is "a"
            conditions.append(condition)
    words = [word for c in conditions if c.kind == "words" for word in c.value]
    if len(words) > SEARCH_WORDS_LIMIT:
        raise BadQuery(f"a search of at most {SEARCH_WORDS_LIMIT} words ({len(words)} here)")
    prefixes = [c.value[-1] for c in conditions if c.kind == "words"]  # see _fts
    if sum(len(word) < 3 and not _SEARCH_WORD_ALONE.fullmatch(word)
           for word in prefixes) > SEARCH_SHORT_WORDS_LIMIT:
        raise BadQuery(f"at most {SEARCH_SHORT_WORDS_LIMIT} words of one or two letters: "
                       "each one matches most of the mail")
    return Query(tuple(conditions))


def search_condition(field_name: str, value: str, negated: bool) -> Condition | None:
    if field_name and not value:
        example = {"is": "unread", "has": "attachment", "before": "2026-11-30",
                   "after": "2026-11-30"}.get(field_name, "word")
        raise BadQuery(f"{field_name}: needs a value, as in {field_name}:{example}")
    match field_name:
        case "is" if value.lower() in ("read", "seen", "unread", "unseen"):
            return Condition("seen", value=value.lower() in ("read", "seen"), negated=negated)
        case "is":
            raise BadQuery(f"is: takes read or unread, not {value!r}")
        case "has" if value.lower() in ("attachment", "attachments"):
            return Condition("attachment", negated=negated)
        case "has":
            raise BadQuery(f"has: takes attachment, not {value!r}")
        case "before" | "after":
            try:  # the year 1 has no Unix time where the local zone is ahead of UTC
                moment = datetime.datetime.fromisoformat(value).timestamp()
            except (ValueError, OverflowError, OSError):
                raise BadQuery(f"{field_name}: takes a date such as 2026-11-30 or "
                               f"2026-11-30T08:00, not {value[:40]!r}") from None
            return Condition(field_name, value=moment, negated=negated)
    words = tuple(search_tokens(value))
    return Condition("words", field_name, words, negated) if words else None


def phrase_in(words: tuple[str, ...], tokens: list[str]) -> bool:
    """The words in a row, the last one as a prefix (as FTS5's "a b"*)."""
    *whole, last = words
    for start in range(len(tokens) - len(words) + 1):
        if tokens[start + len(whole)].startswith(last) and all(
                tokens[start + n] == word for n, word in enumerate(whole)):
            return True
    return False


_SUMMARY_COLUMNS = ", ".join(f"messages.{name}" for name in (
    "uid key location flags time size crlf_size sender recipients from_ to_ cc subject date "
    "message_id attachments modseq dsn checks keywords".split()))


def _summary(row) -> Summary:
    (uid, key, location, flags, time_, size, crlf, sender, recipients, from_, to, cc, subject,
     date, message_id, attachments, modseq, dsn, checks, keywords) = row
    return Summary(uid, key, location, flags, time_, size, crlf, sender,
                   recipients.split("\n") if recipients else [], from_, to, cc, subject, date,
                   message_id, attachments.split("\n") if attachments else [], modseq,
                   json.loads(dsn) if dsn else None, json.loads(checks) if checks else None,
                   keywords)


# What a condition of the search syntax is in SQL; the words go to SQLite's full-text index.
_FTS_COLUMNS = {"": "", "from": "sender : ", "to": "recipients : ", "subject": "subject : "}
_SQL_CONDITIONS = {("seen", True): "instr(flags, 'S') > 0",
                   ("seen", False): "instr(flags, 'S') = 0",
                   ("attachment", False): "attachments != ''",
                   ("attachment", True): "attachments = ''",
                   ("before", False): "time < ?", ("before", True): "time >= ?",
                   ("after", False): "time >= ?", ("after", True): "time < ?"}


@typing.runtime_checkable
class Index(typing.Protocol):
    """What the Store asks of an index: the contract that SqlIndex (a file) and MemoryIndex
    (for a Python without sqlite3) both keep, and that the tests hold each to. Writes come
    from one thread at a time, under the Store's lock, inside transaction(); reads come from
    any thread. A UID is never used again; a Summary is a copy the caller may keep."""

    full_text: bool  # whether search matches words through a full-text index

    # -- opening, meta, transactions
    def open(self) -> str | None:
        """Open or make it; why an unusable one was set aside, or None."""
    def close(self) -> None: ...
    def transaction(self) -> typing.ContextManager: ...
    def meta(self, name: str, default=None):
        """uidvalidity, modseq, folder_times, expunged_floor, search_folding."""
    def set_meta(self, name: str, value) -> None: ...
    def next_modseq(self) -> int:
        """The next modification sequence number, taken (inside a transaction)."""

    # -- writing, inside a transaction
    def register(self, rows: list[tuple[str, str, str, float]]) -> None:
        """Make messages known by (key, location, flags, time): each gets its UID."""
    def unindexed(self, limit: int) -> list[tuple[int, str, str, str, float]]:
        """Messages known but not read yet, newest first."""
    def unindexed_count(self) -> int: ...
    def fill(self, entries: list[IndexEntry]) -> list[IndexEntry]:
        """Store what was read of messages; those that were not already."""
    def move(self, uid: int, location: str, flags: str, modseq: int) -> None: ...
    def set_keywords(self, uid: int, keywords: str, modseq: int) -> None:
        """IMAP's keywords of a message, one space apart (its flags are the file's)."""
    def remove(self, uids: list[int], modseq: int, texts: dict | None = None) -> None: ...
    def reconcile(self, found) -> tuple[list[tuple[int, str]], list[tuple[int, str, str, str]]]:
        """Brought in line with a scan of the folders: those gone, those moved."""
    def hide(self, mailbox: str, uids: list[int], modseq: int) -> list[int]:
        """One recipient's delete; the UIDs that no recipient has any more."""
    def set_checks(self, counts: dict[int, dict]) -> None: ...
    def add_sessions(self, records: list[dict], keep: int) -> None: ...

    # -- reading, from any thread
    def get(self, key: str) -> Summary | None: ...
    def key_location(self, key: str) -> tuple[int, str] | None: ...
    def by_uids(self, uids: list[int]) -> list[Summary]: ...
    def locations(self, uids: list[int]) -> list[tuple[int, str, str]]: ...
    def present(self, uids: list[int], mailbox: str | None) -> set[int]: ...
    def counts(self, mailbox: str | None = None) -> tuple[int, int]:
        """(messages, unread) of the indexed messages."""
    def page(self, query: Query, mailbox: str | None, limit: int,
             offset: int) -> tuple[int, int, list[Summary]]:
        """(how many match, how many of them unread, the page), newest first."""
    def uids(self, query: Query = Query(), mailbox: str | None = None,
             after: int = 0) -> list[int]: ...
    def changes(self, since: int, mailbox: str | None) -> tuple[
            list[tuple[int, str, int, str]], list[int]]:
        """(uid, flags, modseq, keywords) changed after a modseq, and the UIDs removed."""
    def next_uid(self) -> int: ...
    def sizes(self, mailbox: str | None) -> list[tuple[int, int]]: ...
    def mailboxes(self) -> list[tuple[str, int, int]]: ...
    def oldest(self, count: int) -> list[int]: ...
    def older_than(self, moment: float) -> list[int]: ...
    def unchecked(self, limit: int) -> list[Summary]: ...
    def sessions(self, peer: str | None, outcome: str | None, limit: int,
                 protocol: str | None = None) -> tuple[int, list[dict]]: ...
    def session(self, number: int) -> dict | None: ...
    def session_of(self, key: str) -> int | None: ...
    def last_session(self) -> int: ...


class SqlIndex:
    """The index in an SQLite file, in WAL mode so that readers never wait for the writer.
    Writes go through one connection, used by the Store under its lock; reads take one of a
    few pooled connections, from any thread."""

    SCHEMA = f"""
        PRAGMA application_id = {INDEX_APPLICATION_ID};
        PRAGMA user_version = {INDEX_VERSION};
        CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
        CREATE TABLE messages (
            uid INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a UID is never used again
            key TEXT NOT NULL UNIQUE, location TEXT NOT NULL, flags TEXT NOT NULL DEFAULT '',
            modseq INTEGER NOT NULL DEFAULT 0, time REAL NOT NULL,
            indexed INTEGER NOT NULL DEFAULT 0,  -- 0: known by name, not read yet
            size INTEGER NOT NULL DEFAULT 0, crlf_size INTEGER NOT NULL DEFAULT 0,
            sender TEXT NOT NULL DEFAULT '', recipients TEXT NOT NULL DEFAULT '',
            from_ TEXT NOT NULL DEFAULT '', to_ TEXT NOT NULL DEFAULT '',
            cc TEXT NOT NULL DEFAULT '', subject TEXT NOT NULL DEFAULT '',
            date TEXT NOT NULL DEFAULT '', message_id TEXT NOT NULL DEFAULT '',
            attachments TEXT NOT NULL DEFAULT '', dsn TEXT, checks TEXT,
            keywords TEXT NOT NULL DEFAULT '');
        CREATE INDEX messages_unindexed ON messages (uid) WHERE NOT indexed;
        CREATE INDEX messages_modseq ON messages (modseq);
        CREATE INDEX messages_time ON messages (time);
        CREATE TABLE recipients (address TEXT NOT NULL, uid INTEGER NOT NULL,
                                 PRIMARY KEY (address, uid)) WITHOUT ROWID;
        CREATE INDEX recipients_uid ON recipients (uid);
        CREATE TABLE expunged (uid INTEGER PRIMARY KEY, modseq INTEGER NOT NULL);
        -- Counting is free: each change adds its difference here (not with triggers, which
        -- made registering 100,000 messages five times slower: 2.2 against 0.4 seconds).
        CREATE TABLE counts (total INTEGER NOT NULL, unread INTEGER NOT NULL,
                             waiting INTEGER NOT NULL);  -- indexed, of them unread, not read yet
        INSERT INTO counts VALUES (0, 0, 0);
    """
    # Contentless (content=''): the words are indexed but the text is not kept, which halves
    # the cost of indexing and the file's size (measured: 13 against 24 microseconds a message,
    # 400 bytes against 2,400). Removing a message's words needs its text again: sheesh reads
    # it from the file before deleting it. A file that another program deleted leaves its
    # words behind, harmless: a UID is never used again, and every search is joined with
    # the messages that exist. Building the index anew clears them.
    # The text comes folded (search_text), so the tokenizer only splits it: So, for emoji.
    FTS5 = ("CREATE VIRTUAL TABLE search USING fts5(sender, recipients, subject, body, "
            "content='', columnsize=0, tokenize=\"unicode61 remove_diacritics 0 categories "
            "'L* N* Co So'\")")
    # Session transcripts (section 11): made where missing, so an older index keeps its rows.
    SESSIONS = """
        CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, peer TEXT NOT NULL,
                                             outcome TEXT NOT NULL, record TEXT NOT NULL,
                                             protocol TEXT NOT NULL DEFAULT '');
        CREATE TABLE IF NOT EXISTS session_messages (key TEXT PRIMARY KEY,
                                                     session INTEGER NOT NULL) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS session_messages_session ON session_messages (session);
        -- A recipient's delete of a message that others still have (with --users): that
        -- recipient's mailbox no longer lists it, even when the message is read again.
        CREATE TABLE IF NOT EXISTS hidden (address TEXT NOT NULL, key TEXT NOT NULL,
                                           PRIMARY KEY (address, key)) WITHOUT ROWID;
    """
    # The read messages in UID order, for a page deep in the list: with 100,000 messages,
    # the page at offset 99,900 walks this small index in 4 ms, where the rows took 12.
    READ_ORDER = "CREATE INDEX IF NOT EXISTS messages_read ON messages (uid) WHERE indexed"
    # Where this SQLite was built without FTS5, search reads a plain table instead.
    PLAIN = ("CREATE TABLE search (rowid INTEGER PRIMARY KEY, sender TEXT, recipients TEXT, "
             "subject TEXT, body TEXT)")
    READERS_KEPT = 4
    BUSY_TIMEOUT = 30.0  # seconds a write waits for another program's lock on the file

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self.full_text = True

    TABLES = {"meta", "messages", "recipients", "expunged", "counts", "search"}

    def open(self) -> str | None:
        """Open the index file, or make it. A file that is not a sheesh index of this version,
        or a damaged one, is set aside and a new one made: the reason is returned, for the
        log. Errors that are not damage (locked, read-only, full) are raised."""
        problem = None
        if os.path.lexists(self.path) and not os.path.isfile(self.path):
            problem = "it is not a regular file"  # a link to /dev/null, a folder
        try:
            if problem is None:
                self._writer = self._connect()
                problem = self._not_an_index()
        except sqlite3.DatabaseError as error:
            if not index_damaged(error):
                raise
            problem = str(error)
        if problem is not None:
            self._set_aside()
            self._writer = self._connect()
        if not self._writer.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            self._create()
        self._prepare()
        return problem

    def _not_an_index(self) -> str | None:
        """Why the open file is not a usable sheesh index, or None (an empty file is one)."""
        db = self._writer
        found = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                               "'table'")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if tables and (found, version) != (INDEX_APPLICATION_ID, INDEX_VERSION):
            return "it is not a sheesh index of this version"
        if tables and not self.TABLES <= tables:
            return f"its table {sorted(self.TABLES - tables)[0]} is missing"
        if tables:
            db.execute("SELECT count(*) FROM counts").fetchone()
        return None

    def _prepare(self) -> None:
        """What an index made by an earlier version lacks, added."""
        self._writer.executescript(self.SESSIONS)
        self._writer.execute(self.READ_ORDER)
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(messages)")}
        if "checks" not in columns:  # an index made before message checks: add the column
            self._writer.execute("ALTER TABLE messages ADD COLUMN checks TEXT")
        if "keywords" not in columns:  # made before IMAP kept keywords
            self._writer.execute("ALTER TABLE messages ADD COLUMN keywords TEXT NOT NULL "
                                 "DEFAULT ''")
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(sessions)")}
        if "protocol" not in columns:  # made before sessions could be listed by protocol
            db = self._writer
            db.execute("ALTER TABLE sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT ''")
            db.executemany("UPDATE sessions SET protocol = ? WHERE id = ?", [
                (json.loads(record).get("protocol", ""), number)
                for number, record in db.execute("SELECT id, record FROM sessions").fetchall()])
        row = self._writer.execute("SELECT value FROM meta WHERE name = 'search_folding'")
        if (row.fetchone() or (None,))[0] != SEARCH_FOLDING:
            log.warning("the index's search words were folded by an older sheesh: reading "
                        "every message again for them")
            self._refold()
        self.full_text = self._writer.execute(
            "SELECT sql LIKE '%fts5%' FROM sqlite_master WHERE name = 'search'").fetchone()[0]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.BUSY_TIMEOUT)
        # WAL: readers see the last commit while the writer goes on. NORMAL: a power cut may
        # lose the last transactions, which the next start finds again in the folders.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def _set_aside(self) -> None:
        if self._writer is not None:
            self._writer.close()
        aside = f"{self.path}.broken-{int(time.time())}"
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    def _create(self) -> None:
        db = self._writer
        # UIDVALIDITY from the clock: a new index, built later, always has a larger one.
        db.executescript(f"BEGIN; {self.SCHEMA} INSERT INTO meta VALUES ('uidvalidity', "
                         f"{int(time.time())}), ('search_folding', {SEARCH_FOLDING}); COMMIT;")
        self._make_search_table()

    def _make_search_table(self) -> None:
        db = self._writer
        try:
            db.execute("CREATE VIRTUAL TABLE temp.probe USING fts5(x)")
            db.execute("DROP TABLE temp.probe")
        except sqlite3.OperationalError:
            db.execute(self.PLAIN)
            return
        db.execute(self.FTS5)
        # Merge the index's segments 16 at a time rather than 4: indexing 100,000 of the
        # benchmark's messages took half as long (14 against 30 microseconds a message),
        # and a search of a word in all of them still takes 4 ms.
        db.execute("INSERT INTO search (search, rank) VALUES ('automerge', 16)")

    def _refold(self) -> None:
        """An index whose words were folded another way (an older sheesh's): its search table
        is made anew and every message read again, keeping its UID and flags. Until each is
        read, it is not listed, as at a first start."""
        db = self._writer
        with self.transaction():
            db.execute("DROP TABLE search")
            self._make_search_table()
            db.execute("UPDATE messages SET indexed = 0")
            db.execute("UPDATE counts SET total = 0, unread = 0, waiting = "
                       "(SELECT count(*) FROM messages)")
            self.set_meta("search_folding", SEARCH_FOLDING)

    def close(self) -> None:
        for db in self._readers + [self._writer]:
            if db is not None:
                db.close()
        self._readers, self._writer = [], None

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (the Store holds its lock around it)."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")

    @contextlib.contextmanager
    def _reading(self):
        try:
            db = self._readers.pop()
        except IndexError:
            db = self._connect()
            # A reader's own page cache at 512 KiB rather than 2 MiB: the pages stay in the
            # operating system's cache anyway, and with a reader per busy thread the default
            # cost 18 MB while three searches ran, for no speed (234 against 216 a second).
            db.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        try:
            yield db
        finally:
            if len(self._readers) < self.READERS_KEPT and self._writer is not None:
                self._readers.append(db)
            else:
                db.close()

    def _read(self, sql: str, params=()) -> list:
        with self._reading() as db:
            return db.execute(sql, params).fetchall()

    # -- meta: UIDVALIDITY, the folders' times, the modification sequence

    def meta(self, name: str, default=None):
        rows = self._read("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else default

    def set_meta(self, name: str, value) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def next_modseq(self) -> int:
        """The next modification sequence number (inside a transaction)."""
        row = self._writer.execute("SELECT value FROM meta WHERE name = 'modseq'").fetchone()
        modseq = (row[0] if row else 0) + 1
        self.set_meta("modseq", modseq)
        return modseq

    # -- writing

    def _count(self, total: int = 0, unread: int = 0, waiting: int = 0) -> None:
        if total or unread or waiting:
            self._writer.execute("UPDATE counts SET total = total + ?, unread = unread + ?, "
                                 "waiting = waiting + ?", (total, unread, waiting))

    def hide(self, mailbox: str, uids: list[int], modseq: int) -> list[int]:
        """A recipient's delete (inside a transaction): a message that other recipients still
        have leaves this mailbox only (its sessions are told as of an expunge); returns the
        others, which no one has any more, for the caller to delete."""
        kept = []
        for chunk in batched(uids, 500):
            listed = ",".join(map(str, chunk))
            kept += self._writer.execute(
                f"SELECT DISTINCT r.uid, m.key FROM recipients r JOIN messages m ON m.uid = "
                f"r.uid WHERE r.uid IN ({listed}) AND r.address != ?", (mailbox,)).fetchall()
        self._writer.executemany("DELETE FROM recipients WHERE address = ? AND uid = ?",
                                 [(mailbox, uid) for uid, _ in kept])
        self._writer.executemany("INSERT OR IGNORE INTO hidden VALUES (?, ?)",
                                 [(mailbox, key) for _, key in kept])
        self._writer.executemany("INSERT OR REPLACE INTO expunged VALUES (?, ?)",
                                 [(uid, modseq) for uid, _ in kept])
        shared = {uid for uid, _ in kept}
        return [uid for uid in uids if uid not in shared]

    def present(self, uids: list[int], mailbox: str | None) -> set[int]:
        """Which of these UIDs a mailbox (or all mail, for None) still lists."""
        found = set()
        for chunk in batched(uids, 500):
            listed = ",".join(map(str, chunk))
            sql = (f"SELECT uid FROM messages WHERE uid IN ({listed})" if mailbox is None else
                   f"SELECT uid FROM recipients WHERE address = ? AND uid IN ({listed})")
            found |= {row[0] for row in self._read(sql, () if mailbox is None else (mailbox,))}
        return found

    def rebuild(self, uidvalidity: int) -> int | None:
        """The file is damaged: set it aside and make a new one, with the UIDs the old one
        still gives (salvage): how many it kept, or None when it could keep none, and the
        UIDVALIDITY is then larger than the one given, so that every session learns it."""
        salvaged = self.salvage()
        self.close()
        self._set_aside()
        self.open()
        if salvaged is not None:
            self.restore(salvaged)
            return len(salvaged["rows"])
        if self.meta("uidvalidity") <= uidvalidity:  # the clock counts seconds: the same
            self.set_meta("uidvalidity", uidvalidity + 1)  # would hide the change
        return None

    def salvage(self) -> dict | None:
        """What a damaged file still gives of what the folders cannot: each message's UID
        (with its key, location, flags, modseq and time), the UIDVALIDITY, the next UID and
        modification sequence. None if any of it cannot be read: every UID is then new."""
        try:
            db = self._connect()
            try:
                meta = dict(db.execute("SELECT name, value FROM meta WHERE name IN "
                                       "('uidvalidity', 'modseq')").fetchall())
                columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
                keywords = "keywords" if "keywords" in columns else "''"
                rows = db.execute(f"SELECT uid, key, location, flags, modseq, time, {keywords} "
                                  f"FROM messages").fetchall()
                sequence = db.execute("SELECT seq FROM sqlite_sequence WHERE name = "
                                      "'messages'").fetchone()
                hidden = db.execute("SELECT address, key FROM hidden").fetchall() if db.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'hidden'").fetchone() else []
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return None
        if "uidvalidity" not in meta:
            return None
        return {"rows": rows, "uidvalidity": meta["uidvalidity"], "hidden": hidden,
                "modseq": meta.get("modseq", 0), "last_uid": sequence[0] if sequence else 0}

    def restore(self, salvaged: dict) -> None:
        """Give a new index the UIDs salvaged from the old one: each message keeps its UID
        and is read again from its file; the UIDVALIDITY stays, and so the sessions' UIDs."""
        db = self._writer
        with self.transaction():
            db.executemany("INSERT INTO messages (uid, key, location, flags, modseq, time, "
                           "keywords) VALUES (?, ?, ?, ?, ?, ?, ?)", salvaged["rows"])
            self._count(waiting=len(salvaged["rows"]))
            db.executemany("INSERT OR IGNORE INTO hidden VALUES (?, ?)", salvaged["hidden"])
            db.execute("INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES "
                       "('messages', max(?, (SELECT coalesce(max(uid), 0) FROM messages)))",
                       (salvaged["last_uid"],))
            self.set_meta("uidvalidity", salvaged["uidvalidity"])
            self.set_meta("modseq", salvaged["modseq"])
            # Removals before now were not salvaged: a session that looked before compares
            # its whole list of UIDs (see ImapSession.updates).
            self.set_meta("expunged_floor", salvaged["modseq"] + 1)

    def register(self, rows: list[tuple[str, str, str, float]]) -> None:
        """Make messages known by (key, location, flags, time), in arrival order: each gets
        its UID here. Keys already known are left as they are."""
        # Not ON CONFLICT DO NOTHING, which spends a UID on every key it skips.
        added = self._writer.executemany(
            "INSERT INTO messages (key, location, flags, time) SELECT ?, ?, ?, ? WHERE NOT "
            "EXISTS (SELECT 1 FROM messages WHERE key = ?)",
            [(*row, row[0]) for row in rows]).rowcount
        self._count(waiting=added)

    def unindexed(self, limit: int) -> list[tuple[int, str, str, str, float]]:
        """Messages known by name but not read yet, newest first."""
        return self._read("SELECT uid, key, location, flags, time FROM messages WHERE NOT "
                          "indexed ORDER BY uid DESC LIMIT ?", (limit,))

    def unindexed_count(self) -> int:
        return self._read("SELECT waiting FROM counts")[0][0]

    def fill(self, entries: list[IndexEntry]) -> list[IndexEntry]:
        """Store what was read of each message; returns those that were not already stored
        (another sheesh on the same Maildir may have been quicker)."""
        db = self._writer
        waiting = {uid for uid, in db.execute(
            f"SELECT uid FROM messages WHERE NOT indexed AND uid IN "
            f"({','.join(str(e.summary.uid) for e in entries)})")} if entries else set()
        # In ascending UIDs: FTS5 takes rows in descending order at half the speed (measured:
        # 41 against 14 microseconds a message), though the batches come newest first.
        stored = sorted((entry for entry in entries if entry.summary.uid in waiting),
                        key=lambda entry: entry.summary.uid)
        # A message listed for the first time gets a mod-sequence of its own (RFC 7162
        # section 3.1: positive, and larger than any before), so CHANGEDSINCE finds it; one
        # read again (a rebuild, a refold) keeps its own, and sessions see nothing change.
        modseq = self.next_modseq() if stored else 0
        db.executemany(
            "UPDATE messages SET indexed = 1, size = ?, crlf_size = ?, sender = ?, "
            "recipients = ?, from_ = ?, to_ = ?, cc = ?, subject = ?, date = ?, "
            "message_id = ?, attachments = ?, dsn = ?, modseq = CASE modseq WHEN 0 THEN ? "
            "ELSE modseq END WHERE uid = ?",
            [(s.size, s.crlf_size, s.sender, "\n".join(s.recipients), s.from_, s.to, s.cc,
              s.subject, s.date, s.message_id, "\n".join(s.attachments),
              json.dumps(s.dsn) if s.dsn else None, modseq, s.uid)
             for s in (entry.summary for entry in stored)])
        for entry in stored:
            entry.summary.modseq = entry.summary.modseq or modseq
        db.executemany("INSERT OR IGNORE INTO recipients SELECT ?, ? WHERE NOT EXISTS "
                       "(SELECT 1 FROM hidden WHERE address = ? AND key = ?)",
                       [(address.lower(), entry.summary.uid, address.lower(), entry.summary.key)
                        for entry in stored for address in entry.summary.recipients])
        db.executemany("INSERT INTO search (rowid, sender, recipients, subject, body) "
                       "VALUES (?, ?, ?, ?, ?)",
                       [(entry.summary.uid, *entry.columns()) for entry in stored])
        self._count(len(stored), sum(not entry.summary.seen for entry in stored), -len(stored))
        return stored

    def set_keywords(self, uid: int, keywords: str, modseq: int) -> None:
        self._writer.execute("UPDATE messages SET keywords = ?, modseq = ? WHERE uid = ?",
                             (keywords, modseq, uid))

    def move(self, uid: int, location: str, flags: str, modseq: int) -> None:
        before = self._writer.execute("SELECT indexed, instr(flags, 'S') = 0 FROM messages "
                                      "WHERE uid = ?", (uid,)).fetchone()
        self._writer.execute("UPDATE messages SET location = ?, flags = ?, modseq = ? "
                             "WHERE uid = ?", (location, flags, modseq, uid))
        if before and before[0]:
            self._count(unread=("S" not in flags) - before[1])

    def remove(self, uids: list[int], modseq: int, texts: dict | None = None) -> None:
        """Forget messages; texts: what search indexed of them, by UID, to unindex it."""
        db = self._writer
        for chunk in batched(uids, 500):
            listed = ",".join(map(str, chunk))
            indexed, unread, waiting = db.execute(
                f"SELECT coalesce(sum(indexed), 0), coalesce(sum(indexed AND instr(flags, 'S') = "
                f"0), 0), coalesce(sum(NOT indexed), 0) FROM messages WHERE uid IN ({listed})"
            ).fetchone()
            db.execute(f"DELETE FROM messages WHERE uid IN ({listed})")
            db.execute(f"DELETE FROM recipients WHERE uid IN ({listed})")
            self._count(-indexed, -unread, -waiting)
        db.executemany("INSERT OR REPLACE INTO expunged VALUES (?, ?)",
                       [(uid, modseq) for uid in uids])
        # IMAP sessions learn removals from this list; one that last looked before its
        # oldest entry compares its whole list of UIDs instead (see ImapSession.updates).
        if db.execute("SELECT count(*) > ? FROM expunged", (EXPUNGED_KEPT,)).fetchone()[0]:
            floor = db.execute("SELECT modseq FROM expunged ORDER BY modseq DESC LIMIT 1 "
                               "OFFSET ?", (EXPUNGED_KEPT // 2,)).fetchone()[0]
            db.execute("DELETE FROM expunged WHERE modseq <= ?", (floor,))
            self.set_meta("expunged_floor", floor)
        if not self.full_text:
            db.executemany("DELETE FROM search WHERE rowid = ?", [(u,) for u in uids])
        elif texts:
            db.executemany("INSERT INTO search (search, rowid, sender, recipients, subject, "
                           "body) VALUES ('delete', ?, ?, ?, ?, ?)",
                           [(uid, *columns) for uid, columns in texts.items()])

    def reconcile(self, found) -> tuple[list[tuple[int, str]], list[tuple[int, str, str, str]]]:
        """Bring the index in line with what a scan of the folders found: (key, location,
        flags, time) for each file. New files are registered (in arrival order); returns the
        messages whose files are gone, as (uid, key), and those that moved, as (uid, key,
        location, flags). SQLite does the comparing, so memory stays flat at any size."""
        db = self._writer
        db.execute("CREATE TEMP TABLE IF NOT EXISTS found (key TEXT PRIMARY KEY, location TEXT,"
                   " flags TEXT, time REAL) WITHOUT ROWID")
        db.execute("DELETE FROM temp.found")
        for rows in batched(found, 10_000):
            db.executemany("INSERT OR REPLACE INTO temp.found VALUES (?, ?, ?, ?)", rows)
        gone = db.execute("SELECT uid, key FROM messages WHERE key NOT IN "
                          "(SELECT key FROM temp.found)").fetchall()
        moved = db.execute("SELECT m.uid, m.key, f.location, f.flags FROM messages m "
                           "JOIN temp.found f ON f.key = m.key "
                           "WHERE f.location != m.location").fetchall()
        added = db.execute(
            "INSERT INTO messages (key, location, flags, time) SELECT key, location, flags, "
            "time FROM temp.found WHERE key NOT IN (SELECT key FROM messages) "
            "ORDER BY time, key").rowcount
        self._count(waiting=added)
        db.execute("DELETE FROM temp.found")
        return gone, moved

    # -- reading

    def get(self, key: str) -> Summary | None:
        rows = self._read(f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE key = ? AND indexed",
                          (key,))
        return _summary(rows[0]) if rows else None

    def by_uids(self, uids: list[int]) -> list[Summary]:
        rows = []
        for chunk in batched(uids, 500):
            rows += self._read(f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE indexed AND uid "
                               f"IN ({','.join('?' * len(chunk))}) ORDER BY uid", chunk)
        return [_summary(row) for row in rows]

    def counts(self, mailbox: str | None = None) -> tuple[int, int]:
        """(messages, unread): kept by triggers, so free to ask; a mailbox is counted."""
        if mailbox is None:
            return tuple(self._read("SELECT total, unread FROM counts")[0])
        return tuple(self._read(
            "SELECT count(*), coalesce(sum(instr(flags, 'S') = 0), 0) FROM messages WHERE "
            "indexed AND uid IN (SELECT uid FROM recipients WHERE address = ?)",
            (mailbox.lower(),))[0])

    def page(self, query: Query, mailbox: str | None, limit: int,
             offset: int) -> tuple[int, int, list[Summary]]:
        """(how many match, how many of them are unread, the page asked for), newest first."""
        tables, where, params = self._where(query, mailbox)
        with self._reading() as db:
            if where == "indexed":
                total, unread = db.execute("SELECT total, unread FROM counts").fetchone()
            else:
                total, unread = db.execute(
                    f"SELECT count(*), coalesce(sum(instr(messages.flags, 'S') = 0), 0) FROM "
                    f"{tables} WHERE {where}", params).fetchone()
            rows = db.execute(f"SELECT {_SUMMARY_COLUMNS} FROM {tables} WHERE {where} "
                              f"ORDER BY {tables.split()[0]}.rowid DESC LIMIT ? OFFSET ?",
                              (*params, limit, offset)).fetchall()
        return total, unread, [_summary(row) for row in rows]

    def unchecked(self, limit: int) -> list[Summary]:
        """The newest messages whose checks (12.5) were never made."""
        rows = self._read(f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE indexed AND checks "
                          f"IS NULL ORDER BY uid DESC LIMIT ?", (limit,))
        return [_summary(row) for row in rows]

    def set_checks(self, counts: dict[int, dict]) -> None:
        """Remember what the checks found (by UID): they are made when first asked for."""
        self._writer.executemany("UPDATE messages SET checks = ? WHERE uid = ?",
                                 [(json.dumps(c), uid) for uid, c in counts.items()])

    # -- session transcripts

    def add_sessions(self, records: list[dict], keep: int) -> None:
        """Record ended sessions (their public() form); keep the newest `keep`."""
        db = self._writer
        db.executemany("INSERT OR REPLACE INTO sessions (id, peer, outcome, record, protocol) "
                       "VALUES (?, ?, ?, ?, ?)", [(r["id"], r["peer"], r["outcome"],
                                                   json.dumps(r), r["protocol"]) for r in records])
        db.executemany("INSERT OR REPLACE INTO session_messages VALUES (?, ?)",
                       [(key, r["id"]) for r in records for key in r["stored"]])
        cut = db.execute("SELECT id FROM sessions ORDER BY id DESC LIMIT 1 OFFSET ?",
                         (keep,)).fetchone()
        if cut is not None:
            db.execute("DELETE FROM sessions WHERE id <= ?", cut)
            db.execute("DELETE FROM session_messages WHERE session <= ?", cut)

    def sessions(self, peer: str | None, outcome: str | None, limit: int,
                 protocol: str | None = None) -> tuple[int, list[dict]]:
        """(how many match, the newest `limit` of them)."""
        where, params = self._session_filter(peer, outcome, protocol)
        with self._reading() as db:
            total = db.execute(f"SELECT count(*) FROM sessions WHERE {where}",
                               params).fetchone()[0]
            rows = db.execute(f"SELECT record FROM sessions WHERE {where} ORDER BY id DESC "
                              f"LIMIT ?", (*params, limit)).fetchall()
        return total, [json.loads(row[0]) for row in rows]

    @staticmethod
    def _session_filter(peer: str | None, outcome: str | None,
                        protocol: str | None) -> tuple[str, tuple]:
        conditions = [(column, value) for column, value in (
            ("peer", peer), ("outcome", outcome), ("protocol", protocol)) if value]
        return (" AND ".join(f"{column} = ?" for column, _ in conditions) or "1",
                tuple(value for _, value in conditions))

    def session(self, number: int) -> dict | None:
        rows = self._read("SELECT record FROM sessions WHERE id = ?", (number,))
        return json.loads(rows[0][0]) if rows else None

    def session_of(self, key: str) -> int | None:
        rows = self._read("SELECT session FROM session_messages WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def last_session(self) -> int:
        return self._read("SELECT coalesce(max(id), 0) FROM sessions")[0][0]

    def uids(self, query: Query = Query(), mailbox: str | None = None,
             after: int = 0) -> list[int]:
        """Every matching UID above `after`, oldest first (IMAP's mailboxes, and the
        in-process API)."""
        tables, where, params = self._where(query, mailbox)
        return [row[0] for row in self._read(
            f"SELECT uid FROM {tables} WHERE {where} AND uid > ? ORDER BY uid", (*params, after))]

    def changes(self, since: int, mailbox: str | None) -> tuple[
            list[tuple[int, str, int, str]], list[int]]:
        """What changed after modification sequence `since`: ((UID, flags, modseq, keywords)
        of the messages whose flags changed, UIDs of those removed)."""
        _, where, params = self._where(Query(), mailbox)
        flagged = self._read(f"SELECT uid, flags, modseq, keywords FROM messages WHERE {where} "
                             "AND modseq > ? ORDER BY uid", (*params, since))
        return flagged, [row[0] for row in self._read(
            "SELECT uid FROM expunged WHERE modseq > ? ORDER BY uid", (since,))]

    def next_uid(self) -> int:
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")
        return (rows[0][0] if rows else 0) + 1

    def sizes(self, mailbox: str | None):
        """(UID, size over POP3) of every message in a mailbox, oldest first, one at a time:
        a million of them in a list would cost a hundred megabytes."""
        _, where, params = self._where(Query(), mailbox)
        with self._reading() as db:
            yield from db.execute(f"SELECT uid, crlf_size FROM messages WHERE {where} "
                                  "ORDER BY uid", params)

    def _where(self, query: Query, mailbox: str | None) -> tuple[str, str, list]:
        """A search in SQL: (the tables, the WHERE clause, its parameters). Words to find
        are looked up in the full-text index first, and its matches joined with the messages
        in its own order: SQLite then neither sorts them nor holds them all at once."""
        tables, clauses, params, matching, excluded = "messages", ["indexed"], [], [], []
        if mailbox is not None:
            clauses.append("uid IN (SELECT uid FROM recipients WHERE address = ?)")
            params.append(mailbox.lower())
        for condition in query.conditions:
            if condition.kind == "words":
                (excluded if condition.negated else matching).append(condition)
            elif condition.kind == "seen":  # is:read, is:unread, -is:read...
                clauses.append(_SQL_CONDITIONS["seen", condition.value != condition.negated])
            else:
                clauses.append(_SQL_CONDITIONS[condition.kind, condition.negated])
                if condition.kind in ("before", "after"):
                    params.append(condition.value)
        if matching and self.full_text:
            # Each match is looked up in the small index of read UIDs, not among the rows:
            # counting a sender's 14,286 messages of 100,000 took 33 ms, now 13.
            tables = ("search JOIN messages INDEXED BY messages_read "
                      "ON messages.uid = search.rowid")
            clauses.append("search MATCH ?")
            params.append(" AND ".join(map(self._fts, matching)) + "".join(
                f" NOT {self._fts(c)}" for c in excluded))
        elif matching:
            clauses.append(self._search_clause("IN", "", matching, excluded, params))
        elif excluded:
            text = " OR ".join(map(self._fts, excluded))
            clauses.append(self._search_clause("NOT IN", text, excluded, [], params))
        return tables, " AND ".join(clauses), params

    def _fts(self, condition: Condition) -> str:
        return _FTS_COLUMNS[condition.field] + '"' + " ".join(condition.value) + '"*'

    def _search_clause(self, how: str, text: str, matching: list, excluded: list,
                       params: list) -> str:
        if self.full_text:
            params.append(text)
            return f"uid {how} (SELECT rowid FROM search WHERE search MATCH ?)"
        # No FTS5: each word a LIKE on the columns, much slower but the same answers nearly.
        def like(condition: Condition) -> str:
            columns = ["sender", "recipients", "subject", "body"] if not condition.field else [
                {"from": "sender", "to": "recipients"}.get(condition.field, condition.field)]
            tests = []
            for word in condition.value:
                tests.append("(" + " OR ".join(f"{column} LIKE ?" for column in columns) + ")")
                params.extend([f"%{word}%"] * len(columns))
            return "(" + " AND ".join(tests) + ")"
        if how == "NOT IN":
            sql = " OR ".join(map(like, matching))
        else:
            sql = " AND ".join(map(like, matching)) + "".join(
                f" AND NOT {like(c)}" for c in excluded)
        return f"uid {how} (SELECT rowid FROM search WHERE {sql})"

    def mailboxes(self) -> list[tuple[str, int, int]]:
        """(address, messages, unread) for every envelope recipient."""
        return self._read(
            "SELECT r.address, count(*), sum(instr(m.flags, 'S') = 0) FROM recipients r "
            "JOIN messages m ON m.uid = r.uid WHERE m.indexed GROUP BY r.address "
            "ORDER BY r.address")

    def oldest(self, count: int) -> list[int]:
        return [row[0] for row in self._read(
            "SELECT uid FROM messages ORDER BY uid LIMIT ?", (count,))]

    def older_than(self, moment: float) -> list[int]:
        return [row[0] for row in self._read(
            "SELECT uid FROM messages WHERE time < ? ORDER BY uid LIMIT 10000", (moment,))]

    def locations(self, uids: list[int]) -> list[tuple[int, str, str]]:
        rows = []
        for chunk in batched(uids, 500):
            rows += self._read(f"SELECT uid, key, location FROM messages WHERE uid IN "
                               f"({','.join('?' * len(chunk))})", chunk)
        return rows

    def key_location(self, key: str) -> tuple[int, str] | None:
        rows = self._read("SELECT uid, location FROM messages WHERE key = ?", (key,))
        return rows[0] if rows else None


def batched(items, size: int):
    """Lists of up to `size` items (itertools.batched, which came in Python 3.12)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class MemoryIndex:
    """The same index in memory, for a Python built without sqlite3. It is built again at each
    start, and a search reads every entry: fine for the thousands of messages such a setup
    keeps, slow for a million."""

    full_text = False

    def __init__(self) -> None:
        self._rows: dict[int, Summary] = {}
        self._bodies: dict[int, str] = {}  # of the messages read: those are listed
        self._uid_of: dict[str, int] = {}
        self._meta: dict = {"uidvalidity": int(time.time())}
        self._expunged: dict[int, int] = {}  # UID -> the modification sequence of its removal
        self._hidden: dict[str, set[str]] = {}  # key -> the addresses: see SqlIndex.hide
        self._next_uid = 1
        self._lock = threading.RLock()  # readers come from many threads
        self._sessions: dict[int, dict] = {}  # in the order they ended
        self._session_of: dict[str, int] = {}

    def open(self) -> None:
        return None

    def unchecked(self, limit: int) -> list[Summary]:
        with self._lock:
            found = [uid for uid in sorted(self._bodies, reverse=True)
                     if self._rows[uid].checks is None][:limit]
            return [replace(self._rows[uid]) for uid in found]

    def set_checks(self, counts: dict[int, dict]) -> None:
        with self._lock:
            for uid, found in counts.items():
                if uid in self._rows:
                    self._rows[uid].checks = found

    def add_sessions(self, records: list[dict], keep: int) -> None:
        with self._lock:
            for record in records:
                self._sessions[record["id"]] = record
                self._session_of.update(dict.fromkeys(record["stored"], record["id"]))
            while len(self._sessions) > keep:
                gone = self._sessions.pop(min(self._sessions))
                for key in gone["stored"]:
                    self._session_of.pop(key, None)

    def sessions(self, peer: str | None, outcome: str | None, limit: int,
                 protocol: str | None = None) -> tuple[int, list[dict]]:
        wanted = {"peer": peer, "outcome": outcome, "protocol": protocol}
        with self._lock:
            found = [r for _, r in sorted(self._sessions.items(), reverse=True)
                     if all(not value or r[name] == value for name, value in wanted.items())]
        return len(found), found[:limit]

    def session(self, number: int) -> dict | None:
        return self._sessions.get(number)

    def session_of(self, key: str) -> int | None:
        return self._session_of.get(key)

    def last_session(self) -> int:
        return max(self._sessions, default=0)

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def transaction(self):
        with self._lock:
            yield

    def meta(self, name: str, default=None):
        return self._meta.get(name, default)

    def set_meta(self, name: str, value) -> None:
        self._meta[name] = value

    def next_modseq(self) -> int:
        self._meta["modseq"] = self._meta.get("modseq", 0) + 1
        return self._meta["modseq"]

    def register(self, rows: list[tuple[str, str, str, float]]) -> None:
        with self._lock:
            for key, location, flags, time_ in rows:
                if key not in self._uid_of:
                    self._uid_of[key] = uid = self._next_uid
                    self._next_uid += 1
                    self._rows[uid] = Summary(uid, key, location, flags, time_, 0, 0, "", [])

    def unindexed(self, limit: int) -> list[tuple[int, str, str, str, float]]:
        with self._lock:
            waiting = [uid for uid in self._rows if uid not in self._bodies]
            return [(s.uid, s.key, s.location, s.flags, s.time) for s in
                    (self._rows[uid] for uid in sorted(waiting, reverse=True)[:limit])]

    def unindexed_count(self) -> int:
        with self._lock:
            return len(self._rows) - len(self._bodies)

    def fill(self, entries: list[IndexEntry]) -> list[IndexEntry]:
        stored = []
        with self._lock:
            modseq = 0
            for entry in entries:
                uid, known = entry.summary.uid, self._rows.get(entry.summary.uid)
                if known is None or uid in self._bodies:
                    continue
                modseq = modseq or self.next_modseq()  # as SqlIndex.fill
                entry.summary.location, entry.summary.flags = known.location, known.flags
                entry.summary.keywords = known.keywords
                entry.summary.modseq = known.modseq or modseq
                self._rows[uid], self._bodies[uid] = entry.summary, entry.body
                stored.append(entry)
        return stored

    def set_keywords(self, uid: int, keywords: str, modseq: int) -> None:
        with self._lock:
            if (summary := self._rows.get(uid)) is not None:
                summary.keywords, summary.modseq = keywords, modseq

    def move(self, uid: int, location: str, flags: str, modseq: int) -> None:
        with self._lock:
            if (summary := self._rows.get(uid)) is not None:
                summary.location, summary.flags, summary.modseq = location, flags, modseq

    def remove(self, uids: list[int], modseq: int, texts: dict | None = None) -> None:
        with self._lock:
            self._expunged.update((uid, modseq) for uid in uids)
            for uid in uids:
                if (summary := self._rows.pop(uid, None)) is not None:
                    del self._uid_of[summary.key]
                    self._bodies.pop(uid, None)

    def reconcile(self, found) -> tuple[list[tuple[int, str]], list[tuple[int, str, str, str]]]:
        with self._lock:
            seen = {key: (location, flags, time_) for key, location, flags, time_ in found}
            gone = [(s.uid, s.key) for s in self._rows.values() if s.key not in seen]
            moved = [(s.uid, s.key, seen[s.key][0], seen[s.key][1]) for s in self._rows.values()
                     if s.key in seen and seen[s.key][0] != s.location]
            fresh = sorted((time_, key, location, flags) for key, (location, flags, time_)
                           in seen.items() if key not in self._uid_of)
            self.register([(key, location, flags, time_) for time_, key, location, flags in fresh])
            return gone, moved

    def _indexed(self, query: Query = Query(), mailbox: str | None = None) -> list[Summary]:
        with self._lock:
            entries = [IndexEntry(self._rows[uid], body) for uid, body in self._bodies.items()]
        mailbox = mailbox.lower() if mailbox is not None else None
        return sorted((e.summary for e in entries if query.matches(e) and (
            mailbox is None or mailbox in self._holders(e.summary))), key=lambda s: s.uid)

    def _holders(self, summary: Summary) -> set[str]:
        """The recipients whose mailboxes list a message."""
        return {r.lower() for r in summary.recipients} - self._hidden.get(summary.key, set())

    def hide(self, mailbox: str, uids: list[int], modseq: int) -> list[int]:
        with self._lock:
            shared = {uid for uid in uids if uid in self._rows and self._holders(
                self._rows[uid]) - {mailbox}}
            for uid in shared:
                self._hidden.setdefault(self._rows[uid].key, set()).add(mailbox)
            self._expunged.update((uid, modseq) for uid in shared)
            return [uid for uid in uids if uid not in shared]

    def present(self, uids: list[int], mailbox: str | None) -> set[int]:
        with self._lock:
            return {uid for uid in uids if uid in self._rows and (
                mailbox is None or mailbox in self._holders(self._rows[uid]))}

    def get(self, key: str) -> Summary | None:
        with self._lock:
            uid = self._uid_of.get(key)
            return replace(self._rows[uid]) if uid in self._bodies else None

    def by_uids(self, uids: list[int]) -> list[Summary]:
        with self._lock:
            return [replace(self._rows[uid]) for uid in sorted(uids) if uid in self._bodies]

    def counts(self, mailbox: str | None = None) -> tuple[int, int]:
        messages = self._indexed(mailbox=mailbox)
        return len(messages), sum(not s.seen for s in messages)

    def page(self, query: Query, mailbox: str | None, limit: int,
             offset: int) -> tuple[int, int, list[Summary]]:
        found = self._indexed(query, mailbox)
        found.reverse()
        return (len(found), sum(not s.seen for s in found),
                [replace(s) for s in found[offset:offset + limit]])

    def uids(self, query: Query = Query(), mailbox: str | None = None,
             after: int = 0) -> list[int]:
        return [s.uid for s in self._indexed(query, mailbox) if s.uid > after]

    def changes(self, since: int, mailbox: str | None) -> tuple[
            list[tuple[int, str, int, str]], list[int]]:
        with self._lock:
            return ([(s.uid, s.flags, s.modseq, s.keywords) for s in self._indexed(
                mailbox=mailbox) if s.modseq > since],
                    sorted(uid for uid, modseq in self._expunged.items() if modseq > since))

    def next_uid(self) -> int:
        return self._next_uid

    def sizes(self, mailbox: str | None) -> list[tuple[int, int]]:
        return [(s.uid, s.crlf_size) for s in self._indexed(mailbox=mailbox)]

    def mailboxes(self) -> list[tuple[str, int, int]]:
        boxes: dict[str, list[int]] = {}
        for summary in self._indexed():
            for address in self._holders(summary):
                counts = boxes.setdefault(address, [0, 0])
                counts[0] += 1
                counts[1] += not summary.seen
        return [(address, *counts) for address, counts in sorted(boxes.items())]

    def oldest(self, count: int) -> list[int]:
        with self._lock:
            return sorted(self._rows)[:count]

    def older_than(self, moment: float) -> list[int]:
        with self._lock:
            return sorted(uid for uid, s in self._rows.items() if s.time < moment)[:10000]

    def locations(self, uids: list[int]) -> list[tuple[int, str, str]]:
        with self._lock:
            return [(uid, self._rows[uid].key, self._rows[uid].location) for uid in uids
                    if uid in self._rows]

    def key_location(self, key: str) -> tuple[int, str] | None:
        with self._lock:
            uid = self._uid_of.get(key)
            return (uid, self._rows[uid].location) if uid is not None else None


# -- 12.4 The Store: the index kept in step with the folders ----------------------------------
#
# Three kinds of change reach the folders, and the index follows each:
#   - sheesh's own deliveries. The session's path to its 250 only adds the new key to a queue
#     (an append, under a lock held for nanoseconds). One indexing thread reads the queued
#     messages and writes them to the index in one transaction, when deliveries pause, or
#     before a list or search is answered: a message is listed as soon as anyone looks, and a
#     flood of mail does not pay for indexing while it lasts. Those waiting for mail (a wait
#     request, an event stream, IMAP's IDLE) are told of it sooner, from the queue.
#   - sheesh's own changes (read, flagged, deleted): made to the file and the index together,
#     under one lock.
#   - changes by other programs (mutt, rm, a second sheesh). The modification times of new/
#     and cur/ say when the names in them changed; only then are the folders listed and
#     compared with the index, in SQLite. Since times are coarse, a foreign change in the same
#     instant as one of sheesh's could hide: while sheesh itself is changing the folders, they
#     are listed again once they have been quiet for a second, and at least every minute.
#
# When the index is new (or was lost), the folders are listed once and every message gets its
# UID in arrival order at once; then the messages are read, newest first, in batches, while the
# server already serves: the inbox shows what is indexed so far and says indexing is under way.
#
# Four owners, each with its own state and lock: Events (what changed, for whoever waits), the
# SessionLog (this run's transcripts), the Indexer (its thread, the arrival queue, scans,
# rebuilds, retention) and the Store, the one facade that every reader and writer uses: the web
# inbox, the API, POP3, IMAP, the relay and sheesh.Server. Each lock is taken alone (a leaf), but
# Store.lock, which is reentrant and may be held while the index takes its own; none is held
# while a waker or a waiting reader is called.
#
#   lock                 guards                                       taken by
#   Store.lock           the files and the index rows, changed        the indexing thread; a
#                        together (the index's one writer);           request's delete, flag or
#                        uidvalidity; the rows-to-read flag           folder scan
#   Indexer._queue_lock  the arrival queue and its counts             SMTP sessions (arrived),
#                                                                     the indexing thread
#   Indexer._progress    (a Condition) how far the indexer is         readers that wait for it
#   Events._changed      (a Condition) the event log, the waiters,    event streams, waits,
#                        the watchers and their wakers                IDLE, the indexing thread
#   SessionLog._lock     the open and ended transcripts               every session, the indexer
#   Store._findings_lock the findings kept per key                    readers, the indexer
#   Store._checks_lock   the checks readers made, to be written       readers, the indexer

INDEX_QUIET = 0.05  # deliveries paused this long: index what arrived
INDEX_DELAY_MAX = 5.0  # and never later than this after a message arrived
INDEX_BACKLOG_MAX = 50_000  # keys queued for the index; beyond, the next scan finds them
# With someone waiting for news (IDLE, a wait, an event stream), a round of indexing takes at
# most INDEX_ROUND_MAX arrivals, and those waiting are told of each round; with no one, a round
# takes the whole queue, which costs less per message. While the indexer is more than
# INDEX_BEHIND arrivals behind a watched flood, each session pauses before its 250:
# INDEX_BEHIND_PAUSE for every INDEX_BEHIND it is behind, at most INDEX_BEHIND_PAUSE_MAX.
INDEX_ROUND_MAX = 50
INDEX_BEHIND = 50
INDEX_BEHIND_PAUSE = 0.001
INDEX_BEHIND_PAUSE_MAX = 0.02
WATCHED_DELAY = 0.02  # with someone waiting, announce arrivals gathered this long,
WATCHED_DELAY_EACH = 0.0005  # and this much longer for each one waiting,
WATCHED_DELAY_MAX = 0.25  # up to this
FOLDER_CHECK_INTERVAL = 0.25  # how often the folders' times are looked at
RESCAN_QUIET = 1.0  # after sheesh's own changes, list the folders once quiet this long,
RESCAN_SPACING = 50  # if the last listing ended 50 times as long ago as it took,
RESCAN_INTERVAL = 60.0  # and at least this often while sheesh itself keeps changing them
RETENTION_INTERVAL = 60.0  # how often --max-age looks for old messages
MEMORY_TRIM_INTERVAL = 30.0  # how often freed memory is handed back to the system (glibc)
EVENTS_KEPT = 100  # events remembered for event streams that fell behind (each names
# up to EVENT_IDS messages: 100 of them cost at most a megabyte)
EVENT_IDS = 100  # an event names at most this many messages (its "count" says how many)
MAILBOX_INDEX_WAIT = 20.0  # a POP3 login or IMAP SELECT waits this long for a new index
CHECK_QUIET = 1.0  # deliveries paused this long: check the messages not yet checked (12.5),
CHECK_BATCH = 20  # this many at a time (about 5 ms), the newest first
CHECK_BUDGET = 0.01  # seconds a list or search may spend checking messages not yet checked
FINDINGS_KEPT = 256  # messages whose findings are kept in memory


@dataclass
class Page:
    total: int  # how many match
    unread: int  # how many of those are unread
    messages: list[Summary]


@dataclass(eq=False)
class Waiter:
    """Someone waiting for a message that matches a search (/api/messages/wait)."""

    query: Query
    mailbox: str | None
    after: float
    found: Summary | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def offer(self, entry: IndexEntry) -> bool:
        if entry.summary.time <= self.after or self.mailbox is not None and self.mailbox not in (
                r.lower() for r in entry.summary.recipients):
            return False
        if not self.query.matches(entry):
            return False
        self.found = entry.summary
        self.ready.set()
        return True


class Events:
    """What changed in the store, for whoever waits for it: the numbered event log that event
    streams read, the waiters of /api/messages/wait (each handed the message it waits for),
    and IDLE sessions, woken through the waker each gives. None of them polls. The indexing
    thread and the request that changed something announce; request threads and IMAP
    sessions wait. One lock (a Condition) guards all of it, taken alone; a waker is called
    outside it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._log: collections.deque = collections.deque(maxlen=EVENTS_KEPT)
        self.last = 0  # the number of the latest event
        self.waiters: list[Waiter] = []
        self.watchers = 0  # open event streams and IDLE sessions
        self._wakers: set = set()  # of IDLE sessions, called after each event (watch)
        self.stopped = False

    @property
    def waiting(self) -> int:
        """How many wait for news: while any do, arrivals are announced within moments."""
        return self.watchers + len(self.waiters)

    def announce(self, kind: str, keys: list[str]) -> None:
        """One event for a batch of changes: its count, the newest id, and the newest ids
        (up to EVENT_IDS). One event per message would cost 300 event streams 90 MB/s of
        writing under load, and SMTP half its rate."""
        if not keys:
            return
        with self._changed:
            self.last += 1
            self._log.append((self.last, kind, {"id": keys[-1], "ids": keys[-EVENT_IDS:],
                                                "count": len(keys)}))
            self._changed.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def after(self, number: int, timeout: float) -> list[tuple[int, str, dict]]:
        """Events after the given number, waiting up to `timeout` for the first one."""
        with self._changed:
            self._changed.wait_for(lambda: self.stopped or self.last > number, timeout)
            return [event for event in self._log if event[0] > number]

    def watch(self, wake: Callable[[], None] | None = None) -> None:
        """Someone waits for mail (an event stream, an IDLE session): while there is one,
        arrivals are indexed within WATCHED_DELAY instead of when SMTP pauses. `wake` is
        called, in the announcing thread, after each event: it must not block."""
        with self._changed:
            self.watchers += 1
            if wake is not None:
                self._wakers.add(wake)

    def unwatch(self, wake: Callable[[], None] | None = None) -> None:
        with self._changed:
            self.watchers -= 1
            self._wakers.discard(wake)

    def add(self, waiter: Waiter) -> None:
        with self._changed:
            self.waiters.append(waiter)

    def remove(self, waiter: Waiter) -> None:
        with self._changed:
            self.waiters.remove(waiter)

    def offer(self, entries: list[IndexEntry]) -> None:
        """Hand new messages to the waiters they match. A waiter whose words are not among
        the batch's is passed over at once: a hundred waiters cost one look each a batch."""
        with self._changed:
            waiters = [waiter for waiter in self.waiters if waiter.found is None]
        if not waiters or not entries:
            return
        words = sorted({token for entry in entries for column in entry.tokens
                        for token in column})
        for waiter in waiters:
            if waiter.query.could_match(words):
                for entry in reversed(entries):  # the newest match first
                    if waiter.offer(entry):
                        break

    def stop(self) -> None:
        """Wake every wait and stream to say that sheesh stops."""
        with self._changed:
            self.stopped = True
            self._changed.notify_all()
            waiters = list(self.waiters)
        for waiter in waiters:
            waiter.ready.set()


class SessionLog:
    """The transcripts of this run's sessions (section 11): the open ones, and the ended ones
    not yet written to the index. Every session's thread starts and ends its own; the
    indexing thread takes the ended ones to write when connections pause (take_ended). One
    lock guards both lists, taken alone."""

    def __init__(self, keep: int) -> None:
        self._numbers = itertools.count(1)
        self._open: dict[int, Transcript] = {}
        self._ended: collections.deque[Transcript] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._first_ended = self._last_ended = 0.0

    def number_after(self, last: int) -> None:
        """Go on from the last number the index kept, so that numbers stay unique."""
        self._numbers = itertools.count(last + 1)

    def started(self, protocol: str, peer: str) -> Transcript:
        """A new session's transcript, numbered, among the open ones until it ends."""
        transcript = Transcript(protocol, peer)
        transcript.id = next(self._numbers)
        with self._lock:
            self._open[transcript.id] = transcript
        return transcript

    def ended(self, transcript: Transcript) -> None:
        transcript.ended, now = time.time(), time.monotonic()
        with self._lock:
            self._open.pop(transcript.id, None)
            if not self._ended:
                self._first_ended = now
            self._ended.append(transcript)
            self._last_ended = now

    def due_in(self) -> float | None:
        """When the ended ones are to be written: once connections pause (or at the latest
        INDEX_DELAY_MAX after the first ended); None with none to write."""
        if not self._ended:
            return None
        now = time.monotonic()
        return min(self._last_ended + INDEX_QUIET, self._first_ended + INDEX_DELAY_MAX) - now

    def take_ended(self) -> list[dict]:
        """The ended transcripts, as records for the index: they are the index's from now."""
        with self._lock:
            ended = list(self._ended)
            self._ended.clear()
        return [transcript.as_json() for transcript in ended]

    def open_ones(self, wanted: dict) -> list[dict]:
        """The open sessions' summaries whose fields have the values wanted (None: any)."""
        with self._lock:
            summaries = [transcript.summary() for transcript in self._open.values()]
        return [summary for summary in summaries if all(
            not value or summary[name] == value for name, value in wanted.items())]

    def open_record(self, number: int) -> dict | None:
        with self._lock:
            transcript = self._open.get(number)
        return transcript.as_json() if transcript is not None else None

    def storer_of(self, key: str) -> int | None:
        """The open or unwritten session that stored a message."""
        with self._lock:
            for transcript in [*self._open.values(), *self._ended]:
                if key in transcript.stored:
                    return transcript.id
        return None


class Indexer:
    """The indexing thread, and what it alone changes: the queue of arrivals that SMTP
    sessions hand it (arrived), the rounds that read them, and the files other programs put
    in the folders, into the index (the newest first, in batches, when deliveries pause),
    folder scans, the rebuild of a damaged index, retention, and the writing of ended
    transcripts and of the checks that readers made. Readers wait for it (catch_up,
    complete) but never do its work. Its lock, _queue_lock, guards the queue and its
    counts; _progress (a Condition) tells readers how far it is; writes to the index take
    the Store's lock. It never ends on an error (see _keep_index)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue_lock = threading.Lock()
        self._queue: collections.deque[tuple[str, float]] = collections.deque()
        self._queued_total = self._indexed_total = 0  # arrivals, and those indexed
        self.announced_total = 0  # the first so many arrivals were announced (IDLE's news)
        self._announced = 0  # of the queued arrivals, the first so many were announced
        self._first_unannounced = 0.0
        self._overflowed = False
        self._first_queued = self._last_queued = 0.0
        self._progress = threading.Condition()  # for readers that wait for the indexer
        self._wake = threading.Event()
        self._hurry = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._folder_times: tuple[int, int] | None = None
        self._own_change = -math.inf  # when sheesh last changed the folders (monotonic)
        self.looked = False  # at the folders, once since opening
        self._rows_to_read = True  # the index may know messages it has not read yet
        self._checked_at = self._last_sweep = self._trimmed = -math.inf
        self._verified_at = -math.inf  # when the index last matched the folders, for sure
        self._scan_cost = 0.0
        self._checks_to_make = True  # messages may lack their checks (12.5): look when quiet
        self.problem: str | None = None  # why the last round of indexing failed
        self._damage_found: Exception | None = None  # by a reader: the indexer mends it

    @property
    def index(self) -> Index:
        return self.store.index

    @property
    def maildir(self) -> Maildir:
        return self.store.maildir

    @property
    def events(self) -> Events:
        return self.store.events

    def start(self) -> None:
        known = self.index.meta("folder_times")
        self._folder_times = tuple(map(int, known.split(","))) if known else None
        self._thread = threading.Thread(target=self._keep_index, name="sheesh-index",
                                        daemon=True)
        self._thread.start()

    def stop_waiting(self) -> None:
        """Readers that wait for it stop waiting; the thread ends at its next wake."""
        self._stopping = True
        with self._progress:
            self._progress.notify_all()

    def stop(self) -> None:
        self.stop_waiting()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def changed_folders(self) -> None:
        """sheesh itself just moved or removed files (a flag, a delete): the folders' new
        times are its own doing, and need no listing at once."""
        self._own_change = time.monotonic()

    def complete(self, timeout: float) -> bool:
        """Wait until every message in the folders is indexed (POP3 and IMAP need the whole
        maildrop); False if that takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        self.catch_up(timeout)
        with self._progress:
            return self._progress.wait_for(lambda: self._stopping or self.looked and (
                not self.index.unindexed_count()), max(0.0, deadline - time.monotonic()))

    def arrived(self, delivery: Delivery) -> int:
        """A delivery just committed, in the session's thread: queue it, and nothing more.
        Its number in the order of arrivals, for wait_indexed()."""
        now = time.monotonic()
        with self._queue_lock:
            first, fresh = not self._queue, len(self._queue) == self._announced
            if first:
                self._first_queued = now
            if fresh:
                self._first_unannounced = now
            if len(self._queue) < INDEX_BACKLOG_MAX:
                self._queue.append((delivery.queue_id, now))
            else:
                self._overflowed = True  # a folder scan will find the rest
            self._queued_total += 1
            number = self._queued_total
            self._checks_to_make = True
            self._last_queued = self._own_change = now
        # The indexing thread times itself from the queue: one wake-up will do.
        if first or fresh and self.events.waiting:
            self._wake.set()
        behind = number - self._indexed_total
        if self.events.waiting and behind > INDEX_BEHIND:
            # Someone waits for news (IDLE, a wait) and the indexer is behind a flood: with a
            # GIL it runs one turn in as many as there are busy sessions, and would fall ever
            # further behind. This session lets it run a moment before its 250 (the message
            # is on disk already), the longer the further behind it is.
            time.sleep(min(INDEX_BEHIND_PAUSE_MAX, INDEX_BEHIND_PAUSE * behind / INDEX_BEHIND))
        return number

    def wait_indexed(self, number: int, timeout: float) -> bool:
        """Wait, without hurrying the indexing thread, until arrival `number` (what arrived()
        returned) is indexed: for workers that may wait (webhooks), unlike readers."""
        with self._progress:
            return self._progress.wait_for(
                lambda: self._indexed_total >= number or self._stopping, timeout)

    def catch_up(self, timeout: float = 5.0, until=lambda: False,
                 target: int | None = None) -> None:
        """Wait until every message delivered so far (or the first `target` of them) is in
        the index (readers call this), or until `until()` is true."""
        if target is None:
            with self._queue_lock:
                target = self._queued_total
        if self._indexed_total >= target or self.problem is not None:
            return  # a failing index is not waited for: what it has is answered at once
        with self._progress:
            self._hurry = True
            self._wake.set()
            self._progress.wait_for(lambda: self._indexed_total >= target or self._stopping
                                    or self.problem is not None or until(), timeout)

    def _keep_index(self) -> None:
        """The indexing thread's loop. It never ends on an error: whatever a round raises
        (a rebuild that fails too included) is logged, said by /api/health, and the round is
        tried again, waiting longer each time (1 s, 2 s, ... 30 s) while it goes on failing."""
        failures = 0
        while not self._stopping:
            self._wake.wait(self._next_work_in() if not failures else
                            min(INDEX_RETRY_MAX, 2 ** (failures - 1)))
            self._wake.clear()
            if self._stopping:
                break
            try:
                self._work_or_mend()
            except Exception as error:
                failures += 1
                self._index_failed(error, failures)
            else:
                if failures:
                    log.warning("the index works again after %d failed round%s", failures,
                                "s" * (failures > 1))
                failures, self.problem = 0, None

    def _work_or_mend(self) -> None:
        """One round of work. Only a damaged index file is built anew (which changes the
        UIDVALIDITY): a locked, full or unwritable one is an error that passes, and rebuilding
        it would only renumber every message under the sessions that hold their UIDs."""
        try:
            if (damage := self._damage_found) is not None:
                raise damage
            self._work()
        except DATABASE_ERRORS as error:
            if not index_damaged(error):
                raise
            log.error("the index is damaged (%s): building it again", escape_for_log(str(error)))
            self._rebuild()
            self._damage_found = None

    def damage_found(self, error: Exception) -> None:
        """A reader's thread found the index damaged (a search of broken full-text pages):
        the indexing thread builds it again, as if it had found it itself."""
        if index_damaged(error):
            self._damage_found = error
            self._wake.set()

    def _index_failed(self, error: Exception, failures: int) -> None:
        """Say it (once while it lasts, with a traceback only for what is not a database's
        or a disk's error), and look at the folders again once it works: what was delivered
        meanwhile is in them."""
        self.problem = str(error) or type(error).__name__
        self._folder_times = None
        with self._progress:  # readers waiting for it stop waiting
            self._progress.notify_all()
        if isinstance(error, OSError):  # the Maildir vanished mid-listing
            self.maildir.failed(error)
        elif failures > 1:
            pass
        elif isinstance(error, DATABASE_ERRORS):
            log.error("the index %s cannot be written (%s): deliveries go on into the "
                      "Maildir, and are indexed once it can", self.store.path / INDEX_FILE,
                      escape_for_log(self.problem))
        else:
            log.exception("error while indexing %s", self.store.path)

    def _next_work_in(self) -> float:
        if self._hurry or self._overflowed:
            return 0
        waits = [FOLDER_CHECK_INTERVAL]
        if self._checks_to_make:  # a batch at a time, with pauses for others to run
            waits.append(max(0.01, self._last_queued + CHECK_QUIET - time.monotonic()))
        if self._queue:
            waits.append(self._arrivals_due_in())
        if (sessions_due := self.store.session_log.due_in()) is not None:
            waits.append(sessions_due)
        if len(self._queue) > self._announced and self.events.waiting:
            waits.append(self._announcement_due_in())
        return max(0.0, min(waits))

    def _arrivals_due_in(self) -> float:
        """When the queued arrivals are to be indexed: once deliveries pause, or at the latest
        INDEX_DELAY_MAX after the first."""
        now = time.monotonic()
        return min(self._last_queued + INDEX_QUIET, self._first_queued + INDEX_DELAY_MAX) - now

    def _announcement_due_in(self) -> float:
        """When arrivals are to be announced to those waiting: gathered for a moment, longer
        the more there are to wake (300 event streams woken 50 times a second would cost
        SMTP a third of its rate)."""
        waiting = self.events.waiting
        delay = min(WATCHED_DELAY_MAX, WATCHED_DELAY + WATCHED_DELAY_EACH * waiting)
        return self._first_unannounced + delay - time.monotonic()

    def _work(self) -> None:
        self.store.keep_checks()
        if (sessions_due := self.store.session_log.due_in()) is not None and sessions_due <= 0:
            self.store.record_sessions()
        if self._queue and (self._hurry or self._arrivals_due_in() <= 0):
            self._index_arrivals()
        elif len(self._queue) > self._announced and self.events.waiting and (
                self._announcement_due_in() <= 0):
            self._announce_arrivals()
        if self._folders_need_a_scan():
            self.scan_folders()
        self.looked = True
        with self.store.lock:  # a scan in a reader's thread may set it again meanwhile
            rows_to_read, self._rows_to_read = self._rows_to_read, False
        if rows_to_read and self._index_waiting():  # being built: more next time round
            self._rows_to_read = True
            self._wake.set()
        elif rows_to_read:
            with self._progress:
                self._progress.notify_all()
        if self.store.max_messages or self.store.max_age:
            self._keep_within_limits()
        if self._checks_to_make and not self._queue and not self._rows_to_read and (
                time.monotonic() - self._last_queued >= CHECK_QUIET):
            unchecked = self.index.unchecked(CHECK_BATCH)
            self._checks_to_make = bool(self.store.with_checks(unchecked))
        if time.monotonic() - self._trimmed >= MEMORY_TRIM_INTERVAL:
            self._trimmed = time.monotonic()
            give_back_memory()
        if self._hurry and not self._queue:
            with self._progress:
                self._hurry = False
                self._progress.notify_all()

    def _announce_arrivals(self) -> None:
        """Tell the event streams and the waiters what arrived, before it is indexed: a
        waiter gets the message read for it (only while there are waiters)."""
        with self._queue_lock:
            fresh = [key for key, _ in itertools.islice(self._queue, self._announced, None)]
            self._announced += len(fresh)
            self.announced_total = self._queued_total - len(self._queue) + self._announced
        if self.events.waiters:
            entries = []
            for key in fresh:
                try:
                    with self.maildir.read(f"new/{key}") as buffer:
                        entries.append(index_entry(0, key, f"new/{key}", "",
                                                   arrival_time(key, time.time()), buffer))
                except OSError:
                    continue  # moved or removed already: the index will say so
            self.events.offer(entries)
            with self._progress:  # a wait that is catching up has its message now
                self._progress.notify_all()
        self.events.announce("new", fresh)

    def _index_arrivals(self) -> None:
        """Index what the sessions delivered, and tell those waiting of it (all but what the
        watched path told them already). The queue is the one announcer of arrivals."""
        with self._queue_lock:
            overflowed, self._overflowed = self._overflowed, False
            if overflowed or len(self._queue) <= INDEX_ROUND_MAX or not self.events.waiting:
                arrivals, self._queue = list(self._queue), collections.deque()
            else:  # watched: a round at a time, so that news of a flood comes in moments
                arrivals = [self._queue.popleft() for _ in range(INDEX_ROUND_MAX)]
            announced = min(self._announced, len(arrivals))
            self._announced -= announced
            through = self._queued_total - len(self._queue)  # the last one taken
        keys = [key for key, _ in arrivals]
        try:
            with self.store.lock, self.index.transaction():
                self.index.register([(key, f"new/{key}", "", arrival_time(key, time.time()))
                                     for key in keys])
        except BaseException:  # queued again, in front, for the next round
            with self._queue_lock:
                self._queue.extendleft(reversed(arrivals))
                # The announced ones stay a prefix: the new arrivals' count follows only
                # when every one of these was announced.
                fully = announced == len(arrivals)
                self._announced = announced + self._announced if fully else announced
                self._overflowed |= overflowed
            raise
        if overflowed:
            self.scan_folders(force=True)
        stored = {entry.summary.key: entry for entry in self._read_waiting(len(keys))[0]}
        self._own_change = time.monotonic()
        with self._progress:
            self._indexed_total = max(self._indexed_total, through)
            self.announced_total = max(self.announced_total, through)
            self._progress.notify_all()
        # A folder listing may have read some of them first: read those again to tell them.
        self._tell([stored.get(key) or self._read_again(key) for key in keys[announced:]])

    def _index_waiting(self) -> bool:
        """Read a batch of the messages known but not yet read (a new index, or files that
        other programs put in the folders), and tell those waiting of them. Whether more
        are waiting."""
        stored, more = self._read_waiting(INDEX_BATCH)
        with self._queue_lock:  # sheesh's own deliveries are told by _index_arrivals
            queued = {key for key, _ in self._queue} if self._queue else set()
        self._tell([entry for entry in stored if entry.summary.key not in queued])
        return more

    def _read_waiting(self, limit: int) -> tuple[list[IndexEntry], bool]:
        """Read up to `limit` messages known but not read, newest first, into the index:
        (those it stored, whether more are waiting)."""
        waiting = self.index.unindexed(max(limit, 1))
        if not waiting:
            return [], False
        entries, missing = [], False
        for uid, key, location, flags, time_ in waiting:
            try:
                with self.maildir.read(location) as buffer:
                    entries.append(index_entry(uid, key, location, flags, time_, buffer))
            except FileNotFoundError:
                missing = True  # moved or removed meanwhile: the folders tell where
            except OSError as error:
                log.warning("cannot read %s for the index: %s", location,
                            escape_for_log(error.strerror or str(error)))
        with self.store.lock, self.index.transaction():
            stored = self.index.fill(entries)
        if missing:
            self.scan_folders(force=True)
        return stored, len(waiting) == max(limit, 1)

    def _read_again(self, key: str) -> IndexEntry | None:
        summary = self.index.get(key)
        try:
            with self.maildir.read(summary.location) as buffer:
                return IndexEntry(summary, index_entry(summary.uid, key, summary.location,
                                                       summary.flags, summary.time,
                                                       buffer).body)
        except (OSError, AttributeError):  # gone meanwhile (or never indexed): nothing to tell
            return None

    def _tell(self, entries: list[IndexEntry | None]) -> None:
        """New messages: to the waiters they match, and to the event streams."""
        entries = [entry for entry in entries if entry is not None]
        self.events.offer(entries)
        self.events.announce("new", [entry.summary.key for entry in entries])

    def _folders_need_a_scan(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < FOLDER_CHECK_INTERVAL:
            return False
        self._checked_at = now
        try:
            times = self.maildir.folder_times()
        except OSError:
            return False  # the Maildir is gone: deliveries say so, loudly
        if times == self._folder_times:
            self._verified_at = now  # nothing came or went since the last listing
            return False
        if self._own_change <= self._verified_at:
            return True  # nothing of ours since: another program changed the folders
        # What a listing costs: as measured, or (before one) about 10 microseconds a message.
        cost = self._scan_cost or self.index.counts()[0] * 1e-5
        since, spacing = now - self._verified_at, RESCAN_SPACING * cost
        quiet = now - self._own_change >= RESCAN_QUIET
        return quiet and since >= spacing or since >= max(RESCAN_INTERVAL, spacing)

    def scan_folders(self, force: bool = False) -> None:
        """List new/ and cur/, and bring the index in line with what is there."""
        started = self._verified_at = time.monotonic()
        with self.store.lock:
            times = self.maildir.folder_times()  # before listing: a later change shows later
            found = ((key, location, flags, arrival_time(key, 0) or entry.stat().st_mtime)
                     for location, entry in self.maildir.scan()
                     for key, flags in [split_name(location[4:])])
            with self.index.transaction():
                gone, moved = self.index.reconcile(found)
                self._rows_to_read = True
                modseq = self.index.next_modseq() if gone or moved else 0
                for uid, key, location, flags in moved:
                    self.index.move(uid, location, flags, modseq)
                self.index.remove([uid for uid, _ in gone], modseq)
                self.index.set_meta("folder_times", f"{times[0]},{times[1]}")
            self._folder_times = times
        self._scan_cost = time.monotonic() - started
        self.events.announce("deleted", [key for _, key in gone])
        self.events.announce("flags", [key for _, key, _, _ in moved])

    def _rebuild(self) -> None:
        """The index file is damaged: set it aside and build a new one from the folders,
        with the UIDs the old one still gives (salvage), else with new ones and a new
        UIDVALIDITY, which every open session learns before it can act on an old UID."""
        if isinstance(self.index, MemoryIndex):
            return  # no file to be damaged: what raised was not the index's
        with self.store.lock:
            kept = self.index.rebuild(self.store.uidvalidity)
            if kept is not None:
                log.warning("the new index keeps the UIDs of the %d messages the old one "
                            "still gave", kept)
            self.store.uidvalidity = self.index.meta("uidvalidity")
            self._folder_times = None
            self._rows_to_read = True

    def _keep_within_limits(self) -> None:
        now = time.monotonic()
        doomed, why = [], []
        if self.store.max_messages:
            total = self.index.counts()[0] + self.index.unindexed_count()
            if total > self.store.max_messages:
                doomed += self.index.oldest(total - self.store.max_messages)
                why.append(f"over --max-messages {self.store.max_messages}")
        if self.store.max_age and now - self._last_sweep >= RETENTION_INTERVAL:
            self._last_sweep = now
            old = self.index.older_than(time.time() - self.store.max_age)
            if old:
                doomed += old
                why.append(f"older than --max-age {format_duration(self.store.max_age)}")
        if doomed:
            removed = self.store.remove_uids(sorted(set(doomed)))
            log.info("retention: removed %d messages (%s)", removed, ", ".join(why))



class Store:
    """The Maildir and its index, in step: what every reader uses."""

    def __init__(self, maildir: Maildir, *, persistent: bool = True,
                 max_messages: int | None = None, max_age: float | None = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.maildir, self.path = maildir, maildir.path
        self.persistent = persistent and sqlite3 is not None
        self.max_messages, self.max_age = max_messages, max_age
        self.max_sessions = max_sessions
        self.session_log = SessionLog(max_sessions)
        self.index: Index = MemoryIndex()
        self.lock = threading.RLock()  # the one writer: files and index rows change together
        self.events = Events()
        self._stopping = False
        self.indexer = Indexer(self)
        # The findings of the messages checked last, by key: a detail view asks twice.
        self._findings: collections.OrderedDict[str, list[Finding]] = collections.OrderedDict()
        self._findings_lock = threading.Lock()  # guards _findings alone; takes no other
        self._checks_made: dict[int, dict] = {}  # by UID: found by readers, to be written
        self._checks_lock = threading.Lock()  # guards _checks_made alone; takes no other
        self.uidvalidity = 0  # the index's: set by open, and by the indexer's rebuild

    # -- starting and stopping

    def open(self) -> None:
        """Create the Maildir if needed, open (or make) the index and start keeping it."""
        self.maildir.create()
        if removed := self.maildir.remove_leftovers():
            log.warning("removed %d unfinished file%s from %s (deliveries cut off by a crash "
                        "or left for 36 hours)", removed, "s" * (removed > 1),
                        self.path / "tmp")
        if self.persistent:
            self.index = SqlIndex(self.path / INDEX_FILE)
            try:
                problem = self.index.open()
            except DATABASE_ERRORS as error:  # full, read-only, locked: start all the same
                self.index.close()
                self.index = MemoryIndex()
                log.error("the index %s cannot be opened (%s): it is kept in memory until "
                          "sheesh restarts", self.path / INDEX_FILE,
                          escape_for_log(str(error)))
                problem = None
            if problem is not None:
                log.warning("the index %s could not be used (%s): it was set aside and is "
                            "being built again from the Maildir", self.path / INDEX_FILE,
                            escape_for_log(problem))
        self.uidvalidity = self.index.meta("uidvalidity")
        self.session_log.number_after(self.index.last_session())
        self.indexer.start()

    def stop_waiting(self) -> None:
        """Wake whatever waits for news (event streams, waits, IDLE) to say that sheesh stops;
        reads still work until close()."""
        self._stopping = True
        self.events.stop()
        self.indexer.stop_waiting()

    def close(self) -> None:
        self.stop_waiting()
        self.indexer.stop()
        self.record_sessions()
        self.index.close()
        self.maildir.close()

    @property
    def closed(self) -> bool:
        return self._stopping

    # -- the indexer's: what arrives, and waiting for it

    def arrived(self, delivery: Delivery) -> int:
        """A delivery just committed, in the session's thread: queued for the indexer."""
        return self.indexer.arrived(delivery)

    def wait_indexed(self, number: int, timeout: float) -> bool:
        return self.indexer.wait_indexed(number, timeout)

    def catch_up(self, timeout: float = 5.0) -> None:
        """Wait until every message delivered so far is in the index (readers call this)."""
        self.indexer.catch_up(timeout)

    def catch_up_with_news(self) -> None:
        """Wait until what was announced is in the index: for IDLE, woken by the news, which
        need not wait for what arrived since (under a flood, a round or two more)."""
        self.indexer.catch_up(target=self.indexer.announced_total)

    def complete(self, timeout: float) -> bool:
        return self.indexer.complete(timeout)

    def damage_found(self, error: Exception) -> None:
        self.indexer.damage_found(error)

    @property
    def index_problem(self) -> str | None:
        return self.indexer.problem

    # -- session transcripts (section 11, kept by the handler)

    def session_started(self, protocol: str, peer: str) -> Transcript:
        return self.session_log.started(protocol, peer)

    def session_ended(self, transcript: Transcript) -> None:
        """Queued for the index, written by the indexing thread when connections pause."""
        self.session_log.ended(transcript)

    def record_sessions(self) -> None:
        """Write the ended sessions into the index (the indexing thread, and readers that
        are about to read them)."""
        if records := self.session_log.take_ended():
            with self.lock, self.index.transaction():
                self.index.add_sessions(records, self.max_sessions)

    def sessions(self, peer: str | None = None, outcome: str | None = None, limit: int = 50,
                 offset: int = 0, protocol: str | None = None) -> tuple[int, list[dict]]:
        """(how many, a page of them): the sessions kept, open ones included, newest first."""
        self.record_sessions()
        live = self.session_log.open_ones({"peer": peer, "outcome": outcome,
                                           "protocol": protocol})
        total, recorded = self.index.sessions(peer, outcome, offset + limit, protocol)
        ended = [{name: value for name, value in record.items()
                  if name not in ("transcript", "stored")} for record in recorded]
        merged = sorted(live + ended, key=lambda session: session["id"], reverse=True)
        return total + len(live), merged[offset:offset + limit]

    def session(self, number: int) -> dict | None:
        """One session with its transcript and the messages it stored."""
        if (live := self.session_log.open_record(number)) is not None:
            return live
        self.record_sessions()
        return self.index.session(number)

    def session_of(self, key: str) -> int | None:
        """The session that stored a message, if it is still kept."""
        found = self.session_log.storer_of(key)
        return found if found is not None else self.index.session_of(key)

    # -- reading

    def status(self) -> dict:
        """How many messages are indexed, and, while the index is being built, how far it is
        (the total is null until the folders have been listed)."""
        self.catch_up()
        total, unread = self.index.counts()
        waiting = self.index.unindexed_count()
        looking = not self.indexer.looked
        indexing = ({"done": total, "total": None if looking else total + waiting}
                    if looking or waiting else None)
        return {"messages": total, "unread": unread, "uidvalidity": self.uidvalidity,
                "indexing": indexing, "index_error": self.index_problem}

    def search(self, query: Query | str = "", mailbox: str | None = None, limit: int = 50,
               offset: int = 0) -> Page:
        """A page of the messages matching a search (see 12.3), newest first."""
        query = parse_search(query) if isinstance(query, str) else query
        self.catch_up()
        total, unread, messages = self.index.page(query, mailbox, limit, offset)
        return Page(total, unread, self.with_checks(messages, budget=CHECK_BUDGET))

    def summary(self, key: str, news: bool = False) -> Summary | None:
        """The message's summary; with `news`, of a message just announced, which need not
        wait for what arrived since (a wait's answer, under a flood)."""
        if news:
            self.catch_up_with_news()
        else:
            self.catch_up()
        found = self.index.get(key) if len(key) < 256 else None
        return self.with_checks([found])[0] if found is not None else None

    # -- by UID, for POP3 and IMAP: the index's answers, through the one facade (they
    # catch up first where a session looks for news: SELECT, STATUS, IMAP's updates)

    def uids(self, query: Query = Query(), mailbox: str | None = None,
             after: int = 0) -> list[int]:
        return self.index.uids(query, mailbox, after)

    def by_uids(self, uids: list[int]) -> list[Summary]:
        return self.index.by_uids(uids)

    def locations(self, uids: list[int]) -> list[tuple[int, str, str]]:
        return self.index.locations(uids)

    def sizes(self, mailbox: str | None):
        return self.index.sizes(mailbox)

    def counts(self, mailbox: str | None = None) -> tuple[int, int]:
        return self.index.counts(mailbox)

    def next_uid(self) -> int:
        return self.index.next_uid()

    def changes(self, since: int, mailbox: str | None) -> tuple[list, list[int], bool]:
        """What changed after modification sequence `since`, for IMAP (see SqlIndex.changes),
        and whether the list of removals was trimmed since: then compare the whole list."""
        flagged, removed = self.index.changes(since, mailbox)
        return flagged, removed, since < self.index.meta("expunged_floor", 0)

    def present(self, uids: list[int], mailbox: str | None) -> set[int]:
        return self.index.present(uids, mailbox)

    def with_checks(self, summaries: list[Summary], budget: float | None = None
                    ) -> list[Summary]:
        """The summaries with what the checks (12.5) found, by severity: made for those that
        lack it (within `budget` seconds; those left are null, for now), and kept. The
        indexing thread checks the others when deliveries pause, never while they go on."""
        made, deadline = {}, None if budget is None else time.monotonic() + budget
        for summary in summaries:
            if deadline is not None and time.monotonic() > deadline:
                break
            if summary.checks is None and (findings := self.checks(summary)) is not None:
                summary.checks = made[summary.uid] = check_counts(findings)
        if made:  # kept by the indexing thread, the index's one writer: a reader never
            with self._checks_lock:  # waits for a write, or fails with one
                self._checks_made.update(made)
        return summaries

    def keep_checks(self) -> None:
        """Write what readers' threads found (with_checks) into the index (the indexing
        thread's work)."""
        if not self._checks_made:
            return
        with self._checks_lock:
            made, self._checks_made = self._checks_made, {}
        try:
            with self.lock, self.index.transaction():
                self.index.set_checks(made)
        except BaseException:
            with self._checks_lock:
                self._checks_made = {**made, **self._checks_made}
            raise

    def checks(self, summary: Summary) -> list[Finding] | None:
        """What the checks find in a stored message, as it was sent; None if it is gone."""
        with self._findings_lock:
            if (kept := self._findings.get(summary.key)) is not None:
                self._findings.move_to_end(summary.key)
                return kept
        try:
            with self.open_file(summary.key) as file:
                raw = file.read(CHECK_READ_LIMIT + 64 * 1024)  # its trace headers, and more
                size = os.fstat(file.fileno()).st_size
        except LookupError:
            return None
        received = re.search(rb"\bwith (UTF8SMTP|E?SMTP)", raw[:4096])
        envelope = Envelope(summary.sender, list(summary.recipients),
                            smtputf8=received is not None and received.group(1) == b"UTF8SMTP")
        sent = strip_trace_headers(raw)
        findings = check_message(sent, envelope, size - (len(raw) - len(sent)))
        with self._findings_lock:  # made once: a detail view, /checks and the index share them
            self._findings[summary.key] = findings
            while len(self._findings) > FINDINGS_KEPT:
                self._findings.popitem(last=False)
        return findings

    def message(self, key: str, news: bool = False) -> StoredMessage | None:
        summary = self.summary(key, news)
        return StoredMessage(self, summary) if summary is not None else None

    def messages(self, mailbox: str | None = None) -> list[StoredMessage]:
        """Every message (of a mailbox), oldest first."""
        self.catch_up()
        return [StoredMessage(self, s) for s in self.index.by_uids(self.index.uids(
            mailbox=mailbox))]

    def mailboxes(self) -> list[dict]:
        self.catch_up()
        return [{"address": address, "total": total, "unread": unread}
                for address, total, unread in self.index.mailboxes()]

    def locate(self, key: str) -> str | None:
        """Where a message's file is now: the index says, and if another program moved it
        meanwhile, the folders are looked through (and the index told)."""
        if not key or "/" in key or key.startswith("."):
            return None  # not a message's key: new/ itself, or a path
        known = self.index.key_location(key)
        if known is None and os.path.isfile(self.maildir.file_path(f"new/{key}")):
            return f"new/{key}"  # just delivered, not indexed yet
        if known is None:
            return None
        if os.path.exists(self.maildir.file_path(known[1])):
            return known[1]
        self.indexer.scan_folders(force=True)
        known = self.index.key_location(key)
        return known[1] if known is not None else None

    def open_file(self, key: str):
        """A message's file, for reading; LookupError if there is no such message."""
        for _ in range(3):  # it may move between finding it and opening it
            location = self.locate(key)
            if location is None:
                break
            try:
                return self.maildir.open(location)
            except FileNotFoundError:
                continue
        raise LookupError(f"no message {key}")

    # -- changing

    def set_flags(self, key: str, flags: str) -> Summary | None:
        """Give a message these flags (moving it to cur/, as mutt would); None if it is gone."""
        flags = "".join(sorted(set(flags)))
        with self.lock:
            summary = self.index.get(key)
            if summary is None:
                return None
            if flags == summary.flags and summary.location.startswith("cur/"):
                return summary
            new_location = location_with_flags(key, flags)
            for _ in range(2):
                try:
                    self.maildir.move(summary.location, new_location)
                    break
                except FileNotFoundError:
                    summary.location = self.locate(key)
                    if summary.location is None:
                        return None
            with self.index.transaction():
                modseq = self.index.next_modseq()
                self.index.move(summary.uid, new_location, flags, modseq)
            self.indexer.changed_folders()
            was_seen = summary.seen
            summary.location, summary.flags, summary.modseq = new_location, flags, modseq
        self.events.announce("seen" if summary.seen and not was_seen else "flags", [key])
        return summary

    def set_keywords(self, summary: Summary, keywords: set[str]) -> Summary:
        """Give a message these IMAP keywords, kept in the index (a Maildir file name has
        room for the system flags only): every session sees them, after a restart too."""
        text = " ".join(sorted(keywords))
        if text == summary.keywords:
            return summary
        with self.lock, self.index.transaction():
            modseq = self.index.next_modseq()
            self.index.set_keywords(summary.uid, text, modseq)
        self.events.announce("flags", [summary.key])
        return replace(summary, keywords=text, modseq=modseq)

    @property
    def modseq(self) -> int:
        """The modification sequence: it grows with every change of flags and every removal."""
        return self.index.meta("modseq", 0)

    def writer(self, envelope: Envelope, *, trace: bool) -> MaildirWriter:
        """A writer for a message added other than by SMTP (IMAP's APPEND and COPY)."""
        return self.maildir.begin(envelope, trace=trace, on_delivery=self.arrived)

    def copy(self, key: str) -> Summary | None:
        """A duplicate of a message, byte for byte, under a new key (IMAP's COPY)."""
        try:
            file = self.open_file(key)
        except LookupError:
            return None
        writer = self.writer(Envelope(), trace=False)
        try:
            with file:
                for chunk in iter(functools.partial(file.read, READ_SIZE), b""):
                    writer.write(chunk)
            return self.summary(writer.commit())
        except BaseException:
            writer.abort()
            raise

    def mark_seen(self, key: str) -> bool:
        summary = self.summary(key)
        return summary is not None and self.set_flags(key, summary.flags + "S") is not None

    def delete(self, keys: list[str]) -> int:
        """Delete messages, file and index row; returns how many there were."""
        self.catch_up()
        keys = [key for key in keys if len(key) < 256]
        found = {key: self.index.key_location(key) for key in keys}
        # Delivered but not yet in the index (which may be failing: a full disk): the file
        # goes all the same, or no space could be freed from the inbox.
        unindexed = sum(self.maildir.remove(location) for key, known in found.items()
                        if known is None and (location := self.locate(key)) is not None)
        return unindexed + self.remove_uids([known[0] for known in found.values() if known])

    def delete_all(self) -> int:
        self.catch_up()
        removed = 0
        while (uids := self.index.oldest(10_000)) and (count := self.remove_uids(uids)):
            removed += count
        return removed

    def delete_uids(self, uids: list[int], uidvalidity: int | None = None,
                    mailbox: str | None = None) -> int:
        """Delete messages by UID. A session passes the UIDVALIDITY its UIDs came with: if
        the index was built anew since, they may name other messages, and UidsRenumbered is
        raised before any is deleted (checked under the lock a rebuild takes). A user's
        session passes its mailbox too: a message that other recipients still have leaves
        that mailbox only, and its file goes when no recipient has it any more."""
        if mailbox is not None:
            with self.lock:
                if uidvalidity is not None and uidvalidity != self.uidvalidity:
                    raise UidsRenumbered(f"UIDVALIDITY {uidvalidity} is now {self.uidvalidity}")
                with self.index.transaction():
                    alone = self.index.hide(mailbox.lower(), uids, self.index.next_modseq())
            hidden = set(uids) - set(alone)
            for summary in self.index.by_uids(sorted(hidden)):
                # The Maildir's flags are the file's, so every recipient's: the \Deleted that
                # this user set goes with the delete, or the others would see it as theirs.
                self.set_flags(summary.key, summary.flags.replace("T", ""))
            return len(hidden) + self.remove_uids(alone, uidvalidity)
        return self.remove_uids(uids, uidvalidity)

    def remove_uids(self, uids: list[int], uidvalidity: int | None = None) -> int:
        removed = []
        for chunk in batched(uids, 1000):
            with self.lock:
                if uidvalidity is not None and uidvalidity != self.uidvalidity:
                    raise UidsRenumbered(f"UIDVALIDITY {uidvalidity} is now {self.uidvalidity}")
                rows, texts = self.index.locations(chunk), {}
                for uid, key, location in rows:
                    if not os.path.exists(self.maildir.file_path(location)):
                        location = self.locate(key) or location  # another program moved it
                    if self.index.full_text:
                        texts[uid] = self._indexed_text(uid, key, location)
                    self.maildir.remove(location)
                with self.index.transaction():
                    self.index.remove([uid for uid, _, _ in rows], self.index.next_modseq(),
                                      {uid: text for uid, text in texts.items() if text})
                self.indexer.changed_folders()
            removed += [key for _, key, _ in rows]
        self.events.announce("deleted", removed)
        return len(removed)

    def _indexed_text(self, uid: int, key: str, location: str) -> tuple | None:
        """What search indexed of a message, read again from its file (see SqlIndex.FTS5)."""
        try:
            with self.maildir.read(location) as buffer:
                return index_entry(uid, key, location, "", 0.0, buffer).columns()
        except OSError:
            return None

    # -- waiting, and events

    def wait_for(self, query: Query, mailbox: str | None, after: float,
                 timeout: float) -> Summary | None:
        """The newest message matching `query` that arrived after `after` (a Unix time),
        waiting up to `timeout` seconds for one. The indexing thread hands a new message to
        each waiter it matches (Events.offer): nothing is searched again."""
        waiter = Waiter(query, mailbox, after)
        self.events.add(waiter)
        try:
            self.indexer.catch_up(until=waiter.ready.is_set)
            after_query = Query(query.conditions + (Condition("after", value=after + 1e-6),))
            _, _, newest = self.index.page(after_query, mailbox, 1, 0)
            if newest:
                return newest[0]
            waiter.ready.wait(timeout)
            return waiter.found
        finally:
            self.events.remove(waiter)

    def events_after(self, number: int, timeout: float) -> list[tuple[int, str, dict]]:
        return self.events.after(number, timeout)

    @property
    def last_event(self) -> int:
        return self.events.last

    @contextlib.contextmanager
    def watching(self):
        """Count an event stream as someone waiting for mail (see Events.watch)."""
        self.events.watch()
        try:
            yield
        finally:
            self.events.unwatch()

    def watch(self, wake: Callable[[], None] | None = None) -> None:
        self.events.watch(wake)

    def unwatch(self, wake: Callable[[], None] | None = None) -> None:
        self.events.unwatch(wake)


def give_back_memory() -> None:
    """Hand the memory freed since the last time back to the system. glibc keeps what large
    readers free (a search over a million messages, a POP3 login to all of them) for later,
    and the server's size would ratchet up to its busiest moment: with this it stays flat
    (measured: 57 MB after those at a million messages, against 72 without). Elsewhere
    (macOS, Windows, musl) there is no such call, and nothing to do."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # glibc's malloc_trim, found on first use (False: there is none)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


# -- 12.5 Message checks: what real servers will say of a message -----------------------------
#
# A sink shows what an app sends; it can also say, before a real server does, why that mail
# will be refused, broken, clipped or junked. check_message() reads a message's bytes (any
# bytes at all: it never raises) and returns findings, each with a severity (error: servers
# refuse or break it; warning: it will be junked, clipped or shown badly; info), where it is,
# and the rule it comes from. Nothing here changes, delays or refuses a delivery: the indexing
# thread checks messages when deliveries pause, the web inbox and the API when someone looks,
# and `python3 sheesh.py check` checks files.

CHECK_SEVERITIES = ("error", "warning", "info")
LINE_LIMIT_OCTETS = 998  # RFC 5322 section 2.1.1, without the CRLF
BASE64_LINE_LIMIT = 76  # RFC 2045 section 6.8
GMAIL_CLIP_OCTETS = 102 * 1024  # Gmail shows "[Message clipped]" past this much HTML
PROVIDER_SIZE_LIMIT = 25 * 1024 * 1024  # Gmail's and Outlook.com's largest message
BULK_RECIPIENTS = 10  # this many envelope recipients or more looks like a mailing
FINDINGS_PER_CHECK = 5  # the same problem on many lines is said this often, then counted
HTML_CHECK_LIMIT = 1024 * 1024  # characters of an HTML part that are read for its checks
# The work of the checks is bounded by what they read, whatever the message holds: its first
# CHECK_READ_LIMIT octets (a finding says when there was more), and of those a header section
# of HEADER_PARSE_LIMIT (2 million header lines took 8.7 s to parse).
CHECK_READ_LIMIT = 2 * 1024 * 1024
SINGLE_FIELDS = ("subject", "to", "cc", "bcc", "reply-to", "sender", "message-id",
                 "in-reply-to", "references")  # RFC 5322 section 3.6: at most one of each
GMAIL_RULES = "Gmail's email sender guidelines (support.google.com/a/answer/81126)"
BULK_RULES = ("Gmail's and Yahoo's bulk sender requirements of February 2024 "
              "(support.google.com/a/answer/81126, senders.yahooinc.com/best-practices)")


@dataclass(frozen=True)
class Finding:
    id: str  # date-missing, line-too-long...: stable, for a test to name
    severity: str  # error, warning or info
    text: str  # what is wrong, in plain words
    where: str  # a header, a part, a line
    reference: str  # the RFC section, or the provider's published rule

    def as_json(self) -> dict:
        return {"id": self.id, "severity": self.severity, "text": self.text,
                "where": self.where, "reference": self.reference}


def check_counts(findings: list[Finding]) -> dict[str, int]:
    return {severity: sum(f.severity == severity for f in findings)
            for severity in CHECK_SEVERITIES}


def check_message(raw: bytes, envelope: Envelope | None = None,
                  size: int | None = None) -> list[Finding]:
    """What real mail servers and clients will object to in a message, as it was sent
    (without sheesh's trace headers). With an envelope, also what depends on it: SMTPUTF8,
    the number of recipients, and whether the From domain aligns with the envelope sender's.
    size: the whole message's, where raw is only its start."""
    size = len(raw) if size is None else size
    if len(raw) > CHECK_READ_LIMIT:  # not between the CR and the LF of a CRLF
        raw = raw[:CHECK_READ_LIMIT - (raw[CHECK_READ_LIMIT - 1:CHECK_READ_LIMIT + 1] == b"\r\n")]
    root = outline(raw)
    headers = root.headers
    leaves = list(itertools.islice(root.leaves(), MIME_PARTS_LIMIT))
    return (check_lines(raw, root, envelope) + check_fields(headers)
            + check_mime(raw, root, headers, leaves)
            + check_deliverability(raw, headers, leaves, envelope, size)
            + check_bounds(root, size))


def check_bounds(root: MimePart, size: int) -> list[Finding]:
    """Where the checks stopped reading, so that a clean result is not taken for more."""
    findings = []
    if size > CHECK_READ_LIMIT:
        findings.append(Finding(
            "message-not-checked", "info", f"{size:,} octets: the checks read the first "
            f"{CHECK_READ_LIMIT:,} of them", "the message", "sheesh's bound on one check"))
    if len(root.raw_headers) > HEADER_PARSE_LIMIT:
        findings.append(Finding(
            "header-not-checked", "info", f"a header section of {len(root.raw_headers):,} "
            f"octets: the checks read the first {HEADER_PARSE_LIMIT:,}", "the header",
            "sheesh's bound on one check"))
    return findings


def repeated(numbers: list, finding, total: int | None = None) -> list[Finding]:
    """One finding for each of the first few places; then one that counts the rest (of
    total, where only the first places were looked for)."""
    found = [finding(n) for n in numbers[:FINDINGS_PER_CHECK]]
    total = len(numbers) if total is None else total
    if found and total > len(found):
        found.append(replace(found[-1], where=f"and {total - len(found)} more"))
    return found


# A line of more than 998 octets before its CRLF (or its bare LF): 1,000 octets that are not a
# LF, or 999 whose last is not the CR of a CRLF. Anchored at a line's start, each attempt
# reads at most 1,000 octets of one line, and a match consumes them.
_LONG_LINE = re.compile(rb"^(?:[^\n]{1000}|[^\n]{998}[^\r\n])", re.MULTILINE)
_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def places(pattern: re.Pattern, raw: bytes, count: int | None = None) -> tuple[list, int]:
    """The line numbers of the first matches (repeated() shows FINDINGS_PER_CHECK), and
    how many there are in all: count, or the matches counted."""
    numbers, line, at, seen = [], 1, 0, 0
    matches = pattern.finditer(raw)
    for found in itertools.islice(matches, FINDINGS_PER_CHECK):
        seen += 1
        line += raw.count(b"\n", at, found.start())
        at = found.start()
        if not numbers or numbers[-1] != line:
            numbers.append(line)
    if count is None:  # each match is a line of 1,000 octets or more: few, even in 50 MB
        count = seen + sum(1 for _ in matches)
    return numbers, max(count, len(numbers))


def check_lines(raw: bytes, root: MimePart, envelope: Envelope | None) -> list[Finding]:
    """RFC 5322 section 2.1.1 and 2.3: lines of at most 998 octets, CR and LF only together
    as CRLF; RFC 6532: header bytes beyond ASCII only over SMTPUTF8."""
    # Found by regular expressions that run in C and cannot backtrack far, not line by line:
    # ten million bare LFs made ten million lines (20 s, and 1 GB of memory).
    long_lines, long_count = places(_LONG_LINE, raw)
    bare_count = raw.count(b"\n") + raw.count(b"\r") - 2 * raw.count(b"\r\n")
    bare, bare_count = places(_BARE_LINE_ENDING, raw, bare_count) if bare_count else ([], 0)
    findings = repeated(long_lines, lambda n: Finding(
        "line-too-long", "error", "a line longer than 998 octets: relays break it or refuse "
        "the message (quoted-printable or base64 keeps lines short)", f"line {n}",
        "RFC 5322 section 2.1.1"), long_count)
    findings += repeated(bare, lambda n: Finding(
        "bare-line-ending", "error", "a CR or an LF alone, not CRLF: servers that guard "
        "against SMTP smuggling refuse such messages", f"line {n}", "RFC 5322 section 2.3"),
        bare_count)
    head = raw[:root.body_start]
    if not head.isascii() and not (envelope is not None and envelope.smtputf8):
        number = head.count(b"\n", 0, re.search(rb"[\x80-\xff]", head).start()) + 1
        findings.append(Finding(
            "header-8bit", "error", "header bytes beyond ASCII, without SMTPUTF8: encode them "
            "as RFC 2047 encoded-words, or send with SMTPUTF8", f"line {number}",
            "RFC 6532 section 3, RFC 5322 section 2.2"))
    return findings


def check_fields(headers) -> list[Finding]:
    """RFC 5322 section 3.6: one From and one Date, at most one of the others, a Date and a
    Message-ID that parse, Sender beside a From of several mailboxes; RFC 2047 words."""
    findings = []

    def values(name: str) -> list[str]:
        return [str(value) for value in headers.get_all(name) or []]
    for name, where in (("from", "3.6.2"), ("date", "3.6.1")):
        found = values(name)
        if len(found) != 1:
            findings.append(Finding(
                f"{name}-{'missing' if not found else 'repeated'}", "error",
                f"{'no' if not found else 'more than one'} {name.title()} header: a message "
                f"has exactly one", f"header {name.title()}", f"RFC 5322 section {where}"))
    findings += check_date(values("date")[:1])
    for name in SINGLE_FIELDS:
        if len(values(name)) > 1:
            findings.append(Finding(
                "header-repeated", "error", f"{len(values(name))} {name.title()} headers: "
                f"there may be one at most", f"header {name.title()}", "RFC 5322 section 3.6"))
    message_ids = values("message-id")
    if not message_ids:
        findings.append(Finding(
            "message-id-missing", "error", "no Message-ID: Gmail refuses such mail, and "
            "replies cannot refer to it", "header Message-ID",
            f"RFC 5322 section 3.6.4, {GMAIL_RULES}"))
    elif not re.fullmatch(r"\s*<[^<>@\s]+@[^<>@\s]+>\s*", message_ids[0]):
        findings.append(Finding(
            "message-id-invalid", "error", f"a Message-ID that is not <left@right>: "
            f"{message_ids[0].strip()[:80]!r}", "header Message-ID", "RFC 5322 section 3.6.4"))
    # Sender is for one From of several mailboxes; two From headers are from-repeated above.
    authors = email.utils.getaddresses(values("from")[:1])
    if len(values("from")) == 1 and len([a for a in authors if a[1]]) > 1 and not values(
            "sender"):
        findings.append(Finding(
            "sender-missing", "error", "a From of several mailboxes needs a Sender header "
            "naming the one who sent it", "header From", "RFC 5322 section 3.6.2"))
    for name, value in headers.items():
        if "=?" in str(value) and not words_decode(str(value)):
            findings.append(Finding(
                "encoded-word-invalid", "warning", "an RFC 2047 encoded-word that does not "
                "decode (an unknown charset, or broken base64 or quoted-printable): readers "
                "show it raw", f"header {name}", "RFC 2047 section 5"))
    return findings


def check_date(dates: list[str]) -> list[Finding]:
    if not dates:
        return []
    try:
        parsed = email.utils.parsedate_tz(dates[0])
    except (ValueError, IndexError, TypeError, OverflowError):
        parsed = None
    if parsed is None:
        return [Finding("date-invalid", "error", f"a Date that does not parse: "
                        f"{dates[0].strip()[:60]!r}", "header Date", "RFC 5322 section 3.3")]
    if not re.search(r"[+-]\d{4}\s*(\([^()]*\)\s*)?$", dates[0]):
        return [Finding("date-zone", "warning", "a Date without a numeric zone (such as "
                        "+0100): names like GMT or EST are obsolete, and readers may guess "
                        "wrong", "header Date", "RFC 5322 section 3.3, 4.3")]
    return []


def words_decode(value: str) -> bool:
    """Whether every RFC 2047 encoded-word in a header value decodes."""
    try:
        for data, charset in email.header.decode_header(value[:HEADER_DECODE_LIMIT]):
            if charset is not None and isinstance(data, bytes):
                data.decode(charset)
    except (ValueError, LookupError, email.errors.MessageError, binascii.Error):
        return False
    return True


def check_mime(raw: bytes, root: MimePart, headers, leaves: list[MimePart]) -> list[Finding]:
    """RFC 2045-2049: MIME-Version, boundaries present and closed, charsets, transfer
    encodings that match the bytes, attachments' names; RFC 2392: cid: references."""
    findings = []
    if (headers.get("content-type") is not None or root.parts) and not headers.get(
            "mime-version"):
        findings.append(Finding(
            "mime-version-missing", "warning", "a Content-Type without MIME-Version: 1.0: "
            "some readers then show the raw MIME", "header MIME-Version", "RFC 2045 section 4"))
    findings += check_boundaries(raw, root)
    for number, part in enumerate(leaves, start=1):
        findings += check_part(raw, part, f"part {number} ({part.content_type})")
    findings += check_content_ids(raw, leaves)
    return findings


def check_boundaries(raw: bytes, part: MimePart, depth: int = 0) -> list[Finding]:
    findings = []
    if part.content_type.startswith("multipart/") and depth < MIME_DEPTH_LIMIT:
        boundary = part.parameters.get("boundary")
        body = raw[part.body_start:part.end]
        where = f"the {part.content_type} part"
        if not boundary:
            findings.append(Finding("boundary-missing", "error", f"{where} has no boundary "
                                    "parameter: its parts cannot be found", where,
                                    "RFC 2046 section 5.1.1"))
        else:
            delimiter = re.escape(b"--" + boundary.encode("utf-8", "replace"))
            if not re.search(rb"(?m)^" + delimiter + rb"[ \t]*\r?$", body):
                findings.append(Finding(
                    "boundary-missing", "error", f"{where}'s boundary {boundary!r} never "
                    f"starts a part: readers see one garbled part", where,
                    "RFC 2046 section 5.1.1"))
            elif not re.search(rb"(?m)^" + delimiter + rb"--[ \t]*\r?$", body):
                findings.append(Finding(
                    "boundary-unclosed", "error", f"{where} never closes (--{boundary}--): "
                    "the message may have been cut off", where, "RFC 2046 section 5.1.1"))
        for child in part.parts:
            findings += check_boundaries(raw, child, depth + 1)
    return findings


def check_part(raw: bytes, part: MimePart, where: str) -> list[Finding]:
    findings = []
    body = raw[part.body_start:part.end]
    encoding = part.transfer_encoding
    if encoding in ("7bit", "quoted-printable", "base64") and not body.isascii():
        findings.append(Finding(
            "encoding-mismatch", "error", f"8-bit bytes in a part labelled {encoding}: "
            "declare 8bit (and send with 8BITMIME) or encode it", where,
            "RFC 2045 sections 2.7 and 6"))
    if encoding == "base64":
        findings += check_base64(body, where)
    if part.content_type.startswith("text/") and "charset" not in part.parameters and (
            not b"".join(decode_range(raw, part.body_start, part.end, encoding)).isascii()):
        findings.append(Finding(
            "charset-missing", "warning", "text beyond ASCII without a charset: readers "
            "guess, and often guess wrong", where, "RFC 2046 section 4.1.2"))
    attached = part.disposition == "attachment" or part.disposition is None and not (
        part.content_type.startswith(("text/", "multipart/", "message/"))
        or part.headers.get("content-id"))
    if attached and not part.filename:
        findings.append(Finding(
            "attachment-name-missing", "warning", "an attachment without a file name: readers "
            "call it noname or ATT00001.bin", where, "RFC 2183 section 2.3"))
    return findings


def check_base64(body: bytes, where: str) -> list[Finding]:
    findings = []
    lines = body.split(b"\n")
    if any(len(line.rstrip(b"\r")) > BASE64_LINE_LIMIT for line in lines):
        findings.append(Finding(
            "base64-line-too-long", "warning", "base64 lines longer than 76 characters: some "
            "gateways refuse or break them", where, "RFC 2045 section 6.8"))
    data = body.translate(None, b" \t\r\n")
    try:
        binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        findings.append(Finding(
            "base64-invalid", "error", "base64 that does not decode: readers show a broken "
            "file or nothing", where, "RFC 2045 section 6.8"))
    return findings


def check_content_ids(raw: bytes, leaves: list[MimePart]) -> list[Finding]:
    """RFC 2392: every cid: an HTML part refers to names a part's Content-ID."""
    ids = {part.content_id: number for number, part in enumerate(leaves, start=1)
           if part.content_id}
    wanted = {}
    for number, part in enumerate(leaves, start=1):
        if part.content_type == "text/html":
            html = part_text(raw, part, HTML_CHECK_LIMIT)
            for found in re.findall(r"cid:([^\"'\s>)]+)", html):
                wanted.setdefault(urllib.parse.unquote(found), number)
    findings = repeated([cid for cid in wanted if cid not in ids], lambda cid: Finding(
        "cid-missing", "warning", f"the HTML shows cid:{cid}, but no part has that "
        "Content-ID: a broken image", f"part {wanted[cid]} (text/html)", "RFC 2392 section 2"))
    findings += repeated([cid for cid in ids if cid not in wanted], lambda cid: Finding(
        "cid-unused", "info", f"a part with Content-ID <{cid}> that the HTML never shows: "
        "readers list it as an attachment", f"part {ids[cid]}", "RFC 2392 section 2"))
    return findings


def check_deliverability(raw: bytes, headers, leaves: list[MimePart],
                         envelope: Envelope | None, size: int) -> list[Finding]:
    """What gets mail junked, clipped or refused by the big providers."""
    findings = []
    kinds = {part.content_type for part in leaves}
    if "text/html" in kinds and "text/plain" not in kinds:
        findings.append(Finding(
            "html-only", "warning", "HTML without a text/plain alternative: spam filters "
            "score it, and text-only readers show nothing useful", "the message",
            "RFC 2046 section 5.1.4, SpamAssassin's MIME_HTML_ONLY"))
    for number, part in enumerate(leaves, start=1):
        if part.content_type == "text/html":
            size = sum(map(len, decode_range(raw, part.body_start, part.end,
                                             part.transfer_encoding)))
            if size > GMAIL_CLIP_OCTETS:
                findings.append(Finding(
                    "html-clipped", "warning", f"{size:,} octets of HTML: Gmail shows the "
                    f"first 102 KB and a link to the rest", f"part {number} (text/html)",
                    "Gmail's clipping at 102 KB of HTML, as measured by senders (spamresource"
                    ".com/2022/01/what-is-gmail-clipping-and-what-to-do.html)"))
            findings += check_html(part_text(raw, part, HTML_CHECK_LIMIT),
                                   f"part {number} (text/html)")
    if size > PROVIDER_SIZE_LIMIT:
        findings.append(Finding(
            "message-too-big", "error", f"{size:,} octets: Gmail and Outlook.com refuse "
            "messages over 25 MB", "the message",
            "Gmail's and Outlook.com's published limits (support.google.com/mail/answer/6584)"))
    findings += check_unsubscribe(headers, envelope)
    findings += check_authentication(headers, envelope)
    return findings


def check_unsubscribe(headers, envelope: Envelope | None) -> list[Finding]:
    """RFC 8058: a mailing needs List-Unsubscribe with an https URI, and List-Unsubscribe-Post
    for one click. A mailing: List-Id, Precedence bulk or list, or many recipients."""
    precedence = str(headers.get("precedence") or "").strip().lower()
    bulk = (headers.get("list-id") is not None or precedence in ("bulk", "list")
            or envelope is not None and len(envelope.recipients) >= BULK_RECIPIENTS)
    if not bulk:
        return []
    unsubscribe = str(headers.get("list-unsubscribe") or "")
    post = str(headers.get("list-unsubscribe-post") or "").replace(" ", "").lower()
    if not unsubscribe:
        return [Finding("unsubscribe-missing", "warning", "a mailing without "
                        "List-Unsubscribe: Gmail and Yahoo junk or refuse bulk mail without "
                        "it", "header List-Unsubscribe", f"RFC 2369 section 3.2, {BULK_RULES}")]
    if post != "list-unsubscribe=one-click" or "<https:" not in unsubscribe.lower():
        return [Finding("one-click-unsubscribe-missing", "warning", "no one-click unsubscribe "
                        "(an https List-Unsubscribe and List-Unsubscribe-Post: "
                        "List-Unsubscribe=One-Click), which Gmail and Yahoo require of bulk "
                        "senders", "header List-Unsubscribe-Post",
                        f"RFC 8058 section 3.1, {BULK_RULES}")]
    return []


def check_authentication(headers, envelope: Envelope | None) -> list[Finding]:
    findings = []
    if headers.get("dkim-signature") is None:
        findings.append(Finding(
            "dkim-missing", "warning", "no DKIM-Signature (sheesh cannot check one, only see "
            "it): unsigned mail is junked more, and bulk mail refused", "header DKIM-Signature",
            f"RFC 6376, {GMAIL_RULES}"))
    authors = [address for _, address in email.utils.getaddresses(
        [str(value) for value in headers.get_all("from") or []]) if "@" in address]
    if envelope is not None and "@" in envelope.sender and authors:
        mail_from = organizational_domain(envelope.sender.rpartition("@")[2])
        author = organizational_domain(authors[0].rpartition("@")[2])
        if mail_from != author:
            findings.append(Finding(
                "from-not-aligned", "warning", f"the From domain ({author}) is not the "
                f"envelope sender's ({mail_from}): DMARC passes only if a DKIM signature of "
                f"{author} aligns instead", "header From", "RFC 7489 section 3.1"))
    return findings


def organizational_domain(domain: str) -> str:
    """Roughly the domain a DMARC policy belongs to: the last two labels (three under a
    two-letter country code with a short second label, as example.co.uk). Without the
    Public Suffix List, which the standard library lacks, this is an approximation."""
    labels = domain.strip().strip(".").lower().split(".")
    keep = 3 if len(labels) > 2 and len(labels[-1]) == 2 and len(labels[-2]) <= 3 else 2
    return ".".join(labels[-keep:])


# HTML is read by a scanner of its own, not html.parser: html.parser goes quadratic on some
# input (CPython's CVE-2025-6069, unfixed in Debian's 3.11: 240 KB of "<!--" took 45 s),
# and so does a regular expression such as <[^>]*> on "<<<<". The scanner looks only for the
# tags the checks need, with one search that runs in C; each step starts where the last one
# ended, and what a step read is consumed, so a text of n characters costs about n steps in
# C and one step in Python per tag found, whatever the text holds. Comments, declarations
# and the bodies of <script> and <style> are skipped as the HTML Living Standard's tokenizer
# skips them; a tag that does not close within HTML_TAG_LIMIT characters is no tag.
HTML_TAG_LIMIT = 8 * 1024
HTML_TAGS_LIMIT = 10_000  # tags of one part that are checked: a real message has hundreds
_HTML_NEXT = re.compile(r"<(?=[!?]|/?[aeiflosAEIFLOS])"  # the look-ahead: 10 times faster
                        r"(?:!--|[!?]|(/?)(a|img|link|script|style|form|iframe|object|embed)"
                        r"(?=[\s/>]))", re.IGNORECASE)
_HTML_TAG_REST = re.compile(r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+>""")  # possessive: no
_HTML_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]*)))?""")
_HTML_RAW_END = {"script": re.compile(r"</script", re.IGNORECASE),  # backtracking at all
                 "style": re.compile(r"</style", re.IGNORECASE)}


def html_tags(text: str):
    """(name, attributes, start, end) of each tag the checks look at, in order: "a", "/a",
    "img" ...; attribute names in lower case, values with character references decoded."""
    position = 0
    while (found := _HTML_NEXT.search(text, position)) is not None:
        opener = found.group()
        if opener in ("<!--", "<!", "<?"):  # a comment runs to -->, the others to >
            close = text.find("-->" if opener == "<!--" else ">", found.end())
            position = len(text) if close < 0 else close + (3 if opener == "<!--" else 1)
            continue
        rest = _HTML_TAG_REST.match(text, found.end(), found.end() + HTML_TAG_LIMIT)
        if rest is None:  # never closed within the limit (or cut off by the end): skipped
            position = found.end() + HTML_TAG_LIMIT
            continue
        closing, name, position = bool(found.group(1)), found.group(2).lower(), rest.end()
        attributes = {} if closing else {
            attribute.group(1).lower(): html_unescape(next(
                (value for value in attribute.groups()[1:] if value is not None), ""))
            for attribute in reversed(list(_HTML_ATTRIBUTE.finditer(
                text, found.end(), rest.end() - 1)))}  # reversed: the first one counts
        yield ("/" if closing else "") + name, attributes, found.start(), position
        if not closing and name in _HTML_RAW_END:  # script and style hold no tags
            close = _HTML_RAW_END[name].search(text, position)
            position = len(text) if close is None else close.start()


class HtmlChecker:
    """What mail clients strip or spam filters flag in an HTML part: at most HTML_TAGS_LIMIT
    of its tags are read (complete says whether that was all of them)."""

    def __init__(self) -> None:
        self.no_alt: list[str] = []
        self.insecure: list[str] = []
        self.mismatched: list[tuple[str, str]] = []
        self.stripped: list[str] = []
        self.pixels: list[str] = []
        self.complete = True

    def feed(self, html_text: str) -> None:
        link: tuple[str, int] | None = None  # an <a href>'s target, and where its text starts
        for number, (tag, found, start, end) in enumerate(html_tags(html_text)):
            if number == HTML_TAGS_LIMIT:
                self.complete = False
                break
            if tag == "/a" and link is not None:
                self.check_link(link[0], html_text[link[1]:min(start, link[1] + 1000)])
                link = None
            elif tag == "a" and "href" in found:
                link = found["href"].strip()[:2048], end
                if link[0].lower().startswith("http:"):
                    self.insecure.append(link[0][:80])
            elif tag == "img":
                source = found.get("src", "")
                if "alt" not in found:
                    self.no_alt.append(source[:80])
                if found.get("width", "").strip() in ("0", "1") and found.get(
                        "height", "").strip() in ("0", "1"):
                    self.pixels.append(source[:80])
            elif tag in ("script", "form", "iframe", "object", "embed") or tag == "link" and (
                    "stylesheet" in found.get("rel", "").lower()):
                self.stripped.append(tag)

    def check_link(self, target_url: str, inside: str) -> None:
        """A link whose text is an address other than where it goes: phishing's mark."""
        text = html_unescape(re.sub(r"<[^<>]*>", "", inside))[:200].strip()
        shown = re.match(r"(?:https?://)?((?:[\w-]+\.)+[a-z]{2,})(?:[/:?#]|$)", text,
                         re.IGNORECASE)
        target = urllib.parse.urlsplit(target_url).hostname or ""
        if shown and ("://" in text or text.lower().startswith("www.")) and (
                shown.group(1).lower() != target.lower()):
            self.mismatched.append((text[:80], target))


def check_html(html_text: str, where: str) -> list[Finding]:
    checker = HtmlChecker()
    checker.feed(html_text)
    findings = [] if checker.complete and len(html_text) < HTML_CHECK_LIMIT else [Finding(
        "html-not-checked", "info", f"HTML of more than {HTML_TAGS_LIMIT:,} tags or "
        f"{HTML_CHECK_LIMIT:,} characters: only that much of it was checked", where,
        "sheesh's bound on the work of one check")]
    findings += repeated(checker.no_alt, lambda source: Finding(
        "img-alt-missing", "warning", f"an image without alt text ({source or 'no src'}): "
        "clients that block images show nothing in its place", where, "WCAG 2.2, 1.1.1"))
    findings += repeated(checker.mismatched, lambda pair: Finding(
        "link-text-mismatch", "warning", f"a link that shows {pair[0]!r} but goes to "
        f"{pair[1] or 'somewhere else'}: phishing filters flag this", where,
        "SpamAssassin's HTTPS_HTTP_MISMATCH and URI checks"))
    findings += repeated(checker.insecure, lambda link: Finding(
        "link-insecure", "warning", f"a link over plain http ({link}): browsers warn, and "
        "filters score it", where, "RFC 9110 section 4.2.2 (https)"))
    findings += repeated(sorted(set(checker.stripped)), lambda tag: Finding(
        "html-stripped", "warning", f"a <{tag}>: mail clients remove it (scripts, forms, "
        "frames, plug-ins and external style sheets do not work in mail)", where,
        "caniemail.com's support tables"))
    findings += repeated(checker.pixels, lambda source: Finding(
        "tracking-pixel", "info", f"a 1x1 image ({source or 'no src'}), the usual tracking "
        "pixel: some clients block or proxy it", where, "Apple Mail Privacy Protection"))
    return findings


# ---------------------------------------------------------------------------------------------
# 13. The in-process server
#
# Server puts the listeners, the store, the web inbox, the relay and the webhooks together for
# use from Python (the CLI uses it, and so can a test suite): it runs in background threads and
# can list, await and clear the messages. Config holds every option, read once.
# ---------------------------------------------------------------------------------------------

# Server.wait_for_message() hands out arrivals in order; it remembers this many, so that a
# server that runs for months without anyone waiting does not grow without end.
ARRIVALS_KEPT = 10_000


def split_host_and_port(text: str) -> tuple[str, int]:
    """"smtp.example.com:587" or "[2001:db8::1]:25" as (host, port); ValueError if not."""
    host, colon, port = text.rpartition(":")
    number = whole_number(port, 5)
    if not colon or not host or number is None or not 0 < number < 65536:
        raise ValueError(f"--relay expected HOST:PORT, not {text}")
    return host.strip("[]"), number


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    maildir: str | os.PathLike = DEFAULT_MAILDIR
    hostname: str = field(default_factory=socket.gethostname)
    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    timeout: float = DEFAULT_TIMEOUT
    grace: float = SHUTDOWN_GRACE
    fsync: bool = True
    print_messages: bool = False
    tls_cert: str | None = None  # PEM files for STARTTLS and the SMTPS port
    tls_key: str | None = None
    tls_self_signed: bool = False  # make a throwaway certificate at start-up instead
    smtps_port: int | None = None  # a second listener that speaks TLS from the start (RFC 8314)
    tls_required: bool = False
    auth_required: bool = False
    users: dict[str, str] | None = None  # user name -> password; None accepts any credentials
    http_port: int | None = None  # the web inbox and API; None: off (the CLI's default is 8025)
    http_host: str | None = None  # where the web inbox listens; None: where SMTP does
    http_users: dict[str, str] | None = None  # its HTTP Basic users; None: those of users
    http_allowed_hosts: tuple[str, ...] = ()  # Host names it answers beside IP literals
    faults: tuple[str, ...] = ()  # rules for failing on purpose (section 10)
    fail_seed: int | None = None  # makes the chances in those rules repeatable
    relay: str | None = None  # "host:port" of a real SMTP server to forward to (section 15)
    relay_user: str | None = None
    relay_password: str | None = None
    # "auto": STARTTLS when offered, else plain (but never a password in plain text beyond
    # loopback); "starttls" (required), "tls" (from the first byte) or "none"
    relay_tls: str = "auto"
    relay_insecure: bool = False  # TLS without checking the certificate (self-signed upstreams)
    relay_all: bool = False  # forward every message to its recipients as it arrives
    relay_match: str | None = None  # or only to the recipients that match this regex
    pop3_port: int | None = None  # POP3 over the same Maildir (section 16); None: off
    pop3s_port: int | None = None  # POP3 with TLS from the first byte
    imap_port: int | None = None  # IMAP over the same store (section 17); None: off
    imaps_port: int | None = None  # IMAP with TLS from the first byte
    max_messages: int | None = None  # keep at most this many messages: the oldest go first
    max_age: float | None = None  # and none older than this many seconds
    max_sessions: int = DEFAULT_MAX_SESSIONS  # session transcripts kept (section 11)
    webhooks: tuple[str, ...] = ()  # URLs told of each stored message (section 15)
    webhook_secret: str | None = None  # signs what they are told (HMAC-SHA256)
    index: bool = True  # keep the index in a file beside the Maildir (else in memory)
    # What the options above hold, read once, here (a mistake is a ValueError that says why):
    fault_rules: tuple[FaultRule, ...] = field(init=False, default=())
    relay_address: tuple[str, int] | None = field(init=False, default=None)
    relay_pattern: re.Pattern | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fault_rules", tuple(map(parse_fault, self.faults)))
        if self.relay is not None:
            object.__setattr__(self, "relay_address", split_host_and_port(self.relay))
        if self.relay_match is not None:
            try:
                pattern = re.compile(self.relay_match)
            except re.error as error:
                raise ValueError(f"--relay-match {self.relay_match!r} is not a regular "
                                 f"expression: {error}") from None
            object.__setattr__(self, "relay_pattern", pattern)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_self_signed)

    def policy(self) -> Policy:
        return Policy(max_size=self.max_size, max_recipients=self.max_recipients,
                      tls_available=self.tls, tls_required=self.tls_required,
                      auth_required=self.auth_required, users=self.users)


class CannotStart(OSError):
    """Why a Server could not start, as one sentence for its user (in strerror)."""


# What each port is for, and the option that moves it: for the message when it is taken.
PORT_OPTIONS = {"smtp": ("SMTP", "--port"), "smtps": ("SMTPS", "--smtps-port"),
                "pop3": ("POP3", "--pop3-port"), "pop3s": ("POP3S", "--pop3s-port"),
                "imap": ("IMAP", "--imap-port"), "imaps": ("IMAPS", "--imaps-port"),
                "web": ("the web inbox", "--http-port, or leave it out with --no-http")}


@contextlib.contextmanager
def listening(name: str, host: str, port: int):
    """Turn a refused bind into CannotStart that says which port, for what, and what to do."""
    try:
        yield
    except OSError as error:
        what, option = PORT_OPTIONS[name]
        raise CannotStart(error.errno, f"cannot listen on {host} port {port} for {what}: "
                                       f"{error.strerror or error} (choose another port with "
                                       f"{option})") from error


class Server:
    """sheesh running in background threads, for the CLI and for test suites.

        with sheesh.Server(port=0, maildir=tmp_path / "mail") as smtp:
            smtplib.SMTP(smtp.host, smtp.port).sendmail("me@example.com", ["you@example.com"],
                                                         "Subject: hi\\r\\n\\r\\nHello")
            print(smtp.wait_for_message().message["Subject"])  # hi
    """

    def __init__(self, config: Config | None = None, **options) -> None:
        self.config = replace(config or Config(), **options)
        self.maildir = Maildir(self.config.maildir, self.config.hostname,
                               fsync=self.config.fsync, on_delivery=self._delivered)
        self.store = Store(self.maildir, persistent=self.config.index,
                           max_messages=self.config.max_messages, max_age=self.config.max_age,
                           max_sessions=self.config.max_sessions)
        self._arrived: collections.deque[str] = collections.deque(maxlen=ARRIVALS_KEPT)
        self._arrival = threading.Condition()
        self._print_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self.address: tuple[str, int] = (self.config.host, self.config.port)
        self.ports: dict[str, int] = {}  # "smtp", "smtps", "pop3", "imap"...: the real ports
        self.pop3_locks = MaildropLocks()
        self.imap_recent = RecentMessages()
        self.logins = LoginGuard()
        self.addresses = ConnectionsByAddress(self.config.max_connections_per_ip)
        self.tls_context = None
        self.web: WebServer | None = None
        self.faults = FaultPlan(list(self.config.fault_rules),
                                self.config.fail_seed, max_delay=self.config.timeout)
        self.relay = Relay(self.config, self.store) if self.config.relay else None
        self.webhooks = (Webhooks(self.config.webhooks, self.config.webhook_secret, self.store)
                         if self.config.webhooks else None)
        self.policy = self.config.policy()
        self._relay_match = self.config.relay_pattern

    def start(self) -> Server:
        """Set up TLS, bind the ports, then create the Maildir and start serving. If any of it
        fails: CannotStart, saying which step and why, with nothing left running, and nothing
        created if TLS or a port failed."""
        config = self.config
        if config.tls:
            try:
                self.tls_context = make_tls_context(config)
            except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
                files = f" with {config.tls_cert} and {config.tls_key}" if config.tls_cert else ""
                reason = (getattr(error, "reason", None) or getattr(error, "strerror", None)
                          or error)
                raise CannotStart(getattr(error, "errno", None),
                                  f"cannot set up TLS{files}: {reason}") from error
        try:
            self._bind()
            try:
                self.store.open()
            except OSError as error:
                raise CannotStart(error.errno, f"cannot use {self.store.path} as a Maildir: "
                                               f"{error.strerror or error}") from error
        except OSError:
            self.stop()
            raise
        self.address = self._listeners[0].server_address[:2]
        if self.relay is not None:
            self.relay.start()
        if self.webhooks is not None:
            self.webhooks.web_url = self.web_url
            self.webhooks.start()
        for listener in self._listeners + ([self.web] if self.web else []):
            thread = threading.Thread(target=listener.serve_forever, args=(0.05,),
                                      name=f"sheesh-{listener.server_address[1]}", daemon=True)
            listener.serving = True
            thread.start()
            self._threads.append(thread)
        # Reading sheesh.py (Python compiles a script at each start) leaves 15 MB or more
        # freed but still held by the allocator: give it back now.
        give_back_memory()
        return self

    def _bind(self) -> None:
        """Every port, or CannotStart naming the one that was refused and what moves it."""
        config, context = self.config, self.tls_context
        for name, port, make_session, idle_timeout in [
                ("smtp", config.port, self.smtp_session, config.timeout),
                ("smtps", config.smtps_port, self.smtp_session, config.timeout),
                ("pop3", config.pop3_port, self.pop3_session, POP3_TIMEOUT),
                ("pop3s", config.pop3s_port, self.pop3_session, POP3_TIMEOUT),
                ("imap", config.imap_port, self.imap_session, IMAP_TIMEOUT),
                ("imaps", config.imaps_port, self.imap_session, IMAP_TIMEOUT)]:
            if port is not None:
                with listening(name, config.host, port):
                    listener = Listener(config.host, port, make_session,
                                        idle_timeout=idle_timeout,
                                        max_connections=config.max_connections,
                                        addresses=self.addresses, tls_context=context,
                                        implicit_tls=name.endswith("s"),
                                        protocol=name.upper(), store=self.store,
                                        faults=self.faults)
                self._listeners.append(listener)
                self.ports[name] = listener.server_address[1]
        if config.http_port is not None:
            with listening("web", self.web_host, config.http_port):
                self.web = WebServer(self.web_host, config.http_port,
                                     WebApp(self.store, self.faults, self.relay,
                                            self.web_policy(), self.webhooks),
                                     config.max_connections, self.addresses)

    def smtp_session(self, peer: str) -> Session:
        login = Login(self.config.users, peer, self.config.hostname, self.logins)
        return Session(self.maildir, self.config.hostname, peer, self.policy, faults=self.faults,
                       login=login)

    def pop3_session(self, peer: str) -> Pop3Session:
        return Pop3Session(self.store, self.pop3_locks, self.config.users,
                           tls_available=self.tls_context is not None,
                           tls_required=self.config.tls_required, peer=peer,
                           logins=self.logins)

    def imap_session(self, peer: str) -> ImapSession:
        return ImapSession(self.store, self.imap_recent, self.config.users,
                           tls_available=self.tls_context is not None,
                           tls_required=self.config.tls_required,
                           max_size=self.config.max_size, peer=peer, logins=self.logins)

    @property
    def web_host(self) -> str:
        return self.config.http_host or self.config.host

    def web_policy(self) -> WebPolicy:
        """The web inbox answers Host headers that are IP addresses, localhost, its own name
        and the names given it: anything else is a page of another site that renamed itself
        (DNS rebinding). Its users are --http-users, or else --users."""
        config = self.config
        return WebPolicy(
            users=config.http_users if config.http_users is not None else config.users,
            host_names=frozenset({config.hostname.lower(),
                                  *(name.lower() for name in config.http_allowed_hosts)}),
            exposed=not is_loopback(self.web_host), relay_match=self._relay_match,
            max_recipients=config.max_recipients, logins=self.logins)

    @property
    def web_url(self) -> str | None:
        if self.web is None:
            return None
        host, port = self.web.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; messages in DATA get `grace` seconds (default: the Config's) to end."""
        for listener in self._listeners:
            listener.stop_accepting()
        deadline = time.monotonic() + (self.config.grace if grace is None else grace)
        for listener in self._listeners:
            listener.finish_sessions(deadline)
        for worker in (self.relay, self.webhooks):
            if worker is not None:
                worker.stop()
        # The web before the store: a request that found the index closed was a 500, and a
        # SQLite connection closed under another thread can crash the process.
        if self.web is not None:
            if self.web.serving:
                self.web.shutdown()
            self.store.stop_waiting()  # ends the event streams and the waits
            self.web.finish_answers(time.monotonic() + WEB_STOP_WAIT)
            self.web.server_close()
        self.store.close()
        for thread in self._threads:
            thread.join()
        self._listeners, self._threads, self.web = [], [], None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        """The port it listens on: the real one, when the Config asked for port 0."""
        return self.address[1]

    @property
    def smtps_port(self) -> int | None:
        return self.ports.get("smtps")

    @property
    def pop3_port(self) -> int | None:
        return self.ports.get("pop3")

    @property
    def pop3s_port(self) -> int | None:
        return self.ports.get("pop3s")

    @property
    def imap_port(self) -> int | None:
        return self.ports.get("imap")

    @property
    def imaps_port(self) -> int | None:
        return self.ports.get("imaps")

    @property
    def active_connections(self) -> int:
        """How many clients are connected right now, on every port."""
        return sum(listener.connections for listener in self._listeners)

    @property
    def messages_arriving(self) -> int:
        """How many messages are in DATA (or in chunks) right now: what a stop waits for."""
        return sum(listener.in_data() for listener in self._listeners)

    def messages(self, mailbox: str | None = None) -> list[StoredMessage]:
        """Every message in the Maildir (or for one recipient), oldest first."""
        return self.store.messages(mailbox)

    def wait_for_message(self, timeout: float = 5.0) -> StoredMessage:
        """The next message this server stored that no earlier call returned, waiting up to
        `timeout` seconds for it to arrive; TimeoutError if none does."""
        deadline = time.monotonic() + timeout
        while True:
            with self._arrival:
                if not self._arrival.wait_for(lambda: self._arrived,
                                              deadline - time.monotonic()):
                    raise TimeoutError(f"no message arrived within {timeout} seconds")
                key = self._arrived.popleft()
            if (found := self.store.message(key)) is not None:  # else deleted already
                return found

    def clear(self) -> None:
        """Delete every message in the Maildir."""
        with self._arrival:
            self._arrived.clear()
        self.store.delete_all()

    def _delivered(self, delivery: Delivery) -> None:
        arrival = self.store.arrived(delivery)
        if self.relay is not None and (self.config.relay_all or self._relay_match):
            recipients = [r for r in delivery.envelope.recipients
                          if self._relay_match is None or self._relay_match.search(r)]
            if recipients:  # only to the allowed recipients: never an open relay
                self.relay.queue(delivery.queue_id, delivery.envelope.sender, recipients)
        if self.webhooks is not None:
            self.webhooks.queue(delivery.queue_id, arrival)
        with self._arrival:
            self._arrived.append(delivery.queue_id)
            self._arrival.notify_all()
        if log.isEnabledFor(logging.INFO):
            log.info("%s", describe_delivery(delivery))
        if self.config.print_messages:
            self._print(delivery)

    def _print(self, delivery: Delivery) -> None:
        """What DebuggingServer printed, with the envelope too, so Bcc recipients show."""
        envelope = delivery.envelope
        head = [f"---------- MESSAGE {delivery.queue_id} ----------",
                f"X-Peer: {envelope.peer}", f"MAIL FROM: <{envelope.sender}>",
                *(f"RCPT TO: <{recipient}>" for recipient in envelope.recipients), ""]
        with self._print_lock, open(delivery.path, "rb") as file:
            out = sys.stdout.buffer
            out.write("".join(escape_for_log(line) + "\n" for line in head).encode("utf-8"))
            while chunk := file.read(READ_SIZE):
                out.write(chunk)
            out.write(b"\n------------ END MESSAGE ------------\n")
            out.flush()


def describe_delivery(delivery: Delivery) -> str:
    """The log line for one message: sender, recipients, subject, size, file."""
    envelope = delivery.envelope
    recipients = ", ".join(f"<{recipient}>" for recipient in envelope.recipients)
    text = (f"from <{envelope.sender}> to {recipients} subject {subject_of(delivery.head)!r}"
            f" size {delivery.size} stored {delivery.path}")
    return escape_for_log(text)


# ---------------------------------------------------------------------------------------------
# 14. The web inbox and JSON API
#
# A page to read the mail in a browser, and a JSON API for tests, served by http.server from
# the same store, at http://127.0.0.1:8025 (the port Mailpit and MailHog use). The same split
# as SMTP: the Store's index answers the lists and searches, so no request reads a file it does
# not return; WebApp turns a request into a Response and never touches a socket; WebHandler
# only moves bytes. The page itself is Part III.
#
# Captured mail is hostile content. Every value from a message is put in the page as text (the
# page builds it with textContent, never innerHTML); an HTML part is shown in an <iframe sandbox>
# without scripts, under a Content-Security-Policy that blocks scripts and remote content until
# the reader asks for images; an id in a URL is only ever looked up, never made into a path.
# ---------------------------------------------------------------------------------------------

DEFAULT_HTTP_PORT = 8025  # the web inbox's: the port Mailpit and MailHog use


PAGE_LIMIT_MAX = 500  # the most messages one API call lists
WEB_REQUEST_TIMEOUT = 30.0  # a request must arrive whole within this (the wait for it included)
WEB_HEAD_LIMIT = 16 * 1024  # the bytes of a request's first line and headers together
WEB_WRITE_TIMEOUT = 60.0  # a client must read what it asked for within this
WEB_STREAM_LIMIT = 64  # event streams and waits open at once, beside ordinary requests
WAIT_TIMEOUT_MAX = 300.0  # the longest /api/messages/wait may hold a request
EVENT_KEEPALIVE = 15.0  # seconds between keep-alive comments on an idle event stream
REQUEST_BODY_LIMIT = 64 * 1024
WEB_STOP_WAIT = 5.0  # seconds the requests being answered get to end when sheesh stops


@dataclass
class Response:
    status: int
    body: bytes | Streamed = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class EventStream:
    """A response that goes on: Server-Sent Events, written by WebHandler as they happen."""

    after: int


def json_response(data, status: int = 200) -> Response:
    # "<", ">" and "&" escaped, so that no browser could ever take the JSON for HTML; and a
    # stray surrogate, from a header that was not UTF-8, becomes "?" rather than an error.
    text = json.dumps(data, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Response(status, text.encode("utf-8", "replace"))


def json_error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


# The HTML part of a message is shown under this policy: no scripts, no plugins, nothing
# fetched from elsewhere (a tracking pixel would tell the sender the mail was read), and only
# framed by sheesh's own page.
# No script, no form, nothing fetched but data: (and remote images when asked for). Sandboxed,
# but same-origin, so that the inbox can size its frame to the content: with no script
# allowed, same-origin lets the part do nothing.
HTML_PART_POLICY = ("default-src 'none'; style-src 'unsafe-inline' data:; img-src data:{remote}; "
                    "font-src data:; form-action 'none'; base-uri 'none'; "
                    "frame-ancestors 'self'; sandbox allow-popups "
                    "allow-popups-to-escape-sandbox allow-same-origin")


@dataclass(frozen=True)
class WebPolicy:
    """Who may use the web inbox, and how much of the relay it may use."""

    users: dict[str, str] | None = None  # HTTP Basic; None: no password asked
    host_names: frozenset[str] = frozenset()  # names that Host may give, beside IP literals
    exposed: bool = False  # listening beyond loopback
    relay_match: re.Pattern | None = None  # release only to recipients that match
    max_recipients: int = DEFAULT_MAX_RECIPIENTS  # and to at most so many
    logins: LoginGuard | None = None


def route_of(target: str) -> tuple[list[str], dict]:
    """A request's target as every decision on it reads it: the path's segments, each
    percent-decoded, the empty ones dropped, and the query. The absolute form
    (http://host/path, RFC 9112 section 3.2.2) is read as its path. The stream cap once read
    the raw path, so /api/%65vents, //wait and the absolute form each took an ordinary slot."""
    url = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    return [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p], query


STREAM_ROUTES = (["api", "events"], ["api", "messages", "wait"])  # long-lived: counted apart


class WebApp:
    """The web inbox's routes: a request in, a Response out."""

    def __init__(self, store: Store, faults: FaultPlan | None = None, relay: Relay | None = None,
                 policy: WebPolicy = WebPolicy(), webhooks: Webhooks | None = None) -> None:
        self.store, self.faults, self.relay = store, faults or FaultPlan(), relay
        self.policy, self.webhooks = policy, webhooks

    def respond(self, method: str, target: str, headers=None, body: bytes = b"",
                peer: str = "127.0.0.1") -> Response | EventStream:
        headers = headers or {}
        refusal = self.refuse_foreign(method, headers) or self.refuse_stranger(headers, peer)
        if refusal is not None:
            return refusal
        parts, query = route_of(target)
        if self.policy.exposed and self.policy.users is None and not is_loopback(peer) and (
                parts[-1:] == ["release"] or (method, parts) == ("PUT", ["api", "faults"])):
            return json_error(403, "the web inbox listens beyond loopback without --users or "
                                   "--http-users: releasing mail and changing the fault rules "
                                   "are allowed only from loopback")
        try:
            return self.route(method, parts, query, body)
        except (BadRequest, BadQuery) as problem:
            return json_error(400, str(problem))
        except OSError as error:  # the Maildir moved away, or a disk failing: say so, no more
            log.error("the web inbox cannot read %s: %s", self.store.path,
                      error.strerror or error)
            return json_error(503, f"the Maildir cannot be read: {error.strerror or error}")

    def refuse_foreign(self, method: str, headers) -> Response | None:
        """Requests another web site makes the browser send are refused: a Host that is not
        ours (DNS rebinding), or a change of state asked for by a page of another origin."""
        name = host_name(headers.get("Host") or "")
        if name and not self.host_allowed(name):
            return json_error(403, f"unknown Host {name!r}: to answer it, start sheesh with "
                                   f"--http-allowed-host {name}")
        if method not in ("GET", "HEAD") and (headers.get("Sec-Fetch-Site") == "cross-site" or (
                headers.get("Origin") and urllib.parse.urlsplit(
                    headers["Origin"]).netloc != headers.get("Host"))):
            return json_error(403, "cross-origin requests cannot change the mail")
        return None

    def host_allowed(self, name: str) -> bool:
        """A Host of ours: an IP address (which no other site can take over, unlike a name:
        DNS rebinding), localhost and its subdomains, --hostname, --http-allowed-host."""
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return (name in ("localhost", *self.policy.host_names)
                    or name.endswith(".localhost"))

    def refuse_stranger(self, headers, peer: str) -> Response | None:
        """With users (--users or --http-users), HTTP Basic authentication (RFC 7617), and
        the same throttle on failures as SMTP, POP3 and IMAP."""
        if self.policy.users is None:
            return None
        logins = self.policy.logins
        if logins is not None and logins.refuses(peer):
            return json_error(429, "too many failed logins from your address: try again later")
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            except (ValueError, binascii.Error):
                user, password = b"", b""
            user = user.decode("utf-8", "replace")
            if password_matches(self.policy.users, user, password):
                return None
            if logins is not None:
                logins.failed(peer, user, "HTTP")
        response = json_error(401, "log in with a user name and password of --users")
        response.headers["WWW-Authenticate"] = 'Basic realm="sheesh", charset="UTF-8"'
        return response

    def route(self, method: str, parts: list[str], query: dict, body: bytes):
        match method, parts:
            case "GET", []:
                return self.page()
            case "GET", ["favicon.ico"]:  # the page declares none; a browser asks anyway
                return Response(204, b"", "image/x-icon")
            case "GET", ["api", "health"]:
                return json_response({"status": "ok", "version": __version__,
                                      **self.store.status(), "relay": self.relay is not None,
                                      "changes": self.store.last_event})
            case "GET", ["api", "messages"]:
                return self.list_messages(query)
            case "DELETE", ["api", "messages"]:
                return json_response({"deleted": self.store.delete_all()})
            case "GET", ["api", "mailboxes"]:
                return json_response({"mailboxes": self.store.mailboxes()})
            case "GET", ["api", "messages", "latest"]:
                newest = self.store.search(query.get("query", ""), mailbox(query), 1, 0).messages
                return self.message(newest[0].key) if newest else json_error(404, "no messages")
            case "GET", ["api", "messages", "wait"]:
                return self.wait(query)
            case "GET", ["api", "messages", key]:
                return self.message(key)
            case "DELETE", ["api", "messages", key]:
                return (json_response({"deleted": 1}) if self.store.delete([key])
                        else json_error(404, "no such message"))
            case "POST", ["api", "messages", key, "release"]:
                return self.release(key, body)
            case "PUT", ["api", "messages", key, "seen"]:
                return (json_response({"seen": True}) if self.store.mark_seen(key)
                        else json_error(404, "no such message"))
            case "GET", ["api", "messages", key, "raw"]:
                return self.raw(key)
            case "GET", ["api", "messages", key, "checks"]:
                return self.checks(key)
            case "GET", ["api", "messages", key, "html"]:
                return self.html_part(key, remote=query.get("remote") == "1")
            case "GET", ["api", "messages", key, "attachments", number]:
                return self.attachment(key, number)
            case "GET", ["api", "sessions"]:
                return self.list_sessions(query)
            case "GET", ["api", "sessions", number]:
                found = self.store.session(whole_number(number) or 0)
                return json_response(found) if found else json_error(404, "no such session")
            case "GET", ["api", "events"]:
                return EventStream(self.store.last_event)
            case "GET", ["api", "faults"]:
                return json_response(self.faults.as_json())
            case "PUT", ["api", "faults"]:
                return self.replace_faults(body)
            case _, ["api", *_]:
                return json_error(404 if method in ("GET", "DELETE", "PUT", "POST") else 405,
                                  f"no such endpoint: {method} /{'/'.join(parts)}")
            case _:
                return Response(404, b"Not found", "text/plain; charset=utf-8")

    def checks(self, key: str) -> Response:
        summary = self.store.summary(key)
        findings = self.store.checks(summary) if summary is not None else None
        if findings is None:
            return json_error(404, "no such message")
        return json_response({"counts": check_counts(findings),
                              "findings": [finding.as_json() for finding in findings]})

    def list_sessions(self, query: dict) -> Response:
        limit, offset = number(query, "limit", 50), number(query, "offset", 0)
        outcome = query.get("outcome") or None
        if outcome not in (None, "stored", "refused", "error", "none"):
            raise BadRequest("outcome is stored, refused, error or none")
        protocol = (query.get("protocol") or "").upper() or None
        if protocol not in (None, "SMTP", "POP3", "IMAP"):
            raise BadRequest("protocol is SMTP, POP3 or IMAP")
        total, sessions = self.store.sessions(query.get("peer") or None, outcome,
                                              min(limit, PAGE_LIMIT_MAX), offset, protocol)
        return json_response({"total": total, "offset": offset, "sessions": sessions})

    def list_messages(self, query: dict) -> Response:
        limit, offset = number(query, "limit", 50), number(query, "offset", 0)
        page = self.store.search(query.get("query", ""), mailbox(query),
                                 min(limit, PAGE_LIMIT_MAX), offset)
        return json_response({"total": page.total, "unread": page.unread, "offset": offset,
                              "indexing": self.store.status()["indexing"],
                              "messages": [summary.as_json() for summary in page.messages]})

    def release(self, key: str, body: bytes) -> Response:
        """POST /api/messages/{id}/release {"to": [...]}: send a stored message on, to its
        own recipients or to the ones given."""
        if self.relay is None:
            return json_error(409, "no relay is configured (start sheesh with --relay HOST:PORT)")
        summary = self.store.summary(key)
        if summary is None:
            return json_error(404, "no such message")
        try:
            recipients = json.loads(body or b"{}").get("to") or summary.recipients
        except (ValueError, AttributeError):
            raise BadRequest('the body must be JSON: {"to": ["address", ...]}') from None
        if not isinstance(recipients, list) or not all(
                isinstance(r, str) and is_valid_address(r, null_allowed=False) for r in recipients):
            raise BadRequest('"to" must be a list of addresses')
        if len(recipients) > self.policy.max_recipients:
            raise BadRequest(f"at most {self.policy.max_recipients} recipients "
                             "(--max-recipients)")
        if self.policy.relay_match is not None and (refused := [
                r for r in recipients if not self.policy.relay_match.search(r)]):
            return json_error(403, f"--relay-match {self.policy.relay_match.pattern} does not "
                                   f"allow {', '.join(refused[:5])}")
        if not self.relay.queue(key, summary.sender, recipients):
            return json_error(503, "the relay queue is full, try again later")
        return json_response({"queued": True, "to": recipients}, 202)

    def replace_faults(self, body: bytes) -> Response:
        """PUT /api/faults {"rules": [...], "seed": 42}: the rules in force from now on."""
        try:
            request = json.loads(body or b"{}")
            rules = [fault_from_json(rule) for rule in request.get("rules", [])]
            seed = request.get("seed")
            if seed is not None and not isinstance(seed, int):
                raise ValueError("seed must be a whole number or null")
            self.faults.replace(rules, seed)  # ValueError for a rule that cannot run
        except (ValueError, AttributeError) as error:  # json.JSONDecodeError is a ValueError
            raise BadRequest(str(error)) from None
        log.warning("fault rules replaced through the API: %s",
                    escape_for_log("; ".join(rule.text for rule in rules) or "none"))
        return json_response(self.faults.as_json())

    def wait(self, query: dict) -> Response:
        timeout = float(number(query, "timeout", 10))
        if timeout > WAIT_TIMEOUT_MAX:  # held past it, a proxy or client would cut it anyway
            raise BadRequest(f"timeout is at most {WAIT_TIMEOUT_MAX:g} seconds")
        # Without after=, a message that arrives from now on: what a test that just sent one
        # means, and never yesterday's match (after=0 takes any).
        after = float(number(query, "after", 0)) if "after" in query else time.time()
        search = parse_search(query.get("query", ""))
        found = self.store.wait_for(search, mailbox(query), after, timeout)
        if found is None and self.store.closed:  # woken by the stop, not by the timeout
            return json_error(503, "sheesh is stopping")
        if found is None:
            return json_error(408, f"no message matching the query arrived in {timeout:g} s")
        return self.message(found.key, news=True)

    @contextlib.contextmanager
    def _reading(self, key: str, news: bool = False):
        """The message's bytes and MIME outline, or None if there is no such message."""
        stored = self.store.message(key, news)
        try:
            file = stored.open() if stored is not None else None
        except LookupError:
            file = None
        if file is None:
            yield None
            return
        with file, message_bytes(file) as buffer:
            yield stored, buffer, outline(buffer)

    def message(self, key: str, news: bool = False) -> Response:
        with self._reading(key, news) as found:
            if found is None:
                return json_error(404, "no such message")
            stored, buffer, root = found
            parts = message_parts(root)
            url = f"/api/messages/{urllib.parse.quote(key)}"
            session = self.store.session_of(key)
            return json_response({
                **stored.summary.as_json(),
                "relay": self.relay.history(key) if self.relay is not None else None,
                "webhooks": self.webhooks.history(key) if self.webhooks is not None else None,
                "session": {"id": session, "url": f"/api/sessions/{session}"} if session
                else None,
                "headers": [[name, decode_words(str(value))] for name, value in
                            root.headers.items()],
                **shown_text("text", buffer, parts.text), **shown_text("html", buffer, parts.html),
                "raw_url": f"{url}/raw", "html_url": f"{url}/html" if parts.html else None,
                "attachments": [attachment_json(buffer, part, n, url) for n, part in
                                enumerate(parts.attachments) if not part.inline],
                "inline": [{**attachment_json(buffer, part, n, url),
                            "content_id": part.content_id}
                           for n, part in enumerate(parts.attachments) if part.inline]})

    def raw(self, key: str) -> Response:
        stored = self.store.message(key)
        try:
            file = stored.open() if stored is not None else None
        except LookupError:
            file = None
        if file is None:
            return json_error(404, "no such message")
        size = os.fstat(file.fileno()).st_size
        return Response(200, Streamed(lambda: iter(functools.partial(file.read, READ_SIZE), b""),
                                      size, file.close), "text/plain; charset=utf-8")

    def html_part(self, key: str, *, remote: bool) -> Response:
        with self._reading(key) as found:
            if found is None:
                return json_error(404, "no such message")
            _, buffer, root = found
            parts = message_parts(root)
            html = shown_text("html", buffer, parts.html)["html"]
            html = inline_cid_images(html, buffer, parts.attachments)
        policy = HTML_PART_POLICY.format(remote=" https: http:" if remote else "")
        return Response(200, html.encode("utf-8"), "text/html; charset=utf-8",
                        {"Content-Security-Policy": policy})

    def attachment(self, key: str, number_text: str) -> Response:
        stored = self.store.message(key)
        if stored is None:
            return json_error(404, "no such message")
        resources = contextlib.ExitStack()
        try:
            file = resources.enter_context(stored.open())
            buffer = resources.enter_context(message_bytes(file))
            attachments = message_parts(outline(buffer)).attachments
            number = whole_number(number_text)
            if number is None or number >= len(attachments):
                resources.close()
                return json_error(404, "no such attachment")
        except LookupError:
            resources.close()
            return json_error(404, "no such message")
        except BaseException:
            resources.close()
            raise
        part = attachments[number]
        name = attachment_name(part, number)
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "_")
        disposition = (f"attachment; filename=\"{ascii_name}\"; "
                       f"filename*=UTF-8''{urllib.parse.quote(name)}")  # RFC 6266
        body = Streamed(lambda: decoded_chunks(buffer, part), decoded_size(buffer, part),
                        resources.close)
        return Response(200, body, part.content_type, {"Content-Disposition": disposition})

    def page(self) -> Response:
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                  "img-src 'self' data:; frame-src 'self'; frame-ancestors 'none'")
        return Response(200, INBOX_PAGE.replace("{nonce}", nonce).encode("utf-8"),
                        "text/html; charset=utf-8", {"Content-Security-Policy": policy})


def attachment_json(buffer, part: MimePart, number: int, url: str) -> dict:
    """An attachment (or an inline part) as the API lists it: numbered among all of them."""
    return {"index": number, "filename": attachment_name(part, number),
            "content_type": part.content_type, "size": decoded_size(buffer, part),
            "url": f"{url}/attachments/{number}"}


def inline_cid_images(html: str, buffer, parts: list[MimePart]) -> str:
    """Images an HTML part refers to as cid:ID (RFC 2392) come with the message: put each in
    the page as a data: URL, which the HTML part's policy allows and which fetches nothing."""
    wanted = set(urllib.parse.unquote(found) for found in re.findall(r"cid:([^\"'\s>)]+)", html))
    by_id = {}
    for part in parts:
        content_id = part.content_id
        if content_id in wanted and part.content_type.startswith("image/"):
            encoded = base64.b64encode(part_bytes(buffer, part)).decode()
            by_id[content_id] = f"data:{part.content_type};base64,{encoded}"
    if not by_id:
        return html
    return re.sub(r"cid:([^\"'\s>)]+)",
                  lambda found: by_id.get(urllib.parse.unquote(found.group(1)), found.group(0)),
                  html)


class BadRequest(ValueError):
    pass


def number(query: dict, name: str, default: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if (value := whole_number(text)) is None:
        raise BadRequest(f"{name} must be a whole number, not {text[:20]!r}")
    return value


def host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8025" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def mailbox(query: dict) -> str | None:
    """The mailbox= parameter: a recipient's address, or None for every message."""
    return query.get("mailbox") or None


class RequestReader:
    """What a web handler reads from its connection: every read ends at the request's
    deadline, and a request's head (its first line and its headers) may take only so many
    bytes. A client that sends a header a minute (slowloris), or megabytes of headers, costs
    a known amount, for a known time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""
        self.deadline: float | None = None
        self.head_left: int | None = None

    def start(self, seconds: float, head_limit: int) -> None:
        self.deadline, self.head_left = time.monotonic() + seconds, head_limit

    def stop(self) -> None:
        """The request is read: the response may take its time (event streams, waits)."""
        self.deadline = self.head_left = None

    def receive(self) -> bool:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long")
            self.sock.settimeout(left)
        data = self.sock.recv(READ_SIZE)
        self.buffer += data
        return bool(data)

    def readline(self, limit: int = -1) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0 and (limit < 0 or len(self.buffer) < limit):
            if self.head_left is not None and len(self.buffer) > self.head_left:
                raise http.client.LineTooLong("the request's head")
            if not self.receive():
                break
        cut = end + 1 if end >= 0 else len(self.buffer)
        line, self.buffer = self.buffer[:cut if limit < 0 else min(cut, limit)], self.buffer[
            cut if limit < 0 else min(cut, limit):]
        if self.head_left is not None:
            self.head_left -= len(line)
            if self.head_left < 0:
                raise http.client.LineTooLong("the request's head")
        return line

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size and self.receive():
            pass
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self) -> None:
        pass


class WebHandler(http.server.BaseHTTPRequestHandler):
    """The only code that reads or writes a web connection."""

    server_version = f"sheesh/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = WEB_WRITE_TIMEOUT  # for writes: a client must read what it asked for
    stream = False  # an event stream or a wait: counted apart from ordinary requests

    def setup(self) -> None:
        super().setup()
        self.rfile = RequestReader(self.connection)

    def handle(self) -> None:
        """One connection: admitted within the server's limits, or refused at once with 503."""
        refusal = self.server.admit(self)
        if refusal is not None:
            body = json.dumps({"error": refusal}).encode()
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                 b"application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        try:
            super().handle()
        finally:
            self.server.forget(self)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within WEB_REQUEST_TIMEOUT (the wait for it on
        a kept-alive connection included) and have a head of at most WEB_HEAD_LIMIT bytes."""
        self.rfile.start(WEB_REQUEST_TIMEOUT, WEB_HEAD_LIMIT)
        try:
            super().handle_one_request()
        except http.client.HTTPException:  # the request line alone was too long
            self.connection.settimeout(self.timeout)
            self.send_error(431, "the request's head is too long")
            self.close_connection = True

    def do_GET(self) -> None:
        self.answer("GET")

    def do_HEAD(self) -> None:
        self.answer("HEAD")

    def do_DELETE(self) -> None:
        self.answer("DELETE")

    def do_PUT(self) -> None:
        self.answer("PUT")

    def do_POST(self) -> None:
        self.answer("POST")

    def answer(self, method: str) -> None:
        length = whole_number(self.headers.get("Content-Length", "0"))
        if length is None or length > REQUEST_BODY_LIMIT:
            self.send(json_error(413, "request body too large"))
            self.close_connection = True
            return
        body = self.rfile.read(length)
        self.rfile.stop()
        self.connection.settimeout(self.timeout)
        if route_of(self.path)[0] in STREAM_ROUTES and not self.server.make_stream(self):
            self.send(json_error(503, f"too many event streams and waits open (at most "
                                      f"{WEB_STREAM_LIMIT}): try again later"))
            self.close_connection = True
            return
        if not self.server.begin_answer():
            self.send(json_error(503, "sheesh is stopping"))
            self.close_connection = True
            return
        try:
            try:
                response = self.server.app.respond("GET" if method == "HEAD" else method,
                                                   self.path, self.headers, body,
                                                   self.client_address[0])
            except DATABASE_ERRORS as error:  # locked by another program, being rebuilt
                self.server.app.store.damage_found(error)
                response = json_error(503, f"the index cannot be read just now ({error}): "
                                           "try again in a moment")
                response.headers["Retry-After"] = "1"
            except Exception:
                log.exception("error answering %s", escape_for_log(self.path))
                response = json_error(500, "internal error")
            if isinstance(response, EventStream):
                self.stream_events(response.after)
            else:
                self.send(response, with_body=method != "HEAD")
        finally:
            self.server.end_answer()

    def send(self, response: Response, *, with_body: bool = True) -> None:
        body = response.body
        try:
            self.send_response(response.status)
            length = body.length if isinstance(body, Streamed) else len(body)
            headers = {"Content-Type": response.content_type, "Content-Length": str(length),
                       "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                       "Referrer-Policy": "no-referrer", **response.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if with_body and isinstance(body, Streamed):
                for chunk in body.chunks():
                    self.wfile.write(chunk)
            elif with_body:
                self.wfile.write(body)
        finally:
            if isinstance(body, Streamed):
                body.close()

    def stream_events(self, after: int) -> None:
        """Server-Sent Events: one "event:" and "data:" pair per change, until either side
        stops; a comment now and then keeps proxies from closing an idle stream."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff")):
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        store = self.server.app.store
        with store.watching():
            while not store.closed:
                events = store.events_after(after, EVENT_KEEPALIVE)
                chunk = "".join(f"event: {event}\ndata: {json.dumps(data)}\n\n"
                                for _, event, data in events) or ": keep-alive\n\n"
                if events:
                    after = events[-1][0]
                self.wfile.write(chunk.encode("utf-8"))

    def log_message(self, format: str, *args) -> None:
        log.debug("web: %s %s", self.address_string(), escape_for_log(format % args))


class WebServer(http.server.ThreadingHTTPServer):
    """http.server with the limits SMTP has: a deep listen backlog, a cap on connections (and
    on connections from one address), and event streams and waits counted apart, so that
    they cannot take the slots ordinary requests need."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # as Listener's
    serving = False  # as Listener.serving

    def __init__(self, host: str, port: int, app: WebApp, max_connections: int,
                 addresses: ConnectionsByAddress) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app, self.max_connections, self.addresses = app, max_connections, addresses
        self._open, self._streams = set(), set()
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)  # an answer ended
        self._answering, self._stopping = 0, False
        super().__init__((host, port), WebHandler)

    def begin_answer(self) -> bool:
        """A request is about to be answered: False once the server is stopping."""
        with self._lock:
            self._answering += not self._stopping
            return not self._stopping

    def end_answer(self) -> None:
        with self._lock:
            self._answering -= 1
            self._answered.notify_all()

    def finish_answers(self, deadline: float) -> None:
        """Refuse new requests, and wait (until the deadline) for those being answered: the
        store they read is closed after this."""
        with self._lock:
            self._stopping = True
            self._answered.wait_for(lambda: not self._answering, deadline - time.monotonic())

    def admit(self, handler: WebHandler) -> str | None:
        with self._lock:
            if len(self._open) >= self.max_connections:
                return "too many connections to the web inbox: try again later"
            if not self.addresses.take(handler.client_address[0]):
                return "too many connections from your address: try again later"
            self._open.add(handler)
            return None

    def make_stream(self, handler: WebHandler) -> bool:
        """A connection becomes a long-lived stream: out of the ordinary count, into its own."""
        with self._lock:
            if len(self._streams) >= WEB_STREAM_LIMIT:
                return False
            self._open.discard(handler)
            self._streams.add(handler)
            return True

    def forget(self, handler: WebHandler) -> None:
        with self._lock:
            if handler in self._open or handler in self._streams:
                self._open.discard(handler)
                self._streams.discard(handler)
                self.addresses.give(handler.client_address[0])

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a browser closing a tab is no error
            log.exception("error on a web connection from %s", client_address[0])


# ---------------------------------------------------------------------------------------------
# 15. Forwarding: relay, webhooks, and the sendmail entry point
#
# "Why does my mail not show up in my Gmail?" Because a sink keeps it. With --relay HOST:PORT,
# a message can be sent on: released by hand (the API, or the page's button), or relayed as it
# arrives (--relay-all, or --relay-match REGEX for an allow-list of recipients). The message is
# stored and acknowledged first; one worker thread sends it afterwards, so relaying never slows
# a session, and a dead upstream never loses the stored copy. A temporary failure (a 4xx, a
# refused connection, a timeout) is tried again after 2, 4, 8 and 16 seconds; a permanent
# one (a 5xx) is not. sheesh relays nothing unless one of these options is given. Webhooks
# (--webhook URL) work the same way, and the sendmail entry point is the way in for programs
# that run sendmail.
# ---------------------------------------------------------------------------------------------

CERTIFICATE_REFUSED = (ssl.SSLCertVerificationError,) if ssl is not None else ()


RELAY_ATTEMPTS = 5  # the first try and four retries
RELAY_TIMEOUT = 30.0  # seconds the upstream server has for each step
FIRST_RETRY = 2.0  # seconds (relay and webhooks); each later wait is twice the one before
QUEUE_LIMIT = 1000  # jobs waiting (relay, webhooks); past that, new ones are not queued
HISTORY_KEPT = 10_000  # messages whose attempts (relay, webhooks) the API can show


def strip_trace_headers(raw: bytes) -> bytes:
    """The message as it was sent: without the Return-Path, Delivered-To, X-Sheesh-DSN and
    Received lines that sheesh put on top (Received ends where a line does not start with a
    tab)."""
    position = 0
    while raw.startswith((b"Return-Path:", b"Delivered-To:", b"X-Sheesh-DSN:"), position):
        position = raw.index(b"\r\n", position) + 2
    if raw.startswith(b"Received:", position):
        position = raw.index(b"\r\n", position) + 2
        while raw.startswith(b"\t", position):
            position = raw.index(b"\r\n", position) + 2
    return raw[position:]


@dataclass
class RelayJob:
    key: str  # never a path: the message may be read, and moved, while it waits
    sender: str
    recipients: list[str]
    attempts: int = 0


class RetryingWorker:
    """Jobs about stored messages, done one at a time by one thread in the order they fall
    due; a job that fails for a reason worth waiting out is tried again after 2, 4, 8 and 16
    seconds. Every attempt's outcome is kept per message, for the API. Relaying and webhooks
    both work this way, and neither slows a session: queue() only queues."""

    name = "worker"  # for the log and the thread

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, object]] = []  # a heap, by when each is due
        self._numbers = itertools.count()
        self._changed = threading.Condition()
        self._history: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()
        self._stopping = False
        self._full_logged = -math.inf
        self._thread = threading.Thread(target=self._work, name=f"sheesh-{self.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with self._changed:
            self._stopping = True
            left = len(self._queue)
            self._changed.notify_all()
        self._thread.join(timeout=RELAY_TIMEOUT)
        if left:
            log.warning("%s: %d message(s) were still waiting and were not sent (they stay "
                        "stored)", self.name, left)

    def enqueue(self, key: str, job, delay: float = 0.0, **about) -> bool:
        """Queue a job; False if the queue is full (the message stays stored all the same)."""
        with self._changed:
            if len(self._queue) >= QUEUE_LIMIT:
                if time.monotonic() - self._full_logged >= 60:  # once a minute, not per message
                    self._full_logged = time.monotonic()
                    log.warning("%s: %d jobs are waiting: new ones are not queued", self.name,
                                len(self._queue))
                self.record(key, f"not queued: the {self.name} queue is full", **about)
                return False
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._numbers), job))
            self._changed.notify_all()
            return True

    def history(self, key: str) -> list[dict]:
        with self._changed:
            return list(self._history.get(key, []))

    def record(self, key: str, outcome: str, **about) -> None:
        with self._changed:
            entries = self._history.setdefault(key, [])
            entries.append({"time": time.time(), **about, "outcome": outcome})
            self._history.move_to_end(key)
            while len(self._history) > HISTORY_KEPT:
                self._history.popitem(last=False)

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and (
                        not self._queue or self._queue[0][0] > time.monotonic()):
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._changed.wait(wait)
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._queue)
            try:
                self.attempt(job)
            except Exception:  # a job that fails this way is dropped, never the worker
                log.exception("%s: error while sending for %s", self.name, job.key)

    def attempt(self, job) -> None:
        raise NotImplementedError


class Relay(RetryingWorker):
    """Sends stored messages on to another SMTP server, from one worker thread."""

    name = "relay"

    def __init__(self, config: Config, store: Store) -> None:
        super().__init__()
        self.config, self.store = config, store
        self.host, self.port = config.relay_address

    def queue(self, key: str, sender: str, recipients: list[str]) -> bool:
        """Queue a message; False if the queue is full (it stays stored all the same)."""
        return self.enqueue(key, RelayJob(key, sender, list(recipients)), to=list(recipients))

    def attempt(self, job: RelayJob) -> None:
        job.attempts += 1
        # Each recipient that was not sent to: (SMTP code or None, what happened, worth
        # another try). Only a 4xx reply and a network failure are worth one.
        failed: dict[str, tuple[int | None, str, bool]]
        try:
            refused = self.send(job)
            failed = {recipient: (code, text.decode("utf-8", "replace"), 400 <= code < 500)
                      for recipient, (code, text) in refused.items()}
        except smtplib.SMTPRecipientsRefused as error:
            failed = {r: (code, text.decode("utf-8", "replace"), 400 <= code < 500)
                      for r, (code, text) in error.recipients.items()}
        except smtplib.SMTPResponseException as error:
            failed = dict.fromkeys(job.recipients, (error.smtp_code, reply_text(error),
                                                    400 <= error.smtp_code < 500))
        except RelaySettingsProblem as error:  # no better on a second try: say what to change
            failed = dict.fromkeys(job.recipients, (None, str(error), False))
        except (OSError, smtplib.SMTPException) as error:  # refused, timed out, hung up
            failed = dict.fromkeys(job.recipients, (None, self.network_failure(error), True))
        except LookupError:
            failed = dict.fromkeys(job.recipients, (
                None, "the message was deleted before it could be sent", False))
        sent = [r for r in job.recipients if r not in failed]
        later = [r for r, (_, _, again) in failed.items() if again]
        self._report(job, sent, failed, later)
        if later and job.attempts < RELAY_ATTEMPTS:
            job.recipients = later
            self.enqueue(job.key, job, FIRST_RETRY * 2 ** (job.attempts - 1), to=later)

    def network_failure(self, error: Exception) -> str:
        if isinstance(error, TimeoutError):
            return f"no answer from {self.host} port {self.port} within {RELAY_TIMEOUT:g} s"
        if isinstance(error, smtplib.SMTPServerDisconnected):
            return f"lost {self.host} port {self.port}: {error}"
        reason = getattr(error, "strerror", None) or error
        return f"cannot reach {self.host} port {self.port}: {reason} ({type(error).__name__})"

    def _report(self, job: RelayJob, sent: list[str], failed: dict, later: list[str]) -> None:
        if sent:
            self.record(job.key, "sent", to=sent)
        for recipient, (code, text, again) in failed.items():
            said = f"{code} {text}" if code is not None else text
            if code is not None and code >= 500:
                outcome = f"refused: {said}"
            elif again and job.attempts < RELAY_ATTEMPTS:
                outcome = f"will retry: {said}"
            else:
                outcome = f"failed: {said}"
            self.record(job.key, outcome, to=[recipient])
        log.info("relay of %s, attempt %d: %s", job.key, job.attempts, escape_for_log(
            "; ".join([f"sent to {', '.join(sent)}"] * bool(sent) + [
                f"{r}: {c} {t}" if c is not None else f"{r}: {t}"
                for r, (c, t, _) in failed.items()])))

    def send(self, job: RelayJob) -> dict:
        """One attempt: the stored bytes, less sheesh's trace headers, from the original sender.
        Returns the recipients the upstream refused; raises for a failure of the whole."""
        with self.store.open_file(job.key) as file:
            eight_bit = not all(chunk.isascii() for chunk in iter(
                functools.partial(file.read, READ_SIZE), b""))
            file.seek(0)
            with self.connect() as client:
                options = []
                if eight_bit and client.has_extn("8bitmime"):
                    options.append("BODY=8BITMIME")
                if not (job.sender + "".join(job.recipients)).isascii():
                    options.append("SMTPUTF8")
                return relay_transaction(client, job, options, file)

    def connect(self) -> smtplib.SMTP:
        """A session with the upstream, over TLS as --relay-tls asks and logged in. Raises
        RelaySettingsProblem for what only a change of settings can mend."""
        config = self.config
        context = None
        if ssl is None and config.relay_tls in ("starttls", "tls"):
            raise RelaySettingsProblem("this Python has no ssl module; use --relay-tls none")
        if ssl is not None and config.relay_tls != "none":
            # The system's trusted certificates, checked: smtplib's own default checks nothing.
            context = ssl.create_default_context()
            if config.relay_insecure:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            if config.relay_tls == "tls":
                client = smtplib.SMTP_SSL(self.host, self.port, timeout=RELAY_TIMEOUT,
                                          context=context)
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=RELAY_TIMEOUT)
        except CERTIFICATE_REFUSED as error:
            raise RelaySettingsProblem(untrusted_upstream(error)) from None
        except smtplib.SMTPServerDisconnected as error:  # no greeting: slow, or not plain SMTP
            if config.relay_tls == "tls" or "timed out" not in str(error):
                raise
            raise smtplib.SMTPServerDisconnected(
                f"no greeting within {RELAY_TIMEOUT:g} s (a port that wants TLS from the first "
                f"byte, such as 465, needs --relay-tls tls)") from None
        try:
            client.ehlo_or_helo_if_needed()
            self.secure(client, context)
            if config.relay_user:
                self.log_in(client)
        except BaseException:
            client.close()
            raise
        return client

    def secure(self, client: smtplib.SMTP, context) -> None:
        """STARTTLS, where --relay-tls asks for it (always) or allows it (auto, if offered)."""
        mode, offered = self.config.relay_tls, ssl is not None and client.has_extn("starttls")
        if mode in ("starttls", "auto") and offered:
            try:
                client.starttls(context=context)
            except CERTIFICATE_REFUSED as error:
                raise RelaySettingsProblem(untrusted_upstream(error)) from None
            client.ehlo()
        elif mode == "starttls":
            raise RelaySettingsProblem("the upstream does not offer STARTTLS; use --relay-tls "
                                       "auto or none")
        elif mode == "auto" and self.config.relay_user and not is_loopback(self.host):
            raise RelaySettingsProblem(
                f"the upstream does not offer STARTTLS, and sheesh does not send a password in "
                f"plain text beyond loopback; use --relay-tls none if {self.host} may see it")

    def log_in(self, client: smtplib.SMTP) -> None:
        """AUTH with one mechanism: smtplib's login() tries each in turn after a refusal, and
        a server that counts failures (sheesh does) hangs up before the truth comes out."""
        user = self.config.relay_user
        if not client.has_extn("auth"):
            raise RelaySettingsProblem("the upstream does not offer AUTH; leave out "
                                       "--relay-user")
        offered = client.esmtp_features["auth"].upper().split()
        mechanism = next((m for m in ("CRAM-MD5", "PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            raise RelaySettingsProblem(f"the upstream offers AUTH {' '.join(offered)}; sheesh "
                                       f"knows CRAM-MD5, PLAIN and LOGIN")
        client.user, client.password = user, self.config.relay_password or ""
        answer = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        try:
            client.auth(mechanism, answer)
        except smtplib.SMTPAuthenticationError as error:
            if 400 <= error.smtp_code < 500:
                raise  # a temporary failure (454): worth another try
            raise RelaySettingsProblem(f"the upstream refused the login as {user}: "
                                       f"{error.smtp_code} {reply_text(error)}") from None

    def check(self) -> tuple[bool, str]:
        """Connect once as a relay would: whether it works, and how, in words for the log."""
        try:
            with self.connect() as client:
                tls = ssl is not None and isinstance(client.sock, ssl.SSLSocket)
                user = f", logged in as {self.config.relay_user}" * bool(self.config.relay_user)
                return True, (f"{self.host} port {self.port} answers, "
                              f"{'over TLS' if tls else 'in plain text'}{user}")
        except RelaySettingsProblem as error:
            return False, str(error)
        except smtplib.SMTPResponseException as error:
            return False, f"{error.smtp_code} {reply_text(error)}"
        except (OSError, smtplib.SMTPException) as error:
            return False, self.network_failure(error)


class RelaySettingsProblem(Exception):
    """A relay failure that retrying cannot mend: the settings must change."""


def reply_text(error: smtplib.SMTPResponseException) -> str:
    """The text of the reply an SMTP server refused with (smtplib keeps it as bytes, mostly)."""
    text = error.smtp_error
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def untrusted_upstream(error: OSError) -> str:
    reason = getattr(error, "verify_message", None) or error
    return (f"the upstream's certificate is not trusted ({reason}); use --relay-insecure "
            f"for a self-signed one, or set SSL_CERT_FILE to its CA")


def relay_transaction(client: smtplib.SMTP, job: RelayJob, options: list[str], file) -> dict:
    """MAIL, RCPT and DATA, as smtplib's sendmail() does them, but with the message read from
    its file a piece at a time rather than held whole in memory."""
    code, text = client.mail(job.sender, options)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, text, job.sender)
    refused = {}
    for recipient in job.recipients:
        code, text = client.rcpt(recipient)
        if code not in (250, 251):
            refused[recipient] = (code, text)
    if len(refused) == len(job.recipients):
        client.rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    code, text = client.docmd("DATA")
    if code != 354:
        raise smtplib.SMTPDataError(code, text)
    last = b"\r\n"
    for chunk in relay_chunks(file):
        client.send(chunk)
        last = chunk[-2:] or last
    client.send(b".\r\n" if last == b"\r\n" else b"\r\n.\r\n")
    code, text = client.getreply()
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    return refused


def relay_chunks(file):
    """The stored message less its trace headers, dot-stuffed (RFC 5321 section 4.5.2), in
    pieces that each end at a line's end, so that every piece begins a line."""
    carry, first = b"", True
    for block in iter(functools.partial(file.read, READ_SIZE), b""):
        block = carry + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            carry = block
            continue
        lines, carry = block[:cut], block[cut:]
        if first:
            lines, first = strip_trace_headers(lines), False
        yield (b"\n" + lines).replace(b"\n.", b"\n..")[1:]
    if carry:
        yield (b"\n" + (strip_trace_headers(carry) if first else carry)).replace(
            b"\n.", b"\n..")[1:] + b"\r\n"


# Webhooks: for each stored message, a POST of its summary as JSON to each --webhook URL, from
# a worker of its own (as relaying is done), signed with --webhook-secret if one is given.

WEBHOOK_ATTEMPTS = 4  # the first try and three more, after 2, 4 and 8 seconds
WEBHOOK_TIMEOUT = 10.0  # seconds a receiver has to answer


@dataclass
class WebhookJob:
    key: str
    url: str
    arrival: int  # its number among the store's arrivals: sent once the index has it
    attempts: int = 0
    since: float = field(default_factory=time.monotonic)


def url_without_password(url: str) -> str:
    """A URL fit for a log or a page: https://user:****@host/ for https://user:pw@host/."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:****@{host}"))


class Webhooks(RetryingWorker):
    """Tells web services of each stored message (--webhook URL). It waits for the index to
    take each message in its stride (never hurrying it, which would cost SMTP), keeps one
    connection to each receiver, and while a receiver fails it does not knock once per
    message: the messages wait for the receiver's next try, which SMTP never notices."""

    name = "webhook"

    def __init__(self, urls: tuple[str, ...], secret: str | None, store: Store) -> None:
        super().__init__()
        self.urls, self.secret, self.store = urls, secret, store
        self.web_url: str | None = None  # where the web inbox is, for the detail's URL
        self._connections: dict[str, http.client.HTTPConnection] = {}
        self._down: dict[str, tuple[float, str]] = {}  # url -> (until when, why)

    def queue(self, key: str, arrival: int) -> None:
        for url in self.urls:
            self.enqueue(key, WebhookJob(key, url, arrival), url=url_without_password(url))

    def attempt(self, job: WebhookJob) -> None:
        down_until, why = self._down.get(job.url, (0.0, ""))
        if time.monotonic() < down_until:  # the receiver failed just now: wait for it
            if time.monotonic() - job.since > FIRST_RETRY * (2 ** WEBHOOK_ATTEMPTS - 1):
                self.record(job.key, f"failed: {why} (the receiver kept failing)",
                            url=url_without_password(job.url))
            else:
                self.enqueue(job.key, job, down_until - time.monotonic(),
                             url=url_without_password(job.url))
            return
        self.store.wait_indexed(job.arrival, INDEX_DELAY_MAX + 1)
        summary = self.store.summary(job.key)
        if summary is None:
            self.record(job.key, "failed: the message was deleted before it could be sent",
                        url=url_without_password(job.url))
            return
        job.attempts += 1
        status, again = self.post(job.url, json.dumps(self.payload(summary)).encode())
        outcome = "sent" if status[:1] == "2" else "will retry" if again else "refused"
        if again and job.attempts >= WEBHOOK_ATTEMPTS:
            outcome = "failed"
        shown = url_without_password(job.url)
        self.record(job.key, f"{outcome}: {status}", url=shown)
        log.info("webhook for %s to %s, attempt %d: %s: %s", job.key, escape_for_log(shown),
                 job.attempts, outcome, escape_for_log(status))
        if again:
            delay = FIRST_RETRY * 2 ** (job.attempts - 1)
            self._down[job.url] = (time.monotonic() + FIRST_RETRY, status)
            if job.attempts < WEBHOOK_ATTEMPTS:
                self.enqueue(job.key, job, delay, url=shown)
        else:
            self._down.pop(job.url, None)

    def post(self, url: str, body: bytes) -> tuple[str, bool]:
        """POST over the receiver's kept connection: ("200 OK", False), or what went wrong
        and whether it is worth another try (no answer, a 5xx, 408, 429)."""
        parts = urllib.parse.urlsplit(url)
        try:
            connection = self._connections.get(url)
            if connection is None:
                kind = (http.client.HTTPSConnection if parts.scheme == "https"
                        else http.client.HTTPConnection)
                connection = self._connections[url] = kind(
                    parts.netloc.rpartition("@")[2], timeout=WEBHOOK_TIMEOUT)
            target, headers = parts.path or "/", self.headers(body)
            if parts.username is not None:  # https://user:password@host/: HTTP Basic
                pair = f"{urllib.parse.unquote(parts.username)}:" \
                       f"{urllib.parse.unquote(parts.password or '')}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            connection.request("POST", target + (f"?{parts.query}" if parts.query else ""),
                               body, headers)
            response = connection.getresponse()
            response.read()
            if response.will_close:
                self._connections.pop(url).close()
        except (OSError, http.client.HTTPException) as error:
            if (broken := self._connections.pop(url, None)) is not None:
                broken.close()
            return f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}", True
        code = response.status
        return f"{code} {response.reason}", code >= 500 or code in (408, 429)

    def payload(self, summary: Summary) -> dict:
        """The summary GET /api/messages lists, and where its detail is."""
        url = (f"{self.web_url}api/messages/{urllib.parse.quote(summary.key)}"
               if self.web_url else None)
        return {**summary.as_json(), "url": url}

    def headers(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "User-Agent": f"sheesh/{__version__}"}
        if self.secret:  # the receiver computes the same HMAC of the body with the secret
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Sheesh-Signature"] = f"sha256={digest}"
        return headers


def sendmail_main(argv: list[str]) -> int:
    """python3 sheesh.py sendmail [-t] [-f SENDER] [-F NAME] [-S HOST:PORT] [RECIPIENT...]

    A sendmail-compatible way in, for programs that call /usr/sbin/sendmail (PHP's mail(),
    cron, git send-email): the message on standard input goes to a running sheesh by SMTP,
    at -S HOST:PORT, or SHEESH_HOST and SHEESH_PORT, or 127.0.0.1 port 1025. Exit status as
    sendmail's (sysexits.h): 0 sent (to the recipients that were not refused: a warning
    names the others), 64 bad usage, 69 refused, 75 try again later.
    """
    parser = build_sendmail_parser()
    options = parser.parse_args(argv)
    try:
        host, port = sendmail_destination(options)
    except ValueError as error:
        parser.error(str(error))
    data, recipients = sys.stdin.buffer.read(), list(options.recipients)
    headers = parse_headers(data)
    if options.from_headers:
        fields = [value for name in ("To", "Cc", "Bcc") for value in headers.get_all(name, [])]
        recipients += [address for _, address in email.utils.getaddresses(fields) if address]
        data = remove_header(data, b"Bcc")
    if not recipients:
        print("sheesh sendmail: no recipients (give them as arguments, or use -t)",
              file=sys.stderr)
        return 64
    sender = options.sender or f"{os.environ.get('USER') or 'sheesh'}@{socket.gethostname()}"
    data = missing_headers(headers, sender, options.full_name) + data
    # Programs hand sendmail lines ending in LF; SMTP wants CRLF (RFC 5321 section 2.3.8),
    # and smtplib leaves bytes as they are.
    data = with_crlf(data)
    return send_once(host, port, sender, recipients, data)


def sendmail_destination(options: argparse.Namespace) -> tuple[str, int]:
    """Where sheesh is: -S HOST:PORT, else --host and --port, else SHEESH_HOST and
    SHEESH_PORT (for PHP's sendmail_path and cron, which pass no options of ours)."""
    host = options.host or os.environ.get("SHEESH_HOST") or DEFAULT_HOST
    port_text = options.port or os.environ.get("SHEESH_PORT") or str(DEFAULT_PORT)
    if options.server:
        host, colon, port_text = options.server.rpartition(":")
        if not colon or not host:
            raise ValueError(f"-S takes HOST:PORT, not {options.server}")
    port = whole_number(port_text, 5)
    if port is None or not 0 < port < 65536:
        raise ValueError(f"the port must be a number from 1 to 65535, not {port_text}")
    return host.strip("[]"), port


def missing_headers(headers: email.message.Message, sender: str, full_name: str | None) -> bytes:
    """The From, Date and Message-ID lines that a message lacks, as sendmail adds them
    (RFC 5322 section 3.6 asks for From and Date; mail without a Message-ID looks like spam);
    From carries -F's full name."""
    lines = []
    if headers["From"] is None:
        lines.append(f"From: {email.utils.formataddr((full_name or '', sender))}")
    if headers["Date"] is None:
        lines.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if headers["Message-ID"] is None:
        lines.append(f"Message-ID: {email.utils.make_msgid(domain=socket.gethostname())}")
    return "".join(line + "\n" for line in lines).encode("utf-8")


def build_sendmail_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sheesh sendmail", description=sendmail_main.__doc__.split(
        "\n\n")[1].strip(), formatter_class=HelpFormatter)
    parser.usage_error_status = 64  # EX_USAGE, as sendmail
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT")
    parser.add_argument("-t", dest="from_headers", action="store_true",
                        help="also send to the To, Cc and Bcc headers' addresses; remove Bcc")
    parser.add_argument("-f", "-r", dest="sender", help="the envelope sender (default: "
                        "$USER@HOSTNAME, or sheesh@HOSTNAME)")
    parser.add_argument("-F", dest="full_name", help="the sender's full name, for the From "
                        "header that is added when the message has none")
    parser.add_argument("-i", "-oi", dest="ignore_dots", action="store_true",
                        help="ignored: a lone dot never ends the message here")
    parser.add_argument("-o", dest="other_options", action="append", metavar="OPTION",
                        help="ignored, for -oem, -odi and the like")
    parser.add_argument("-B", dest="body_type", help="ignored (7BIT or 8BITMIME)")
    parser.add_argument("-S", dest="server", metavar="HOST:PORT",
                        help="where sheesh listens (as msmtp and mailx take it)")
    parser.add_argument("--host", help=f"where sheesh listens (default: SHEESH_HOST, else "
                        f"{DEFAULT_HOST})")
    parser.add_argument("--port", help=f"its SMTP port (default: SHEESH_PORT, else "
                        f"{DEFAULT_PORT})")
    return parser


def send_once(host: str, port: int, sender: str, recipients: list[str], data: bytes) -> int:
    """Send one message by SMTP; the exit status, with a one-line message on failure."""
    try:
        with smtplib.SMTP(host, port, timeout=RELAY_TIMEOUT) as client:
            refused = client.sendmail(sender, recipients, data)
    except smtplib.SMTPResponseException as error:
        print(f"sheesh sendmail: refused: {error.smtp_code} {reply_text(error)}",
              file=sys.stderr)
        return 75 if 400 <= error.smtp_code < 500 else 69
    except smtplib.SMTPRecipientsRefused as error:
        print("sheesh sendmail: every recipient was refused:", file=sys.stderr)
        print_refusals(error.recipients)
        return 69
    except (OSError, smtplib.SMTPException) as error:
        print(f"sheesh sendmail: cannot send to {host} port {port}: "
              f"{getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 69 if isinstance(error, ConnectionRefusedError) else 75
    if refused:  # stored for the others: done, as Postfix's sendmail once it is queued
        print("sheesh sendmail: warning: sent, but not to these recipients:", file=sys.stderr)
        print_refusals(refused)
    return 0


def print_refusals(refused: dict[str, tuple[int, bytes]]) -> None:
    for recipient, (code, text) in refused.items():
        print(f"{recipient}: {code} {text.decode('utf-8', 'replace')}", file=sys.stderr)


def remove_header(data: bytes, name: bytes) -> bytes:
    """The message without every `name:` header line (and its folded continuation lines);
    everything else byte for byte."""
    ends = [i + 1 for i in [data.find(b"\n\n")] if i >= 0]  # the header block, with the
    ends += [i + 2 for i in [data.find(b"\r\n\r\n")] if i >= 0]  # last line's line ending
    end = min(ends, default=len(data))
    lines, kept, dropping = data[:end].splitlines(keepends=True), [], False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name.lower()
        if not dropping:
            kept.append(line)
    return b"".join(kept) + data[end:]


# ---------------------------------------------------------------------------------------------
# 16. POP3: read the captured mail from any mail client
#
# POP3 (RFC 1939) is how Thunderbird, mutt, fetchmail or Python's poplib download mail. A
# session has three stages: AUTHORIZATION (USER and PASS), TRANSACTION (STAT, LIST, RETR, TOP,
# UIDL, DELE, RSET, NOOP) and UPDATE, which happens at QUIT: only then are the messages marked
# with DELE deleted. A connection that drops without QUIT deletes nothing. Replies start with
# "+OK" or "-ERR"; a reply of several lines ends with a line holding a dot, and dots that
# start a line are doubled, as in SMTP's DATA. Pop3Session is in SMTP's shape: commands parsed
# into small classes, a match on them, Turns out; the handler of section 7 carries its bytes.
#
# The maildrop is the Maildir. A user name that is an email address sees only the messages
# delivered to that address (an envelope recipient); any other name sees every message.
# ---------------------------------------------------------------------------------------------

POP3_TIMEOUT = 600.0  # RFC 1939 section 3: an idle timer of at least 10 minutes


class Pop3State(enum.Enum):
    AUTHORIZATION = "waiting for USER and PASS"
    TRANSACTION = "logged in"
    CLOSED = "closed"


# POP3's commands (RFC 1939 sections 5 to 7, RFC 2449's CAPA, RFC 2595's STLS), parsed as
# SMTP's are: one small class per verb, and parse_pop3() with a match on the verb. A message
# number stays text here: whether it names a message is the session's to say.


@dataclass(frozen=True)
class PopCapa:
    pass


@dataclass(frozen=True)
class PopQuit:
    pass


@dataclass(frozen=True)
class PopNoop:
    pass


@dataclass(frozen=True)
class PopStls:
    pass


@dataclass(frozen=True)
class PopUser:
    name: str


@dataclass(frozen=True)
class PopPass:
    password: str


@dataclass(frozen=True)
class PopStat:
    pass


@dataclass(frozen=True)
class PopList:
    verb: str  # LIST (sizes) or UIDL (unique ids)
    number: str  # "" for every message


@dataclass(frozen=True)
class PopRetr:
    number: str
    top_lines: int | None = None  # TOP: the headers and this many lines of the body


@dataclass(frozen=True)
class PopDele:
    number: str


@dataclass(frozen=True)
class PopRset:
    pass


@dataclass(frozen=True)
class PopUnsupported:
    verb: str  # APOP, AUTH: logins other than USER and PASS


@dataclass(frozen=True)
class PopUnknown:
    pass


@dataclass(frozen=True)
class PopInvalid:
    problem: str


Pop3Command = (PopCapa | PopQuit | PopNoop | PopStls | PopUser | PopPass | PopStat | PopList
               | PopRetr | PopDele | PopRset | PopUnsupported | PopUnknown | PopInvalid)


def parse_pop3(line: str) -> Pop3Command:
    verb, _, argument = line.strip().partition(" ")
    verb, argument = verb.upper(), argument.strip()
    match verb:
        case "CAPA":
            return PopCapa()
        case "QUIT":
            return PopQuit()
        case "NOOP":
            return PopNoop()
        case "STLS":
            return PopStls()
        case "USER":
            return PopUser(argument) if argument else PopInvalid("usage: USER name")
        case "PASS":
            return PopPass(argument)
        case "STAT":
            return PopStat()
        case "LIST" | "UIDL":
            return PopList(verb, argument)
        case "RETR":
            return PopRetr(argument)
        case "TOP":
            number, _, lines = argument.partition(" ")
            if whole_number(lines) is None:
                return PopInvalid("usage: TOP message lines")
            return PopRetr(number, whole_number(lines))
        case "DELE":
            return PopDele(argument)
        case "RSET":
            return PopRset()
        case "APOP" | "AUTH":
            return PopUnsupported(verb)
        case _:
            return PopUnknown()


@dataclass(frozen=True)
class Pop3Reply:
    wire: bytes

    @property
    def refusal(self) -> bool:
        return self.wire.startswith(b"-ERR")

    def transcript_lines(self) -> list[str]:
        """The status line; a listing or a message after it only counted."""
        first, _, rest = self.wire.partition(b"\r\n")
        lines = [first.decode("utf-8", "replace")]
        if rest:
            count = rest.count(b"\r\n") - 1  # less the final "."
            lines.append(f"<{count:,} lines>")
        return lines


def pop3_ok(text: str = "") -> Pop3Reply:
    return Pop3Reply(f"+OK {text}".rstrip().encode("utf-8") + b"\r\n")


def pop3_error(text: str) -> Pop3Reply:
    return Pop3Reply(f"-ERR {text}".encode("utf-8") + b"\r\n")


def pop3_lines(first_line: str, body: bytes) -> Pop3Reply:
    """A multi-line reply (RFC 1939 section 3): lines ending in CRLF, each leading dot doubled,
    then a line with a single dot."""
    stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    return Pop3Reply(pop3_ok(first_line).wire + stuffed + b".\r\n")


class MaildropLocks:
    """RFC 1939 section 8: a maildrop is open in one session at a time."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self, maildrop: str) -> bool:
        with self._lock:
            if maildrop in self._held:
                return False
            self._held.add(maildrop)
            return True

    def unlock(self, maildrop: str) -> None:
        with self._lock:
            self._held.discard(maildrop)


def pop3_uidl(key: str) -> str:
    """A message's unique id (RFC 1939 section 7): its Maildir key, stable across sessions
    and restarts, when it is a valid one (1 to 70 printable characters); else a digest of it."""
    if 0 < len(key) <= 70 and all("!" <= ch <= "~" for ch in key):
        return key
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()


def dot_stuffed(chunk: bytes) -> bytes:
    """Lines that begin with a dot get a second one (RFC 1939 section 3): chunk begins a line."""
    return (b"\n" + chunk).replace(b"\n.", b"\n..")[1:]


def top_of(chunks, body_lines: int):
    """TOP: the header, the blank line after it, and so many lines of the body."""
    in_header = True
    for chunk in chunks:
        lines, kept = chunk.split(b"\r\n")[:-1], []
        for line in lines:
            if not in_header:
                if body_lines <= 0:
                    break
                body_lines -= 1
            in_header = in_header and line != b""
            kept.append(line + b"\r\n")
        yield b"".join(kept)
        if not in_header and body_lines <= 0:
            return


@dataclass
class Pop3Session(TakesTurns):
    """One POP3 conversation: bytes in, replies out."""

    store: Store  # where the maildrop is
    locks: MaildropLocks
    users: dict[str, str] | None = None  # as for SMTP AUTH: None accepts any user and password
    tls_available: bool = False
    tls_required: bool = False  # no USER or PASS before STLS (RFC 2595 section 4)
    peer: str = ""
    logins: LoginGuard | None = None
    state: Pop3State = Pop3State.AUTHORIZATION
    user: str | None = None
    tls: str | None = None
    # The maildrop, fixed at login: message n is UID uids[n - 1]. An array, not objects: a
    # maildrop of a million messages costs 8 MB. Their sizes stay in the index.
    uids: array.array = field(default_factory=lambda: array.array("q"))
    size: int = 0  # of them all, as RETR sends them
    uidvalidity: int = 0  # the index's when the UIDs were read: they mean nothing after it
    deleted: dict[int, int] = field(default_factory=dict)  # number -> size, marked by DELE
    unknown_commands: int = 0
    auth_failures: int = 0
    transcript: Transcript | None = None
    _turn: Turn = field(default_factory=Turn)
    _tls_pending: bool = False
    _maildrop_name: str | None = None  # the maildrop this session has locked
    _incoming: Incoming = field(default_factory=lambda: Incoming(COMMAND_LINE_LIMIT))

    def greeting(self) -> Turn:
        return self.hand_over([pop3_ok("sheesh POP3 server ready")])

    def goodbye(self, reason: str) -> Pop3Reply:
        return pop3_error({"timeout": "[SYS/TEMP] timeout, goodbye",
                           "shutdown": "[SYS/TEMP] server shutting down, goodbye",
                           "busy": "[SYS/TEMP] too many connections, try again later",
                           "crowded": "[SYS/TEMP] too many connections from your address",
                           "error": "[SYS/TEMP] internal server error, goodbye"}[reason])

    @property
    def closed(self) -> bool:
        return self.state is Pop3State.CLOSED

    @property
    def busy(self) -> bool:
        return self._incoming.waiting

    in_data = False  # POP3 reads no message from the client

    def receive(self, data: bytes) -> Turn:
        """Lines in, replies out, in order (RFC 2449 PIPELINING)."""
        incoming, replies = self._incoming, []
        incoming.add(data)
        while not self.closed and not self._tls_pending and (raw := incoming.line()) is not None:
            if raw is LINE_TOO_LONG_MARK:
                replies.append(pop3_error("line too long"))
                continue
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if self.transcript is not None:  # never the password, however it is spaced
                secret = line.lstrip()[:4].upper() == "PASS"  # parse_pop3 strips the line
                self.transcript.client("PASS ****" if secret else line)
            replies.append(self.handle_line(line))
        if self.closed or self._tls_pending:
            incoming.clear()  # RFC 2595 section 4, as for SMTP: nothing before TLS is read
        return self.hand_over(replies)

    def handle_line(self, line: str) -> Pop3Reply:
        """One command line: the heart of POP3. What each state allows is RFC 1939's: USER,
        PASS and STLS before login; the maildrop's commands after it."""
        command = parse_pop3(line)
        match command:
            case PopCapa():
                return self.capabilities()
            case PopQuit():
                return self.quit()
            case PopUnknown():
                return self.unknown()
            case PopInvalid(problem):
                return pop3_error(problem)
        if self.state is Pop3State.TRANSACTION:
            return self.in_maildrop(command)
        match command:
            case PopUser() | PopPass() if self.tls_required and self.tls is None:
                return pop3_error("[AUTH] credentials only over TLS here (--tls-required): "
                                  "use STLS first")
            case PopUser(name):
                self.user = name
                return pop3_ok("send PASS")
            case PopPass(password):
                return self.password(password)
            case PopStls():
                return self.starttls()
            case PopUnsupported():
                return pop3_error("not supported")
            case _:
                return pop3_error("log in first (USER and PASS)")

    def in_maildrop(self, command: Pop3Command) -> Pop3Reply | Streamed:
        """A command once logged in (RFC 1939's TRANSACTION state)."""
        if self.renumbered() and not isinstance(command, (PopNoop, PopQuit)):
            return self.renumbered()
        match command:
            case PopNoop():
                return pop3_ok()
            case PopStat():
                return pop3_ok(f"{len(self.uids) - len(self.deleted)} "
                               f"{self.size - sum(self.deleted.values())}")
            case PopList(verb, number):
                return self.listing(verb, number)
            case PopRetr(number, top_lines):
                return self.retrieve(number, top_lines)
            case PopDele(number):
                return self.delete(number)
            case PopRset():
                self.deleted.clear()
                return pop3_ok(f"{len(self.uids)} messages")
            case _:  # USER, PASS, STLS, APOP, AUTH
                return pop3_error("not in this state")

    def unknown(self) -> Pop3Reply:
        self.unknown_commands += 1
        if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
            self.state = Pop3State.CLOSED
            self.note(logging.INFO, "closed", "too many bad commands")
            return pop3_error("too many unknown commands, goodbye")
        return pop3_error("unknown command")

    def capabilities(self) -> Pop3Reply:
        """CAPA (RFC 2449): what this server supports."""
        lines = ["TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                 f"IMPLEMENTATION sheesh-{__version__}"]
        if self.tls_required and self.tls is None:
            lines.remove("USER")  # RFC 2595 section 4: no plain logins offered before TLS
        if self.tls_available and self.tls is None and self.state is Pop3State.AUTHORIZATION:
            lines.append("STLS")
        return pop3_lines("capability list follows", "".join(f"{line}\r\n"
                                                              for line in lines).encode())

    def starttls(self) -> Pop3Reply:
        """STLS (RFC 2595), with the same care as SMTP's STARTTLS for what came before it."""
        if not self.tls_available or self.tls is not None:
            return pop3_error("TLS is not available" if self.tls is None else "TLS is already on")
        self._tls_pending = self._turn.start_tls = True
        return pop3_ok("begin TLS negotiation")

    def tls_started(self, description: str) -> None:
        self.tls, self._tls_pending, self.user = description, False, None

    def password(self, password: str) -> Pop3Reply:
        if self.user is None:
            return pop3_error("send USER first")
        if self.logins is not None and self.logins.refuses(self.peer):
            return pop3_error("[AUTH] too many failed logins from your address: try again later")
        if self.users is not None and not password_matches(self.users, self.user,
                                                           password.encode()):
            if self.logins is not None:
                self.logins.failed(self.peer, self.user, "POP3")
            self.auth_failures += 1
            self._turn.wait += AUTH_FAILURE_DELAY
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.state = Pop3State.CLOSED
                self.note(logging.INFO, "closed", "too many failed logins")
            return pop3_error("[AUTH] invalid user name or password")
        address = self.user.lower() if "@" in self.user else None
        if not self.locks.acquire(address or "*"):
            return pop3_error("[IN-USE] the maildrop is open in another session")
        self._maildrop_name = address or "*"
        if not self.store.complete(MAILBOX_INDEX_WAIT):
            self.unlock()
            indexing = self.store.status()["indexing"] or {}
            return pop3_error(f"[SYS/TEMP] the maildrop is being indexed ({indexing.get('done')} "
                              f"of {indexing.get('total')} messages): try again in a minute")
        self.uidvalidity = self.store.uidvalidity
        try:
            for uid, size in self.store.sizes(address):
                self.uids.append(uid)
                self.size += size
        except (OSError, *DATABASE_ERRORS):
            self.unlock()
            return pop3_error("[SYS/TEMP] cannot read the maildrop")
        self.state = Pop3State.TRANSACTION
        return pop3_ok(f"{len(self.uids)} messages")

    def live(self):
        """The numbers of the messages not marked with DELE, one at a time."""
        return (n for n in range(1, len(self.uids) + 1) if n not in self.deleted)

    def message(self, number_text: str) -> int | Pop3Reply:
        """The message number asked for, or the error to send."""
        number = whole_number(number_text)
        if number is None or not 0 < number <= len(self.uids):
            return pop3_error("no such message")
        if number in self.deleted:
            return pop3_error("message already deleted")
        return number

    def keys(self, numbers: list[int]) -> dict[int, str]:
        """The Maildir keys of these messages, by number."""
        by_uid = {uid: key for uid, key, _ in self.store.locations(
            [self.uids[n - 1] for n in numbers])}
        return {n: by_uid[self.uids[n - 1]] for n in numbers if self.uids[n - 1] in by_uid}

    def sizes(self, numbers: list[int]) -> dict[int, int]:
        """Their sizes as RETR sends them, by number, from the index; a message that another
        program deleted since the login is not there."""
        by_uid = {summary.uid: summary.crlf_size for summary in self.store.by_uids(
            [self.uids[n - 1] for n in numbers])}
        return {n: by_uid[self.uids[n - 1]] for n in numbers if self.uids[n - 1] in by_uid}

    @staticmethod
    def vanished(number: int) -> Pop3Reply:
        return pop3_error(f"message {number} was deleted by another program")

    def listing(self, verb: str, argument: str) -> Pop3Reply | Streamed:
        """LIST or UIDL, of one message or of all: all are sent as they are looked up, a
        thousand at a time, however many there are."""
        column = ((lambda numbers: {n: str(size) for n, size in self.sizes(numbers).items()})
                  if verb == "LIST" else (lambda numbers: {
                      n: pop3_uidl(key) for n, key in self.keys(numbers).items()}))
        if argument:
            found = self.message(argument)
            if isinstance(found, Pop3Reply):
                return found
            value = column([found]).get(found)
            return self.vanished(found) if value is None else pop3_ok(f"{found} {value}")
        live, count = self.live(), len(self.uids) - len(self.deleted)

        def produce():  # a message deleted meanwhile by another program is left out
            yield pop3_ok(f"{count} messages").wire
            for numbers in batched(live, 1000):
                values = column(numbers)
                yield "".join(f"{n} {values[n]}\r\n" for n in numbers if n in values).encode()
            yield b".\r\n"
        return Streamed(produce, shown=f"+OK {count} messages <the {verb} listing>")

    def retrieve(self, number: str, top_lines: int | None) -> Pop3Reply | Streamed:
        """RETR, or TOP: the message read from its file as it is sent, never held whole."""
        found = self.message(number)
        if isinstance(found, Pop3Reply):
            return found
        key, size, store = self.keys([found]).get(found), self.sizes([found]).get(found), self.store
        if key is None or size is None:
            return self.vanished(found)

        def produce():
            try:
                file = store.open_file(key)
            except LookupError:  # deleted between the lookup and the reading
                yield self.vanished(found).wire
                return
            with file:
                yield pop3_ok(f"{size} octets").wire
                chunks = crlf_chunks(file)
                for chunk in chunks if top_lines is None else top_of(chunks, top_lines):
                    yield dot_stuffed(chunk)
                yield b".\r\n"
        part = "message" if top_lines is None else f"headers and {top_lines} lines"
        return Streamed(produce, shown=f"+OK {size} octets <the {part} of {key}>")

    def renumbered(self) -> Pop3Reply | None:
        """The error for every command once the index was built anew since the login: the
        session's message numbers may name other messages now, so it must log in again."""
        if self.store.uidvalidity == self.uidvalidity:
            return None
        return pop3_error("[SYS/TEMP] the index was built anew since you logged in: nothing "
                          "is deleted; log in again")

    def delete(self, number: str) -> Pop3Reply:
        found = self.message(number)
        if isinstance(found, Pop3Reply):
            return found
        self.deleted[found] = self.sizes([found]).get(found, 0)
        return pop3_ok(f"message {number} deleted")

    def quit(self) -> Pop3Reply:
        """QUIT: in TRANSACTION, the UPDATE state: remove what DELE marked, one file at a time
        (each removal is atomic), then let the maildrop go."""
        if self.state is Pop3State.TRANSACTION and self.deleted:
            try:
                mailbox = self._maildrop_name if self.users is not None else None
                self.store.delete_uids([self.uids[n - 1] for n in sorted(self.deleted)],
                                       self.uidvalidity, None if mailbox == "*" else mailbox)
            except UidsRenumbered:
                self.unlock()
                self.state = Pop3State.CLOSED
                return self.renumbered() or pop3_error("[SYS/TEMP] nothing was deleted")
            except (OSError, *DATABASE_ERRORS):
                self.unlock()
                self.state = Pop3State.CLOSED
                return pop3_error("[SYS/TEMP] some messages could not be deleted")
        self.unlock()
        self.state = Pop3State.CLOSED
        return pop3_ok("sheesh POP3 server signing off")

    def unlock(self) -> None:
        if self._maildrop_name is not None:
            self.locks.unlock(self._maildrop_name)
            self._maildrop_name = None

    def connection_lost(self) -> None:
        """A connection that ends without QUIT deletes nothing (RFC 1939 section 6)."""
        self.unlock()
        self.state = Pop3State.CLOSED


# ---------------------------------------------------------------------------------------------
# 17. IMAP: the captured mail, live, in any mail client
#
# IMAP (RFC 3501) is how Thunderbird, mutt, Apple Mail or mbsync keep mail on the server and
# watch it change. A command carries a tag chosen by the client ("a1 SELECT INBOX"); the server
# answers with untagged lines ("* 3 EXISTS") and then a tagged one ("a1 OK ..."), or with "+"
# when it waits for more (a literal, {n}: n bytes that follow the line, or an AUTHENTICATE
# step). A session goes from not authenticated (LOGIN) to authenticated, to a mailbox selected
# (SELECT), where messages are named by sequence number (1 to n, which close up when one is
# expunged) or by UID (which never change). ImapSession is pure like Session and Pop3Session:
# the handler of section 7 carries its bytes; its replies can be Streamed from the files.
#
# The mailboxes are views of the store, as POP3's maildrops are: a user name that is an email
# address sees that recipient's mail as INBOX; any other name sees all mail as INBOX, and each
# recipient's as a read-only folder, Recipients/user@example.com. Flags are the Maildir's
# (\Seen is S, \Answered R, \Flagged F, \Deleted T, \Draft D), so mutt, POP3, the web inbox and
# IMAP agree; other keywords ($Important, $Label1) are kept in the index, for every session and
# after a restart (a Maildir file name has no room for them). UIDs and UIDVALIDITY are the
# index's.
# ---------------------------------------------------------------------------------------------

IMAP_TIMEOUT = 1800.0  # RFC 3501 section 5.4: an idle timer of at least 30 minutes
# Before a login nobody has been let in, so the bounds are tight, as Dovecot's are: a minute
# to log in, and a command of a few KiB with its literals (a user name and a password). A
# refused non-synchronising literal then ends the connection rather than being read.
IMAP_LOGIN_TIMEOUT = 60.0
IMAP_PRELOGIN_LIMIT = 8 * 1024
IMAP_LINE_LIMIT = 64 * 1024  # a command without its literals (long UID sets must fit)
IMAP_LITERAL_LIMIT = 1024 * 1024  # all the literals of one command but APPEND's message
IMAP_DEPTH_LIMIT = 32  # parentheses, NOT and OR nested deeper than this are BAD
IMAP_SEARCH_KEYS_LIMIT = 256  # words in one SEARCH: each is tried on every message
IMAP_PATTERN_LIMIT = 256  # characters of a LIST pattern (mailbox names are shorter)
IMAP_KEYWORDS_LIMIT = 64  # keywords on one message (clients set a handful)
IMAP_IDLE_TICK = 0.5  # in IDLE, changes are looked for this often (RFC 2177)
IMAP_SYSTEM_FLAGS = {"\\seen": "S", "\\answered": "R", "\\flagged": "F", "\\deleted": "T",
                     "\\draft": "D"}
IMAP_FLAG_NAMES = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged", "T": "\\Deleted",
                   "D": "\\Draft"}
IMAP_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
RECIPIENTS_FOLDER = "Recipients"


class Atom(str):
    """An unquoted word of an IMAP command: NIL, a flag, a number, a sequence set, a
    fetch item such as BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.100>."""


class BadCommand(ValueError):
    """A command that cannot be read: answered BAD, with the reason."""


# A token: "(" or ")", a quoted string, or an atom, in which a [...] section may hold spaces
# and parentheses (RFC 3501 section 9: fetch-att).
_IMAP_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|'
                         rb'([^\s()"{\[\]]*(?:\[[^\]]*\][^\s()"{\[\]]*)*))')


def parse_imap_arguments(pieces: list[bytes]) -> list:
    """The arguments of a command as nested lists of Atom, str (quoted) and bytes
    (literals). pieces alternate text and the literals that followed each text."""
    tokens = []
    for number, piece in enumerate(pieces):
        if number % 2:
            tokens.append(piece)  # a literal, as it came
            continue
        position = 0
        while position < len(piece):
            found = _IMAP_TOKEN.match(piece, position)
            if not found or found.end() == position:
                if piece[position:].strip():  # never the text itself: it may be a password
                    raise BadCommand(f"cannot read the arguments from octet {position + 1}")
                break
            position = found.end()
            open_, close, quoted, atom = found.groups()
            if open_ or close:
                tokens.append(open_ or close)
            elif quoted is not None:
                tokens.append(re.sub(rb"\\(.)", rb"\1", quoted).decode("utf-8", "replace"))
            elif atom:
                tokens.append(Atom(atom.decode("utf-8", "replace")))
    return nest(tokens)


def nest(tokens: list) -> list:
    """Parenthesised lists as Python lists, at most IMAP_DEPTH_LIMIT deep."""
    stack = [[]]
    for token in tokens:
        if token == b"(":
            if len(stack) > IMAP_DEPTH_LIMIT:
                raise BadCommand(f"parentheses nested more than {IMAP_DEPTH_LIMIT} deep")
            stack.append([])
        elif token == b")":
            if len(stack) == 1:
                raise BadCommand("a ) without its (")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise BadCommand("a ( without its )")
    return stack[0]


def imap_string(value: str | bytes | None) -> bytes:
    """A string as IMAP sends it: NIL, "quoted" when it can be, else a literal."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    if data.isascii() and b"\r" not in data and b"\n" not in data and len(data) < 1024:
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def imap_list(items) -> bytes:
    return b"(" + b" ".join(items) + b")"


@dataclass
class StoreRequest:
    """STORE's arguments, read: which messages, the condition (RFC 7162's UNCHANGEDSINCE),
    how (+FLAGS adds, -FLAGS takes away, FLAGS replaces), and the flags, as Maildir letters
    and keywords."""

    sequence: object  # as parsed: ImapSession.chosen reads it
    unchanged_since: int | None
    how: str
    letters: set[str]
    keywords: set[str]

    @property
    def silent(self) -> bool:
        return self.how.endswith(".SILENT")

    @classmethod
    def parse(cls, arguments: list) -> StoreRequest:
        unchanged_since = None
        if len(arguments) == 4 and isinstance(arguments[1], list):  # RFC 7162 3.1.3
            modifier = [str(word).upper() for word in arguments[1]]
            if len(modifier) != 2 or modifier[0] != "UNCHANGEDSINCE":
                raise BadCommand("STORE takes the modifier (UNCHANGEDSINCE mod-sequence)")
            unchanged_since = imap_modseq(modifier[1])
            arguments = [arguments[0], *arguments[2:]]
        if len(arguments) != 3:
            raise BadCommand("usage: STORE sequence-set [(UNCHANGEDSINCE n)] [+-]FLAGS[.SILENT] "
                             "(flags)")
        how = str(arguments[1]).upper()
        if how.removesuffix(".SILENT") not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise BadCommand("STORE takes FLAGS, +FLAGS or -FLAGS, optionally .SILENT")
        names = arguments[2] if isinstance(arguments[2], list) else [arguments[2]]
        if not all(isinstance(name, Atom) for name in names):  # RFC 3501 section 9: flag
            raise BadCommand("flags are atoms, as \\Seen or $Label, in one list")
        if any(str(n).startswith("\\") and str(n).lower() not in IMAP_SYSTEM_FLAGS for n in names):
            raise BadCommand("\\Recent and unknown system flags cannot be stored")
        return cls(arguments[0], unchanged_since, how,
                   {IMAP_SYSTEM_FLAGS[str(n).lower()] for n in names
                    if str(n).lower() in IMAP_SYSTEM_FLAGS},
                   {str(n) for n in names if not str(n).startswith("\\")})

    def applied_to(self, summary: Summary) -> tuple[set[str], set[str]]:
        """The message's letters and keywords once this STORE is done."""
        letters, keywords = set(summary.flags), set(summary.keywords.split())
        if self.how.startswith("+"):
            return letters | self.letters, keywords | self.keywords
        if self.how.startswith("-"):
            return letters - self.letters, keywords - self.keywords
        return self.letters | (letters - set(IMAP_SYSTEM_FLAGS.values())), set(self.keywords)


def flat_words(arguments: list) -> set[str]:
    """The atoms of a parsed command, at any depth, in upper case."""
    words = set()
    for argument in arguments:
        if isinstance(argument, list):
            words |= flat_words(argument)
        elif not isinstance(argument, bytes):
            words.add(str(argument).upper())
    return words


def esearch_reply(tag: str, by_uid: bool, returned: list[str], found: list[int],
                  modseq: int | None = None):
    """* ESEARCH (TAG "a1") [UID] MIN n MAX n COUNT n ALL set (RFC 4731 section 3.1): MIN,
    MAX and ALL only when something matched; numbers ascending, ALL as ranges (1:3,5); and
    MODSEQ n for a search by MODSEQ (RFC 7162 section 3.1.5)."""
    words = [f'(TAG "{tag}")'] + ["UID"] * by_uid
    if found and "MIN" in returned:
        words.append(f"MIN {found[0]}")
    if found and "MAX" in returned:
        words.append(f"MAX {found[-1]}")
    if "COUNT" in returned:
        words.append(f"COUNT {len(found)}")
    if found and "ALL" in returned:
        words.append("ALL " + number_set(found))
    if modseq is not None:
        words.append(f"MODSEQ {modseq}")
    return untagged(" ".join(["ESEARCH", *words]))


def number_set(numbers: list[int]) -> str:
    """Ascending numbers as an IMAP sequence set, in ranges: 1:3,5."""
    ranges, start = [], numbers[0]
    for before, number in zip(numbers, numbers[1:] + [None]):
        if number != before + 1:
            ranges.append(f"{start}:{before}" if before != start else str(start))
            start = number
    return ",".join(ranges)


def internal_date(text: str) -> float | None:
    """APPEND's date-time (RFC 3501 section 9: "17-Jul-1996 02:44:25 -0700", the day
    perhaps space-padded) as a Unix time, or None if it is not one."""
    try:
        moment = datetime.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return moment if 0 <= moment < 2 ** 33 else None


def imap_date(moment: float) -> str:
    """INTERNALDATE: "17-Jul-1996 02:44:25 -0700" (RFC 3501 section 9, date-time)."""
    local = datetime.datetime.fromtimestamp(moment).astimezone()
    offset = int(local.utcoffset().total_seconds() // 60)
    sign, offset = "+-"[offset < 0], abs(offset)
    return (f"{local.day:2d}-{IMAP_MONTHS[local.month - 1]}-{local.year} "
            f"{local:%H:%M:%S} {sign}{offset // 60:02d}{offset % 60:02d}")


def parse_imap_date(text: str) -> datetime.date:
    """A SEARCH date: "1-Feb-1994"."""
    found = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    months = [month.lower() for month in IMAP_MONTHS]
    if not found or found.group(2).lower() not in months:
        raise BadCommand(f"{text[:40]!r} is not a date such as 1-Feb-2026")
    try:
        return datetime.date(int(found.group(3)), months.index(found.group(2).lower()) + 1,
                             int(found.group(1)))
    except ValueError:  # 31-Feb-2024, or the year 0000
        raise BadCommand(f"{text!r} is not a day of the calendar") from None


def imap_modseq(text: str) -> int:
    """A mod-sequence value (RFC 7162 section 7: 63 bits unsigned)."""
    if not (0 < len(text) <= 19 and text.isdigit() and text.isascii() and int(text) < 2 ** 63):
        raise BadCommand(f"{text[:25]!r} is not a mod-sequence value")
    return int(text)


def imap_number(text: str, what: str = "a number", smallest: int = 0) -> int:
    """A number (RFC 3501 section 9: number, 32 bits unsigned; nz-number with smallest 1).
    Ten digits at most are read, so that int() never meets Python's limit of 4,300 digits
    (a ValueError)."""
    if not (0 < len(text) <= 10 and text.isdigit() and text.isascii()
            and smallest <= int(text) < 2 ** 32):
        raise BadCommand(f"{text[:20]!r} is not {what} ({smallest} to 4294967295)")
    return int(text)


def sequence_set(text: str, largest: int) -> list[tuple[int, int]]:
    """A sequence set ("1:3,5,7:*") as inclusive ranges, sorted, overlaps joined (so that
    in_ranges() can bisect); * is the largest number there is."""
    ranges = []
    for item in text.split(","):
        ends = item.split(":")
        if len(ends) > 2:
            raise BadCommand(f"{text[:40]!r} is not a sequence set")
        low, high = (largest if end == "*" else imap_number(end, "a message number", 1)
                     for end in (ends[0], ends[-1]))
        ranges.append((min(low, high), max(low, high)))
    joined: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if joined and low <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], high))
        else:
            joined.append((low, high))
    return joined


def in_ranges(number: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether number is in the sorted, disjoint ranges of sequence_set(): a bisection, so
    that a SEARCH UID of 16,000 ranges costs 14 steps a message, not 16,000."""
    at = bisect.bisect_right(ranges, (number, 2 ** 32)) - 1
    return at >= 0 and ranges[at][0] <= number <= ranges[at][1]


def wildcard_match(pattern: str, name: str) -> bool:
    """Whether a mailbox name matches a LIST pattern (RFC 3501 section 6.3.8): "*" matches
    anything, "%" anything but the hierarchy delimiter "/", case aside. A regular expression
    made of the pattern backtracks: "*********x" took 24 s on one name. Here the pattern's
    positions that the name so far can have reached are bits of one integer, moved along
    one character at a time: len(name) steps, whatever the pattern (as Dovecot matches)."""
    pattern, name = re.sub(r"[*%]*\*[*%]*", "*", pattern.lower()), name.lower()
    stars = percents = 0
    letters: dict[str, int] = {}
    for at, ch in enumerate(pattern):
        if ch == "*":
            stars |= 1 << at
        elif ch == "%":
            percents |= 1 << at
        else:
            letters[ch] = letters.get(ch, 0) | 1 << at
    wild = stars | percents

    def closure(reached: int) -> int:  # a wildcard may match nothing: step over it
        return reached | (reached & wild) << 1  # runs of wildcards were made one above
    reached = closure(1)
    for ch in name:
        staying = reached & (stars if ch == "/" else wild)
        reached = closure(staying | (reached & letters.get(ch, 0)) << 1)
        if not reached:
            return False
    return bool(reached >> len(pattern) & 1)


def mutf7_encode(name: str) -> str:
    """A mailbox name in IMAP's modified UTF-7 (RFC 3501 section 5.1.3): ASCII as it is,
    "&" as "&-", anything else as &base64-of-UTF-16-;"."""
    out, pending = [], ""

    def flush():
        nonlocal pending
        if pending:
            encoded = base64.b64encode(pending.encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + encoded.replace("/", ",") + "-")
            pending = ""
    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending += ch
    flush()
    return "".join(out)


def mutf7_decode(name: str) -> str:
    def decode(found):
        text = found.group(1)
        if not text:
            return "&"
        data = text.replace(",", "/")
        return base64.b64decode(data + "=" * (-len(data) % 4)).decode("utf-16-be", "replace")
    try:
        return re.sub(r"&([A-Za-z0-9+,]*)-", decode, name)
    except (ValueError, binascii.Error):
        raise BadCommand(f"{name!r} is not a mailbox name in modified UTF-7") from None


@dataclass(frozen=True)
class ImapReply:
    wire: bytes

    @property
    def refusal(self) -> bool:
        return re.match(rb"[^ *+]\S* (NO|BAD) ", self.wire) is not None

    def transcript_lines(self) -> list[str]:
        """Its lines, each literal ({n} and n octets: a message, a header) only counted."""
        shown, position = [], 0
        for found in re.finditer(rb"\{(\d+)\}\r\n", self.wire):
            if found.start() < position:
                continue
            shown.append(self.wire[position:found.start()])
            shown.append(b"<%d octets>" % int(found.group(1)))
            position = found.end() + int(found.group(1))
        shown.append(self.wire[position:])
        return b"".join(shown).decode("utf-8", "replace").splitlines()


def untagged(*parts: bytes | str) -> ImapReply:
    return ImapReply(b"* " + b" ".join(p.encode() if isinstance(p, str) else p
                                        for p in parts) + b"\r\n")


def tagged(tag: str, status: str, text: str) -> ImapReply:
    return ImapReply(f"{tag} {status} {text}".encode("utf-8", "replace") + b"\r\n")


def go_ahead(text: str = "") -> ImapReply:
    """A continuation request: the server waits for the rest (RFC 3501 section 7.5)."""
    return ImapReply(f"+ {text}".rstrip().encode() + b"\r\n")


@dataclass(frozen=True)
class ImapMailbox:
    """A mailbox as IMAP shows it: a view of the store."""

    name: str  # as the client names it: INBOX, Recipients/ann@example.com
    address: str | None  # the recipient whose mail it holds; None: every message
    read_only: bool


# -- 17.1 Messages as IMAP sees them: sections, BODYSTRUCTURE, ENVELOPE -----------------------
#
# IMAP names the pieces of a message (RFC 3501 section 6.4.5): BODY[] is all of it, [HEADER]
# and [TEXT] its two halves, [1], [2.1] its parts, [2.MIME] a part's own header, and [HEADER.
# FIELDS (SUBJECT)] chosen header lines; <0.100> cuts out a range. Every size and range is of
# the message with CRLF line endings: the stored file itself when SMTP delivered it (that is the
# usual case), else a converted copy.

RFC822_TYPES = ("message/rfc822", "message/global")


@contextlib.contextmanager
def imap_view(store: Store, summary: Summary):
    """The message as IMAP sends it: bytes (or a map) with CRLF line endings."""
    with store.open_file(summary.key) as file, message_bytes(file) as buffer:
        if summary.crlf_size == len(buffer):
            yield buffer
        else:
            yield with_crlf(bytes(buffer))


def parse_section(text: str) -> tuple[tuple[int, ...], str, tuple[str, ...]]:
    """A section specification: ("1.2.HEADER.FIELDS (FROM TO)") -> ((1, 2), "HEADER.FIELDS",
    ("FROM", "TO"))."""
    fields = ()
    if found := re.fullmatch(r"(.*?)\s*\((.*)\)", text, re.DOTALL):
        text = found.group(1)
        fields = tuple(name.strip('"').upper() for name in found.group(2).split())
    words = text.split(".") if text else []
    numbers = []
    while words and words[0].isdigit() and words[0].isascii():
        numbers.append(imap_number(words.pop(0), "a part number", 1))
    kind = ".".join(words).upper()
    valid = {"": False, "HEADER": False, "TEXT": False, "MIME": False,
             "HEADER.FIELDS": True, "HEADER.FIELDS.NOT": True}
    if kind not in valid or valid[kind] != bool(fields) or kind == "MIME" and not numbers:
        raise BadCommand(f"[{text}] is not a section")
    return tuple(numbers), kind, fields


def section_children(part: MimePart, top: bool) -> list[MimePart]:
    """The parts numbered under a part: a multipart's, those of the message in a message/rfc822
    part, or (for a message of one part) the part itself, which is its part 1."""
    if part.content_type.startswith("multipart/") and part.parts:
        return part.parts
    if part.content_type in RFC822_TYPES and part.parts and not top:
        inner = part.parts[0]
        multipart = inner.content_type.startswith("multipart/") and inner.parts
        return inner.parts if multipart else [inner]
    return [part] if top else []


def section_bytes(buffer, root: MimePart, numbers: tuple[int, ...], kind: str,
                  fields: tuple[str, ...]) -> bytes | None:
    """The bytes a section names; None where the message has no such part."""
    node = root
    for depth, number in enumerate(numbers):
        children = section_children(node, depth == 0)
        if not 0 < number <= len(children):
            return None
        node = children[number - 1]
    if kind == "MIME":
        return bytes(buffer[node.start:node.body_start])
    if kind in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
        message = node if not numbers else node.parts[0] if (
            node.content_type in RFC822_TYPES and node.parts) else None
        if message is None:
            return None
        if kind == "TEXT":
            return bytes(buffer[message.body_start:message.end])
        header = bytes(buffer[message.start:message.body_start])
        return header if kind == "HEADER" else header_fields(header, fields,
                                                             keep=kind == "HEADER.FIELDS")
    return bytes(buffer[node.body_start:node.end]) if numbers else bytes(buffer[:])


def header_fields(header: bytes, names: tuple[str, ...], keep: bool) -> bytes:
    """The header lines (with their continuations) named, or all but those; then the blank
    line, as RFC 3501 section 6.4.5 asks, "except in the case of a message which has no body
    and no blank line"."""
    wanted, chosen, taking = {name.lower() for name in names}, [], False
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
            taking = (name in wanted) == keep
        if taking:
            chosen.append(line + b"\r\n")
    blank = header.endswith((b"\r\n\r\n", b"\n\n")) or header in (b"\r\n", b"\n")
    return b"".join(chosen) + b"\r\n" * blank


def count_lines(buffer, start: int, end: int) -> int:
    """A body's size in lines (RFC 3501 section 7.4.2), as Dovecot counts them: its line
    endings. A part's last line ends at the boundary, which has the line ending."""
    return count_in(buffer, b"\n", start, end)


def body_structure(buffer, part: MimePart, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (RFC 3501 section 7.4.2), from the outline."""
    headers = part.headers
    if part.content_type.startswith("multipart/") and part.parts:
        fields = [imap_string(part.content_type.split("/", 1)[1].upper())]
        if extended:
            fields += [parameter_list(part.parameters), disposition_of(part),
                       *language_and_location(headers)]
        children = b"".join(body_structure(buffer, child, extended) for child in part.parts)
        return b"(" + children + b" " + b" ".join(fields) + b")"
    maintype, subtype = part.content_type.split("/", 1)
    fields = [imap_string(maintype.upper()), imap_string(subtype.upper()),
              parameter_list(part.parameters),
              imap_string(one_line(headers.get("Content-ID"))),
              imap_string(one_line(headers.get("Content-Description"))),
              imap_string(part.transfer_encoding.upper()),
              str(part.end - part.body_start).encode()]
    if maintype == "text":
        fields.append(str(count_lines(buffer, part.body_start, part.end)).encode())
    elif part.content_type in RFC822_TYPES and part.parts:
        fields += [envelope_of(part.parts[0]), body_structure(buffer, part.parts[0], extended),
                   str(count_lines(buffer, part.body_start, part.end)).encode()]
    if extended:
        fields += [imap_string(one_line(headers.get("Content-MD5"))), disposition_of(part),
                   *language_and_location(headers)]
    return imap_list(fields)


def language_and_location(headers) -> list[bytes]:
    """BODYSTRUCTURE's body-fld-lang (one string, or a list of them: RFC 3282's
    Content-Language) and body-fld-loc (RFC 2557's Content-Location)."""
    languages = [word.strip() for word in (one_line(headers.get("Content-Language")) or "")
                 .split(",") if word.strip()]
    language = (b"NIL" if not languages else imap_string(languages[0]) if len(languages) == 1
                else imap_list(imap_string(word) for word in languages))
    return [language, imap_string(one_line(headers.get("Content-Location")))]


def parameter_list(parameters: dict[str, str]) -> bytes:
    if not parameters:
        return b"NIL"
    return imap_list(imap_string(text) for name, value in parameters.items()
                     for text in (name.upper(), value))


def disposition_of(part: MimePart) -> bytes:
    if part.disposition is None:
        return b"NIL"
    return imap_list([imap_string(part.disposition.upper()),
                      parameter_list(part.disposition_parameters)])


def one_line(value) -> str | None:
    """A raw header value on one line (IMAP strings have none), or None if absent."""
    return None if value is None else re.sub(r"\r?\n[ \t]*", " ", str(value)).strip()


def address_groups(value: str) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """An address list split into its groups ("Team: a@x, b@y;") and the mailboxes between
    them (group None), in order, each a list of (name, address): email.utils.getaddresses
    drops the groups. One pass over the text, minding quotes, comments and angle brackets."""
    pieces, start, group, quoted, depth, angle, escaped = [], 0, None, False, 0, False, False
    for position, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif char == '"':
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth:
            pass
        elif char == "<":
            angle = True
        elif char == ">":
            angle = False
        elif char == ":" and not angle and group is None:
            pieces.append((None, value[start:value.rfind(",", start, position) + 1]))
            group = value[value.rfind(",", start, position) + 1:position].strip().strip('"')
            start = position + 1
        elif char == ";" and not angle and group is not None:
            pieces.append((group, value[start:position]))
            group, start = None, position + 1
    pieces.append((group, value[start:]))
    return [(name, [(person, address) for person, address in email.utils.getaddresses([text])
                    if address]) for name, text in pieces
            if name is not None or text.strip(" ,")]


def envelope_of(message: MimePart) -> bytes:
    """ENVELOPE: date, subject, from, sender, reply-to, to, cc, bcc, in-reply-to and
    message-id, from the raw header values; Sender and Reply-To default to From."""
    headers = message.headers

    def addresses(name: str) -> bytes:
        # RFC 3501 section 9: "(" 1*address ")", no space between them; a group (RFC 5322
        # section 3.4) is (NIL NIL "name" NIL), its addresses, then (NIL NIL NIL NIL).
        found = []
        for value in headers.get_all(name, []):
            for group, members in address_groups(one_line(value)[:HEADER_DECODE_LIMIT]):
                found += [b"(NIL NIL " + imap_string(group) + b" NIL)"] if group else []
                found += [imap_list([imap_string(person or None), b"NIL",
                                     imap_string(address.rpartition("@")[0] or address),
                                     imap_string(address.rpartition("@")[2] or None)])
                          for person, address in members]
                found += [b"(NIL NIL NIL NIL)"] if group else []
        return b"(" + b"".join(found) + b")" if found else b"NIL"
    from_ = addresses("From")
    return imap_list([imap_string(one_line(headers.get("Date"))),
                      imap_string(one_line(headers.get("Subject"))), from_,
                      addresses("Sender") if headers.get("Sender") else from_,
                      addresses("Reply-To") if headers.get("Reply-To") else from_,
                      addresses("To"), addresses("Cc"), addresses("Bcc"),
                      imap_string(one_line(headers.get("In-Reply-To"))),
                      imap_string(one_line(headers.get("Message-ID")))])


# -- 17.2 SEARCH ------------------------------------------------------------------------------
#
# SEARCH (RFC 3501 section 6.4.4) has its own keys: flags, dates, sizes, and strings that match
# any part of a header or of the text, case aside. What the index knows (flags, size, arrival,
# From, To, Cc, Subject) is answered from it; BCC, HEADER, the Date header and the text are
# read from the message, and only for the messages the other keys left.


@dataclass
class SearchFacts:
    """One message, for SEARCH: what the index knows, and what can be read from its file."""

    store: Store
    number: int  # its sequence number
    summary: Summary
    flags: set[str]  # as IMAP names them, keywords and \Recent included

    @functools.cached_property
    def headers(self) -> email.message.Message:
        try:
            with self.store.maildir.read(self.store.locate(self.summary.key)) as buffer:
                return parse_headers(bytes(buffer[:header_bounds(buffer, 0, len(buffer))[0]]))
        except (OSError, TypeError):
            return parse_headers(b"")

    def text_holds(self, wanted) -> bool:
        """Whether the message's text parts hold `wanted`, case aside: what BODY and TEXT
        search. Read a piece at a time, so a 50 MB message costs as little memory as a small
        one while any number of sessions search it."""
        try:
            with self.store.maildir.read(self.store.locate(self.summary.key)) as buffer:
                return any(part_holds(buffer, part, wanted)
                           for part in outline(buffer).leaves(into_messages=True)
                           if part.content_type.startswith("text/"))
        except (OSError, TypeError):
            return False

    def header(self, name: str) -> str:
        return " ".join(decode_words(str(value)) for value in self.headers.get_all(name, []))

    def sent_on(self) -> datetime.date | None:
        try:
            return email.utils.parsedate_to_datetime(self.summary.date).date()
        except (TypeError, ValueError, IndexError):
            return None


def contains(text: str, wanted: str) -> bool:
    """SEARCH's strings match any part of the text, case aside (wanted: from searched_for)."""
    return wanted in text.lower().replace("\r", "")


def searched_for(wanted) -> str:
    """What SEARCH looks for: its string, decoded, lower case, without carriage returns."""
    wanted = wanted.decode("utf-8", "replace") if isinstance(wanted, bytes) else str(wanted)
    return wanted.lower().replace("\r", "")


SEARCH_PIECE = 64 * 1024  # encoded octets of a part that SEARCH decodes at a time


def part_holds(buffer, part: MimePart, wanted: str) -> bool:
    """Whether a text part, decoded, holds SEARCH's string (from searched_for): a piece at a
    time, each piece searched with the end of the one before, so that a match across two
    pieces is found."""
    decoder, carried = text_decoder(part.charset), ""
    for chunk in itertools.chain(decoded_chunks(buffer, part, SEARCH_PIECE), [None]):
        piece = decoder.decode(b"", final=True) if chunk is None else decoder.decode(chunk)
        text = carried + piece.lower().replace("\r", "")
        if wanted in text:
            return True
        carried = text[len(text) - len(wanted) + 1:] if len(wanted) > 1 else ""
    return False


def words_in(arguments: list) -> int:
    """How many words (atoms, strings, literals) a command's arguments hold, lists opened."""
    return sum(words_in(item) if isinstance(item, list) else 1 for item in arguments)


def search_program(arguments: list, largest: int, largest_uid: int, depth: int = 0):
    """SEARCH keys as a test of SearchFacts. BadCommand for keys that are wrong, and for
    keys nested (in parentheses, NOT and OR) deeper than IMAP_DEPTH_LIMIT, before Python's
    recursion limit would be met."""
    if depth > IMAP_DEPTH_LIMIT:
        raise BadCommand(f"SEARCH keys nested more than {IMAP_DEPTH_LIMIT} deep")
    tests, position = [], 0
    while position < len(arguments):
        test, position = search_key(arguments, position, largest, largest_uid, depth)
        tests.append(test)
    if not tests:
        raise BadCommand("SEARCH needs at least one key")
    return lambda facts: all(test(facts) for test in tests)


_FLAG_KEYS = {"SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
              "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
              "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
              "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
              "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
              "RECENT": ("\\Recent", True), "OLD": ("\\Recent", False)}
_HEADER_KEYS = {"FROM": "from_", "TO": "to", "CC": "cc", "SUBJECT": "subject"}


def search_key(arguments: list, position: int, largest: int, largest_uid: int, depth: int):
    """One key, from arguments[position]: (its test, where the next key starts)."""
    def take() -> str | bytes:
        nonlocal position
        if position >= len(arguments) or isinstance(arguments[position], list):
            raise BadCommand(f"{key} needs an argument")
        position += 1
        return arguments[position - 1]
    item = arguments[position]
    position += 1
    if isinstance(item, list):  # a parenthesised list: all of them
        test = search_program(item, largest, largest_uid, depth + 1)
        return test, position
    key = str(item).upper() if not isinstance(item, bytes) else ""
    match key:
        case "ALL":
            return (lambda facts: True), position
        case _ if key in _FLAG_KEYS:
            flag, wanted = _FLAG_KEYS[key]
            return (lambda facts: (flag in facts.flags) == wanted), position
        case "NEW":
            return (lambda facts: "\\Recent" in facts.flags
                    and "\\Seen" not in facts.flags), position
        case "KEYWORD" | "UNKEYWORD":
            keyword, wanted = str(take()).lower(), key == "KEYWORD"
            return (lambda facts: (keyword in {f.lower() for f in facts.flags}) == wanted), position
        case "NOT" | "OR" if depth >= IMAP_DEPTH_LIMIT:
            raise BadCommand(f"SEARCH keys nested more than {IMAP_DEPTH_LIMIT} deep")
        case "NOT":
            test, position = search_key(arguments, position, largest, largest_uid, depth + 1)
            return (lambda facts: not test(facts)), position
        case "OR":
            first, position = search_key(arguments, position, largest, largest_uid, depth + 1)
            second, position = search_key(arguments, position, largest, largest_uid, depth + 1)
            return (lambda facts: first(facts) or second(facts)), position
        case "UID":
            ranges = sequence_set(str(take()), largest_uid)
            return (lambda facts: in_ranges(facts.summary.uid, ranges)), position
        case "MODSEQ":  # RFC 7162 section 3.1.5: [entry-name entry-type] mod-sequence
            value = str(take())
            if value.startswith("/"):  # the entry's name and type: one value serves all
                take()
                value = str(take())
            least = imap_modseq(value)
            return (lambda facts: max(facts.summary.modseq, 1) >= least), position
        case _ if re.fullmatch(r"[\d:*,]+", key):
            ranges = sequence_set(key, largest)
            return (lambda facts: in_ranges(facts.number, ranges)), position
    if (test := content_key(key, take)) is None:
        raise BadCommand(f"{str(item)[:40]!r} is not a SEARCH key")
    return test, position


def content_key(key: str, take):
    """A key on a message's content, size or dates: its test, or None if it is not one."""
    match key:
        # Each string is made ready once (searched_for), not once for every message.
        case _ if key in _HEADER_KEYS:
            text, field_name = searched_for(take()), _HEADER_KEYS[key]
            return lambda facts: contains(getattr(facts.summary, field_name), text)
        case "BCC":
            text = searched_for(take())
            return lambda facts: contains(facts.header("Bcc"), text)
        case "HEADER":
            name, text = str(take()), searched_for(take())
            return lambda facts: name in facts.headers and contains(facts.header(name), text)
        case "BODY":
            text = searched_for(take())
            return lambda facts: facts.text_holds(text)
        case "TEXT":
            text = searched_for(take())
            return lambda facts: facts.text_holds(text) or any(
                contains(decode_words(str(value)), text) for value in facts.headers.values())
        case "LARGER" | "SMALLER":
            size = take()
            if not isinstance(size, str):
                raise BadCommand(f"{key} takes a number of octets")
            bigger, size = key == "LARGER", imap_number(size, "a number of octets")
            return lambda facts: (facts.summary.crlf_size > size if bigger
                                  else facts.summary.crlf_size < size)
        case "BEFORE" | "ON" | "SINCE" | "SENTBEFORE" | "SENTON" | "SENTSINCE":
            day = parse_imap_date(str(take()))
            compare = {"BEFORE": lambda d: d < day, "ON": lambda d: d == day,
                       "SINCE": lambda d: d >= day}[key.removeprefix("SENT")]
            if key.startswith("SENT"):
                return lambda facts: (sent := facts.sent_on()) is not None and compare(sent)
            return lambda facts: compare(datetime.date.fromtimestamp(facts.summary.time))
    return None


# -- 17.3 The session -------------------------------------------------------------------------


# A tag, then a verb (RFC 3501 section 9): tag = 1*<any ASTRING-CHAR except "+">, so no
# space, control character, "(){%*\"\\" nor "+" (a "+" line is a continuation request).
_IMAP_TAG_AND_VERB = re.compile(rb"([^\x00-\x20\x7f(){%*\"\\\]+]+) +([A-Za-z]+) *")


class ImapState(enum.Enum):
    NOT_AUTHENTICATED = "waiting for LOGIN or AUTHENTICATE"
    AUTHENTICATED = "logged in"
    SELECTED = "a mailbox selected"
    LOGOUT = "closed"


class RecentMessages:
    """\\Recent (RFC 3501 section 2.3.2): a message is recent in the first session that sees
    it. Shared by the IMAP sessions of a server: the highest UID each mailbox has shown."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def unclaimed(self, mailbox: str) -> int:
        """The highest UID a session of this mailbox has shown: those above are \\Recent."""
        with self._lock:
            return self._seen.get(mailbox, 0)

    def claim(self, mailbox: str, uids) -> set[int]:
        with self._lock:
            seen = self._seen.get(mailbox, 0)
            if uids:
                self._seen[mailbox] = max(seen, max(uids))
            return {uid for uid in uids if uid > seen}


@dataclass(eq=False)
class Selected:
    """The mailbox a session has selected: message n is UID uids[n - 1]."""

    mailbox: ImapMailbox
    uids: array.array
    read_only: bool
    modseq: int  # the store's, when this session last looked for changes
    event: int  # the store's last event, then
    uidvalidity: int  # the index's when the UIDs were read: they mean nothing after it
    recent: set[int] = field(default_factory=set)
    expunged: set[int] = field(default_factory=set)  # by others, not told yet (section 7.4.1)
    own: dict[int, int] = field(default_factory=dict)  # UID -> modseq of this session's changes

    def number(self, uid: int) -> int | None:
        at = bisect.bisect_left(self.uids, uid)
        return at + 1 if at < len(self.uids) and self.uids[at] == uid else None


@dataclass
class ImapSession(TakesTurns):
    """One IMAP conversation: bytes in, replies out (some of them Streamed from files)."""

    store: Store
    locks: RecentMessages
    users: dict[str, str] | None = None  # as for SMTP AUTH: None accepts any user and password
    tls_available: bool = False
    tls_required: bool = False  # no LOGIN before STARTTLS: LOGINDISABLED (RFC 3501 6.2.3)
    max_size: int = DEFAULT_MAX_SIZE
    peer: str = ""
    logins: LoginGuard | None = None
    state: ImapState = ImapState.NOT_AUTHENTICATED
    user: str | None = None
    tls: str | None = None
    selected: Selected | None = None
    idling: str | None = None  # the tag of the IDLE command in progress
    # Called by the store, from another thread, when something changed: the handler's way
    # to wake this session's read (without it, IDLE looks every IMAP_IDLE_TICK seconds).
    wake: Callable[[], None] | None = None
    unknown_commands: int = 0
    condstore: bool = False  # RFC 7162: MODSEQ in FETCH, once enabled
    auth_failures: int = 0
    _incoming: Incoming = field(default_factory=lambda: Incoming(IMAP_LINE_LIMIT))
    _pieces: list = field(default_factory=list)  # the command so far: text, literal, text...
    _literal_left: int = 0
    _literal_parts: list[bytes] = field(default_factory=list)
    _literal_writer: object = None  # APPEND's message goes straight to the store
    _discarding: bool = False  # a refused non-synchronising literal: read and dropped
    _refusal: ImapReply | None = None  # what to answer once the refused command has ended
    _authenticating: str | None = None  # the tag of an AUTHENTICATE waiting for its response
    _turn: Turn = field(default_factory=Turn)
    _tls_pending: bool = False
    transcript: Transcript | None = None

    def greeting(self) -> Turn:
        return self.hand_over([untagged(f"OK [CAPABILITY {self.capabilities()}] sheesh "
                                        f"IMAP4rev1 ready")])

    def goodbye(self, reason: str) -> ImapReply:
        return untagged({"timeout": "BYE autologout: idle for too long",
                         "shutdown": "BYE [UNAVAILABLE] server shutting down",
                         "busy": "BYE [UNAVAILABLE] too many connections, try again later",
                         "crowded": "BYE [UNAVAILABLE] too many connections from your address",
                         "error": "BYE [SERVERBUG] internal server error"}[reason])

    @property
    def closed(self) -> bool:
        return self.state is ImapState.LOGOUT

    @property
    def busy(self) -> bool:
        """A command (or a literal) has begun to arrive and not yet ended."""
        return self._incoming.waiting or bool(self._pieces or self._literal_left)

    @property
    def in_data(self) -> bool:
        return self._literal_writer is not None  # an APPEND's message is arriving

    @property
    def idle_limit(self) -> float | None:
        return IMAP_LOGIN_TIMEOUT if self.state is ImapState.NOT_AUTHENTICATED else None

    @property
    def tick_interval(self) -> float | None:
        """While IDLE, the handler asks tick() this often for changes to push."""
        return IMAP_IDLE_TICK if self.idling is not None else None

    def tick(self) -> Turn:
        """IDLE's news (the store woke it, or its timer did): what was announced."""
        return self.hand_over(self.updates(news=True) if self.idling is not None else [])

    def capabilities(self) -> str:
        words = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                 "UNSELECT", "UIDPLUS", "CHILDREN", "ESEARCH", "STATUS=SIZE", "CONDSTORE"]
        if self.state is ImapState.NOT_AUTHENTICATED:
            if self.tls_available and self.tls is None:
                words.append("STARTTLS")
            if self.tls_required and self.tls is None:
                words.append("LOGINDISABLED")
            else:
                words.append("AUTH=PLAIN")
        return " ".join(words)

    # -- reading commands: lines, and literals between them

    def receive(self, data: bytes) -> Turn:
        """Bytes in; the replies they call for, in order (commands may be pipelined)."""
        incoming, replies = self._incoming, []
        incoming.add(data)
        while not self.closed and not self._tls_pending:
            if self._literal_left:
                if not (piece := incoming.take(self._literal_left)):
                    break
                replies += self.take_literal(piece)
            elif (line := incoming.line()) is None:
                break
            elif line is LINE_TOO_LONG_MARK:
                replies.append(self.too_long())
            else:
                replies += self.handle_line(line.removesuffix(b"\r"))
        if self.closed or self._tls_pending:
            incoming.clear()  # RFC 3501 section 6.2.1: nothing sent before TLS is used
        return self.hand_over(replies)

    def stop_idling(self) -> str:
        """IDLE ends: the tag it had."""
        tag, self.idling = self.idling, None
        self.store.unwatch(self.wake)
        return tag

    def too_long(self) -> ImapReply:
        self.abort_append(self._pieces)
        self._pieces = []
        return untagged("BAD command line too long")

    def handle_line(self, line: bytes) -> list:
        if self.transcript is not None:
            self.transcript.client(self.shown(line))
        if self.idling is not None:
            tag = self.stop_idling()
            if line.strip().upper() != b"DONE":
                return [tagged(tag, "BAD", "expected DONE to end IDLE")]
            return self.updates() + [tagged(tag, "OK", "IDLE terminated")]
        if self._authenticating is not None:
            return self.finish_authenticate(line)
        if self.state is ImapState.NOT_AUTHENTICATED:
            if self.held() + len(line) > IMAP_PRELOGIN_LIMIT:
                return [self.too_long()]
        elif sum(map(len, self._pieces[::2])) + len(line) > IMAP_LINE_LIMIT:
            return [self.too_long()]
        if found := re.search(rb"\{(\d{1,12})(\+?)\}$", line):
            self._pieces.append(line[:found.start()])
            return self.start_literal(int(found.group(1)), synchronizing=not found.group(2))
        pieces, self._pieces = self._pieces + [line], []
        refusal, self._refusal = self._refusal, None
        return [refusal] if refusal is not None else self.handle_command(pieces)

    def held(self) -> int:
        """The octets of the command so far kept in memory (APPEND's message goes to disk)."""
        return sum(len(piece) for piece in self._pieces if isinstance(piece, bytes))

    def shown(self, line: bytes) -> str:
        """A line as the transcript shows it: the secrets of LOGIN and AUTHENTICATE masked."""
        if self._authenticating is not None or self._pieces and self.command_start()[1] in (
                "LOGIN", "AUTHENTICATE"):  # a response, or what follows a literal of LOGIN
            return "****"
        text = line.decode("utf-8", "replace")
        words = text.split(None, 3)  # tag, verb, user name or mechanism, the secret
        if len(words) > 1 and words[1].upper() in ("LOGIN", "AUTHENTICATE"):
            return " ".join(words[:3]) + (" ****" if len(words) > 3 else "")
        return text

    def start_literal(self, size: int, synchronizing: bool) -> list:
        """A literal of `size` bytes follows (RFC 3501 section 4.3; RFC 7888 for {n+}): say
        "go ahead", or refuse it before it is sent; APPEND's message goes to the store."""
        if self.transcript is not None:
            self.transcript.client(f"<a literal of {size:,} octets>")
        tag, verb = self.command_start()
        refusal, self._literal_left = None, size
        logged_in = self.state is not ImapState.NOT_AUTHENTICATED
        limit = IMAP_LITERAL_LIMIT if logged_in else IMAP_PRELOGIN_LIMIT
        if verb == "APPEND" and logged_in and self.append_message_follows():
            refusal = self.begin_append(tag, size)
        elif self.held() + size > limit:  # for the whole command, not each literal
            refusal = tagged(tag, "BAD", f"literal too big: at most {limit} octets in one "
                                         "command" + ("" if logged_in else " before LOGIN"))
        if refusal is None:
            return [go_ahead("ready for the literal")] if synchronizing else []
        if synchronizing:  # the client waits for "+": it will not send the literal
            self.abort_append(self._pieces)
            self._pieces, self._literal_left = [], 0
            return [refusal]
        if not logged_in or size > max(self.max_size, IMAP_LITERAL_LIMIT) * 2:
            self.state = ImapState.LOGOUT
            self.note(logging.INFO, "closed", "a literal far too big")
            return [refusal, untagged("BYE literal too big")]
        self._discarding, self._refusal = True, refusal
        return []

    def take_literal(self, piece: bytes) -> list:
        self._literal_left -= len(piece)
        if self._literal_writer is not None and not isinstance(self._literal_writer, OSError):
            try:
                self._literal_writer.write(piece)
            except OSError as error:
                self._literal_writer = error  # answered when the command ends
        elif not self._discarding:
            self._literal_parts.append(piece)
        if self._literal_left:
            return []
        if self._literal_writer is not None:
            self._pieces.append(self._literal_writer)
            self._literal_writer = None
        elif not self._discarding:
            self._pieces.append(b"".join(self._literal_parts))
        else:
            self._pieces.append(b"")
        self._literal_parts, self._discarding = [], False
        return []

    def command_start(self) -> tuple[str, str]:
        found = _IMAP_TAG_AND_VERB.match(self._pieces[0] or b"")
        return (found.group(1).decode("ascii", "replace"), found.group(2).decode().upper()
                ) if found else ("*", "")

    def handle_command(self, pieces: list) -> list:
        found = _IMAP_TAG_AND_VERB.match(pieces[0])
        if found and found.end(2) < len(pieces[0]) and pieces[0][found.end(2)] != 32:
            found = None  # the verb runs on into something that is not a space
        if not found:
            return self.unknown("*", "cannot read a tag and a command")
        tag, verb = found.group(1).decode("ascii", "replace"), found.group(2).decode().upper()
        if goodbye := self.renumbered():
            self.abort_append(pieces)
            return goodbye
        try:
            arguments = parse_imap_arguments([pieces[0][found.end():], *pieces[1:]])
            if verb == "UID":
                return self.uid_command(tag, arguments)
            return self.dispatch(tag, verb, arguments)
        except BadCommand as problem:
            self.abort_append(pieces)
            return [tagged(tag, "BAD", str(problem))]
        except UidsRenumbered:  # built anew while the command ran: nothing was deleted
            return self.renumbered() or [untagged("BYE the index was built anew")]

    def renumbered(self) -> list:
        """BYE, once the index was built anew under the selected mailbox: its UIDs may name
        other messages now, and a client must see the new UIDVALIDITY before it acts on
        any (RFC 3501 section 2.3.1.1); it does when it selects the mailbox again."""
        if self.selected is None or self.selected.uidvalidity == self.store.uidvalidity:
            return []
        self.state, self.selected = ImapState.LOGOUT, None
        self.note(logging.INFO, "closed", "the index was built anew: the UIDs changed")
        return [untagged("BYE [UNAVAILABLE] the index was built anew and the UIDs changed: "
                         "log in again")]

    def unknown(self, tag: str, text: str) -> list:
        self.unknown_commands += 1
        if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
            self.state = ImapState.LOGOUT
            self.note(logging.INFO, "closed", "too many bad commands")
            return [untagged("BYE too many bad commands")]
        return [tagged(tag, "BAD", text)]

    # -- the commands

    def dispatch(self, tag: str, verb: str, arguments: list) -> list:
        """One command: the heart of IMAP. Each state allows its own (RFC 3501 section 6):
        these four in any state; then the state decides, below."""
        match verb:
            case "CAPABILITY":
                return [untagged(f"CAPABILITY {self.capabilities()}"),
                        tagged(tag, "OK", "CAPABILITY completed")]
            case "NOOP":
                return self.updates() + [tagged(tag, "OK", "NOOP completed")]
            case "LOGOUT":
                self.state = ImapState.LOGOUT
                return [untagged("BYE sheesh IMAP server signing off"),
                        tagged(tag, "OK", "LOGOUT completed")]
            case "ID":
                return [untagged(b"ID " + imap_list([b'"name"', b'"sheesh"', b'"version"',
                                                    imap_string(__version__)])),
                        tagged(tag, "OK", "ID completed")]
        if self.state is ImapState.NOT_AUTHENTICATED:
            return self.not_authenticated(tag, verb, arguments)
        return self.authenticated(tag, verb, arguments)

    def not_authenticated(self, tag: str, verb: str, arguments: list) -> list:
        match verb:
            case "STARTTLS":
                return self.starttls(tag)
            case "LOGIN":
                return self.login(tag, arguments)
            case "AUTHENTICATE":
                return self.authenticate(tag, arguments)
        return self.not_here(tag, verb)

    def authenticated(self, tag: str, verb: str, arguments: list) -> list:
        match verb:
            case "ENABLE":  # RFC 5161; CONDSTORE is the one that changes anything here
                enabled = ["CONDSTORE"] if any(str(name).upper() == "CONDSTORE"
                                               for name in arguments) else []
                self.condstore = self.condstore or bool(enabled)
                return [untagged(" ".join(["ENABLED", *enabled])),
                        tagged(tag, "OK", "ENABLE completed")]
            case "NAMESPACE":
                return [untagged('NAMESPACE (("" "/")) NIL NIL'),
                        tagged(tag, "OK", "NAMESPACE completed")]
            case "LIST" | "LSUB":
                return self.list_mailboxes(tag, verb, arguments)
            case "SUBSCRIBE" | "UNSUBSCRIBE":
                return [tagged(tag, "OK", f"{verb} completed (every mailbox is subscribed)")]
            case "STATUS":
                return self.status(tag, arguments)
            case "SELECT" | "EXAMINE":
                return self.select(tag, verb, arguments)
            case "CREATE" | "DELETE" | "RENAME":
                return [tagged(tag, "NO", "[CANNOT] the mailboxes are sheesh's recipients: "
                                          "they cannot be created, deleted or renamed")]
            case "APPEND":
                return self.append(tag, arguments)
            case "IDLE":
                self.idling = tag
                self.store.watch(self.wake)  # arrivals are announced at once, and wake us
                return [go_ahead("idling")] + self.updates()
        if self.state is ImapState.SELECTED:
            return self.in_mailbox(tag, verb, arguments)
        return self.not_here(tag, verb)

    def in_mailbox(self, tag: str, verb: str, arguments: list) -> list:
        """The commands of a selected mailbox."""
        match verb:
            case "CHECK":
                return self.updates() + [tagged(tag, "OK", "CHECK completed")]
            case "CLOSE" | "UNSELECT":
                if verb == "CLOSE" and not self.selected.read_only:
                    self.expunge_deleted(None)  # silently (RFC 3501 section 6.4.2)
                self.selected, self.state = None, ImapState.AUTHENTICATED
                return [tagged(tag, "OK", f"{verb} completed")]
            case "EXPUNGE":
                return self.expunge(tag, None)
            case "SEARCH":
                return self.search(tag, arguments, by_uid=False)
            case "FETCH":
                return self.fetch(tag, arguments, by_uid=False)
            case "STORE":
                return self.store_flags(tag, arguments, by_uid=False)
            case "COPY":
                return self.copy(tag, arguments, by_uid=False)
        return self.not_here(tag, verb)

    def not_here(self, tag: str, verb: str) -> list:
        if verb in IMAP_COMMANDS:
            return [tagged(tag, "BAD", f"{verb} is not allowed: {self.state.value}")]
        return self.unknown(tag, f"unknown command {verb[:20]}")

    def uid_command(self, tag: str, arguments: list) -> list:
        """UID FETCH, STORE, SEARCH, COPY, EXPUNGE: the same, with UIDs for numbers."""
        if self.state is not ImapState.SELECTED:
            return [tagged(tag, "BAD", "UID needs a selected mailbox")]
        verb = str(arguments[0]).upper() if arguments else ""
        rest = arguments[1:]
        match verb:
            case "FETCH":
                return self.fetch(tag, rest, by_uid=True)
            case "STORE":
                return self.store_flags(tag, rest, by_uid=True)
            case "SEARCH":
                return self.search(tag, rest, by_uid=True)
            case "COPY":
                return self.copy(tag, rest, by_uid=True)
            case "EXPUNGE" if rest:  # RFC 4315 section 2.1
                ranges = sequence_set(str(rest[0]), self.largest_uid())
                return self.expunge(tag, ranges)
        return [tagged(tag, "BAD", "UID takes FETCH, STORE, SEARCH, COPY or EXPUNGE")]

    # -- logging in

    def starttls(self, tag: str) -> list:
        if not self.tls_available or self.tls is not None:
            return [tagged(tag, "NO" if self.tls is None else "BAD",
                           "TLS is not available" if self.tls is None else "TLS is already on")]
        self._tls_pending = self._turn.start_tls = True
        return [tagged(tag, "OK", "begin TLS negotiation now")]

    def tls_started(self, description: str) -> None:
        self.tls, self._tls_pending = description, False

    def login(self, tag: str, arguments: list) -> list:
        if self.tls_required and self.tls is None:
            return [tagged(tag, "NO", "[PRIVACYREQUIRED] use STARTTLS first")]
        if len(arguments) != 2 or isinstance(arguments[0], list) or isinstance(arguments[1], list):
            raise BadCommand("usage: LOGIN user password")
        user, password = (a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a)
                          for a in arguments)
        return self.check_login(tag, user, password.encode("utf-8", "surrogateescape"))

    def authenticate(self, tag: str, arguments: list) -> list:
        """AUTHENTICATE PLAIN (RFC 4616), with the response in the command (SASL-IR, RFC
        4959) or after a "+"."""
        if self.tls_required and self.tls is None:
            return [tagged(tag, "NO", "[PRIVACYREQUIRED] use STARTTLS first")]
        if not arguments or str(arguments[0]).upper() != "PLAIN":
            return [tagged(tag, "NO", "[CANNOT] only AUTHENTICATE PLAIN is supported")]
        if len(arguments) > 1:
            return self.plain_response(tag, str(arguments[1]).encode())
        self._authenticating = tag
        return [go_ahead()]

    def finish_authenticate(self, line: bytes) -> list:
        tag, self._authenticating = self._authenticating, None
        if line.strip() == b"*":
            return [tagged(tag, "BAD", "AUTHENTICATE cancelled")]
        return self.plain_response(tag, line.strip())

    def plain_response(self, tag: str, response: bytes) -> list:
        try:
            credentials = sasl_plain(base64.b64decode(response, validate=True))
        except (ValueError, binascii.Error):
            credentials = None
        if credentials is None:
            return [tagged(tag, "BAD", "cannot decode the response")]
        return self.check_login(tag, *credentials)

    def check_login(self, tag: str, user: str, password: bytes) -> list:
        if not user or any(ch < " " or ch == "\x7f" for ch in user):
            # A user name is a mailbox's address and goes into APPEND's trace headers: a
            # CR LF in it would write a header of its own there.
            return [tagged(tag, "BAD", "a user name cannot be empty or hold control characters")]
        if self.logins is not None and self.logins.refuses(self.peer):
            return [tagged(tag, "NO", "[UNAVAILABLE] too many failed logins from your address: "
                                      "try again later")]
        if self.users is not None and not password_matches(self.users, user, password):
            if self.logins is not None:
                self.logins.failed(self.peer, user, "IMAP")
            self.auth_failures += 1
            self._turn.wait += AUTH_FAILURE_DELAY
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.state = ImapState.LOGOUT
                self.note(logging.INFO, "closed", "too many failed logins")
                return [tagged(tag, "NO", "[AUTHENTICATIONFAILED] invalid credentials"),
                        untagged("BYE too many failed logins")]
            return [tagged(tag, "NO", "[AUTHENTICATIONFAILED] invalid credentials")]
        self.user, self.state = user, ImapState.AUTHENTICATED
        return [tagged(tag, "OK", f"[CAPABILITY {self.capabilities()}] logged in")]

    # -- mailboxes

    def mailboxes(self) -> list[ImapMailbox]:
        """What this user sees: a recipient's own INBOX; or all mail as INBOX, and each
        recipient's as Recipients/address."""
        if self.user and "@" in self.user:
            return [ImapMailbox("INBOX", self.user.lower(), False)]
        return [ImapMailbox("INBOX", None, False)] + [
            ImapMailbox(f"{RECIPIENTS_FOLDER}/{box['address']}", box["address"], True)
            for box in self.store.mailboxes()]

    def find_mailbox(self, argument) -> ImapMailbox | None:
        name = mutf7_decode(argument.decode("utf-8", "replace") if isinstance(
            argument, bytes) else str(argument))
        if name.upper() == "INBOX":
            return self.mailboxes()[0]
        if not self.user or "@" not in self.user:
            folder, _, address = name.partition("/")
            if folder.lower() == RECIPIENTS_FOLDER.lower() and address:
                return ImapMailbox(f"{RECIPIENTS_FOLDER}/{address.lower()}", address.lower(),
                                   True) if self.store.counts(address)[0] else None
        return None

    def list_mailboxes(self, tag: str, verb: str, arguments: list) -> list:
        if len(arguments) != 2:
            raise BadCommand(f"usage: {verb} reference mailbox-pattern")
        reference, pattern = (mutf7_decode(a.decode() if isinstance(a, bytes) else str(a))
                              for a in arguments)
        if not pattern:  # RFC 3501 section 6.3.8: the hierarchy delimiter
            return [untagged('LIST (\\Noselect) "/" ""'), tagged(tag, "OK", f"{verb} completed")]
        if len(reference + pattern) > IMAP_PATTERN_LIMIT:
            raise BadCommand(f"a pattern of at most {IMAP_PATTERN_LIMIT} characters")
        boxes = self.mailboxes()
        entries = [(box.name, "\\HasNoChildren") for box in boxes]
        if len(boxes) > 1:
            entries.insert(1, (RECIPIENTS_FOLDER, "\\Noselect \\HasChildren"))
        lines = [untagged(f"{verb} ({attributes}) \"/\" ".encode()
                          + imap_string(mutf7_encode(name)))
                 for name, attributes in entries if wildcard_match(reference + pattern, name)]
        return lines + [tagged(tag, "OK", f"{verb} completed")]

    def status(self, tag: str, arguments: list) -> list:
        if len(arguments) != 2 or not isinstance(arguments[1], list):
            raise BadCommand("usage: STATUS mailbox (MESSAGES UIDNEXT ...)")
        box = self.find_mailbox(arguments[0])
        if box is None:
            return [tagged(tag, "NO", "[NONEXISTENT] no such mailbox")]
        self.store.catch_up()
        total, unseen = self.store.counts(box.address)
        recent = len(self.store.uids(mailbox=box.address,
                                           after=self.locks.unclaimed(box.name)))
        values = {"MESSAGES": total, "UNSEEN": unseen, "UIDVALIDITY": self.store.uidvalidity,
                  "UIDNEXT": self.store.next_uid(), "RECENT": recent, "SIZE": None,
                  "HIGHESTMODSEQ": max(self.store.modseq, 1)}
        items = [str(item).upper() for item in arguments[1]]
        if not all(item in values for item in items):
            raise BadCommand("STATUS takes MESSAGES, RECENT, UIDNEXT, UIDVALIDITY, UNSEEN, "
                             "SIZE and HIGHESTMODSEQ")
        self.condstore = self.condstore or "HIGHESTMODSEQ" in items
        if "SIZE" in items:  # RFC 8438: the messages' sizes, as RFC822.SIZE gives each
            values["SIZE"] = sum(size for _, size in self.store.sizes(box.address))
        answer = " ".join(f"{item} {values[item]}" for item in items)
        name = imap_string(mutf7_encode(box.name))
        return [untagged(b"STATUS " + name + f" ({answer})".encode()),
                tagged(tag, "OK", "STATUS completed")]

    def select(self, tag: str, verb: str, arguments: list) -> list:
        """SELECT (read-write) or EXAMINE (read-only): the mailbox, and what is in it."""
        if len(arguments) == 2 and isinstance(arguments[1], list) and [
                str(name).upper() for name in arguments[1]] == ["CONDSTORE"]:
            self.condstore, arguments = True, arguments[:1]  # RFC 7162 section 3.1.8
        if len(arguments) != 1:
            raise BadCommand(f"usage: {verb} mailbox [(CONDSTORE)]")
        self.selected, self.state = None, ImapState.AUTHENTICATED
        box = self.find_mailbox(arguments[0])
        if box is None:
            return [tagged(tag, "NO", "[NONEXISTENT] no such mailbox")]
        if not self.store.complete(MAILBOX_INDEX_WAIT):
            return [tagged(tag, "NO", "[UNAVAILABLE] the mailbox is being indexed: try again "
                                      "in a minute")]
        modseq, event = self.store.modseq, self.store.last_event
        uids = array.array("q", self.store.uids(mailbox=box.address))
        read_only = verb == "EXAMINE" or box.read_only
        self.selected = Selected(box, uids, read_only, modseq, event, self.store.uidvalidity,
                                 self.locks.claim(box.name, uids))
        self.state = ImapState.SELECTED
        unseen = self.store.uids(Query((Condition("seen", value=False),)), box.address)
        flags = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
        permanent = "" if read_only else flags + " \\*"  # \*: new keywords are kept too
        replies = [untagged(f"FLAGS ({flags})"),
                   untagged(f"OK [PERMANENTFLAGS ({permanent})] "
                            f"{'read-only' if read_only else 'flags and keywords are kept'}"),
                   untagged(f"{len(uids)} EXISTS"), untagged(f"{len(self.selected.recent)} RECENT"),
                   untagged(f"OK [UIDVALIDITY {self.store.uidvalidity}] UIDs valid"),
                   untagged(f"OK [UIDNEXT {self.store.next_uid()}] predicted next UID")]
        if self.condstore:  # the store's: a mailbox's highest is never above it
            replies.append(untagged(f"OK [HIGHESTMODSEQ {max(modseq, 1)}] highest"))
        if unseen:
            replies.append(untagged(f"OK [UNSEEN {self.selected.number(unseen[0])}] first unseen"))
        access = "READ-ONLY" if read_only else "READ-WRITE"
        return replies + [tagged(tag, "OK", f"[{access}] {verb} completed")]

    # -- what changed meanwhile (RFC 3501 section 5.2: EXISTS, EXPUNGE, FETCH FLAGS)

    def updates(self, expunges: bool = True, news: bool = False) -> list:
        """What other sessions and programs changed in the selected mailbox since this
        session last looked (with `news`, as far as it was announced: IDLE). No EXPUNGE while
        answering FETCH, STORE or SEARCH (RFC 3501 section 7.4.1): those removals wait,
        their numbers still in place."""
        if goodbye := self.renumbered():
            return goodbye
        s = self.selected
        if s is None or (s.event == self.store.last_event and not (expunges and s.expunged)):
            return []
        s.event = self.store.last_event
        if news:
            self.store.catch_up_with_news()
        else:
            self.store.catch_up()
        modseq = self.store.modseq
        flagged, removed, trimmed = self.store.changes(s.modseq, s.mailbox.address)
        if trimmed:  # the list of removals was trimmed: compare the whole list
            current = set(self.store.uids(mailbox=s.mailbox.address))
            removed = [uid for uid in s.uids if uid not in current]
        elif removed := [uid for uid in removed if s.number(uid) is not None]:
            # Another recipient's delete leaves the message in this mailbox (Store.hide).
            still = self.store.present(removed, s.mailbox.address)
            removed = [uid for uid in removed if uid not in still]
        s.expunged.update(uid for uid in removed if s.number(uid) is not None)
        s.modseq, replies = modseq, []
        for uid, flags, changed, keywords in flagged:  # but this session's own changes
            number = s.number(uid)
            if number is not None and uid not in s.expunged and s.own.get(uid) != changed:
                names = self.flag_names(s, uid, flags, keywords)
                modseq_item = f" MODSEQ ({max(changed, 1)})" if self.condstore else ""
                replies.append(untagged(f"{number} FETCH (FLAGS ({names}){modseq_item})"))
        if expunges and s.expunged:
            replies += self.forget(s, s.expunged)
        new = self.store.uids(mailbox=s.mailbox.address, after=s.uids[-1] if s.uids else 0)
        if new:
            s.uids.extend(new)
            s.recent |= self.locks.claim(s.mailbox.name, new)
            replies += [untagged(f"{len(s.uids)} EXISTS"), untagged(f"{len(s.recent)} RECENT")]
        return replies

    def forget(self, s: Selected, uids: set[int]) -> list:
        """Take expunged messages out of the numbering; an EXPUNGE for each, highest first,
        so that no number sent is changed by another before it."""
        numbers = sorted((s.number(uid) for uid in uids if s.number(uid)), reverse=True)
        s.uids = array.array("q", (uid for uid in s.uids if uid not in uids))
        s.expunged -= uids
        for uid in uids:
            s.recent.discard(uid)
        return [untagged(f"{number} EXPUNGE") for number in numbers]

    def flag_names(self, s: Selected, uid: int, flags: str, keywords: str) -> str:
        names = [IMAP_FLAG_NAMES[f] for f in flags if f in IMAP_FLAG_NAMES]
        names += keywords.split()
        if uid in s.recent:
            names.append("\\Recent")
        return " ".join(names)

    def largest_uid(self) -> int:
        s = self.selected
        return s.uids[-1] if s.uids else 0

    def chosen(self, argument, by_uid: bool):
        """The messages a sequence set names, as (number, UID), in order, one at a time: a
        list of a million tuples would cost a hundred megabytes. The numbering is taken as it
        is now (a command pipelined after this one may change it before this one is sent)."""
        s = self.selected
        if isinstance(argument, (list, bytes)):
            raise BadCommand("expected a sequence set")
        uids = array.array("q", s.uids)
        if by_uid:
            spans = [(bisect.bisect_left(uids, low), bisect.bisect_right(uids, high))
                     for low, high in sequence_set(str(argument), self.largest_uid())]
        else:
            spans = [(low - 1, high) for low, high in sequence_set(str(argument), len(uids))]
            if any(high > len(uids) for _, high in spans):
                raise BadCommand("no such message (see EXISTS for how many there are)")
        merged = []
        for start, stop in sorted(spans):  # overlapping ranges name each message once
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            elif start < stop:
                merged.append([start, stop])
        return ((at + 1, uids[at]) for start, stop in merged for at in range(start, stop))

    # -- FETCH

    def fetch(self, tag: str, arguments: list, by_uid: bool) -> list:
        """FETCH: the replies are made as they are sent (Streamed), a message at a time, so
        FETCH 1:* BODY[] of a mailbox of 100,000 messages holds one in memory at most."""
        changed_since = None
        if len(arguments) == 3 and isinstance(arguments[2], list):  # RFC 7162 3.1.4.1
            modifier = [str(word).upper() for word in arguments[2]]
            if len(modifier) != 2 or modifier[0] != "CHANGEDSINCE":
                raise BadCommand("FETCH takes the modifier (CHANGEDSINCE mod-sequence)")
            changed_since, arguments = imap_modseq(modifier[1]), arguments[:2]
        if len(arguments) != 2:
            raise BadCommand("usage: FETCH sequence-set items [(CHANGEDSINCE mod-sequence)]")
        items = fetch_items(arguments[1])
        if by_uid and not any(item.name == "UID" for item in items):
            items.insert(0, FetchItem("UID"))  # RFC 3501 section 6.4.8
        if changed_since is not None or any(item.name == "MODSEQ" for item in items):
            self.condstore = True  # a CONDSTORE enabling command (section 3.1)
        if self.condstore and not any(item.name == "MODSEQ" for item in items) and (
                changed_since is not None or any(item.name == "FLAGS" for item in items)):
            items.append(FetchItem("MODSEQ"))
        chosen = self.chosen(arguments[0], by_uid)
        replies = self.updates(expunges=by_uid)
        s, store = self.selected, self.store
        marks_seen = not s.read_only and any(item.marks_seen for item in items)

        def produce():
            missing = 0
            for batch in batched(chosen, 200):
                found = {summary.uid: summary for summary in store.by_uids(
                    [uid for _, uid in batch])}
                for number, uid in batch:
                    summary = found.get(uid)
                    if changed_since is not None and (
                            summary is None or summary.modseq <= changed_since):
                        continue  # only what changed since (a gone one: nothing to say)
                    if summary is not None and marks_seen and not summary.seen:
                        summary = store.set_flags(summary.key, summary.flags + "S") or summary
                        s.own[uid] = summary.modseq
                    try:
                        yield from self.fetch_one(s, number, summary, items, marks_seen)
                    except LookupError:  # the message is gone (expunged elsewhere)
                        missing += 1
            yield (tagged(tag, "NO", "[EXPUNGEISSUED] some of the messages no longer exist")
                   if missing else tagged(tag, "OK", "FETCH completed")).wire
        return replies + [Streamed(produce, shown=f"<FETCH responses, then {tag} OK>")]

    def fetch_one(self, s: Selected, number: int, summary: Summary | None,
                  items: list[FetchItem], marks_seen: bool):
        """One message's FETCH response, in pieces; a big body is sent from the file."""
        if summary is None:
            raise LookupError
        fields = []
        needs_file = any(item.needs_file for item in items)
        with imap_view(self.store, summary) if needs_file else contextlib.nullcontext() as view:
            root = outline(view) if needs_file else None
            for item in items:
                fields.append(fetch_field(item, view, root, summary, self.flag_names(
                    s, summary.uid, summary.flags, summary.keywords)))
            if marks_seen and not any(item.name == "FLAGS" for item in items):
                fields.append([b"FLAGS (" + self.flag_names(
                    s, summary.uid, summary.flags, summary.keywords).encode() + b")"])
                if self.condstore and not any(item.name == "MODSEQ" for item in items):
                    fields.append([b"MODSEQ (%d)" % max(summary.modseq, 1)])
            yield b"* %d FETCH (" % number
            for position, pieces in enumerate(fields):
                if position:
                    yield b" "
                for piece in pieces:
                    if isinstance(piece, tuple):  # (start, end) of the view: a MB at a time
                        for at in range(piece[0], piece[1], 1 << 20):
                            yield bytes(view[at:min(at + (1 << 20), piece[1])])
                    else:
                        yield piece
            yield b")\r\n"

    # -- STORE, SEARCH, COPY, EXPUNGE, APPEND

    def store_flags(self, tag: str, arguments: list, by_uid: bool) -> list:
        """STORE n [(UNCHANGEDSINCE m)] [+-]FLAGS[.SILENT] (flags): system flags are the
        file's, keywords the index's; both kept for good, and seen by every session."""
        request = StoreRequest.parse(arguments)
        self.condstore = self.condstore or request.unchanged_since is not None
        s = self.selected
        if s.read_only:
            return [tagged(tag, "NO", "[READ-ONLY] the mailbox is read-only")]
        chosen = self.chosen(request.sequence, by_uid)
        replies, modified = self.updates(expunges=by_uid), []
        for batch in batched(chosen, 200):
            found = {m.uid: m for m in self.store.by_uids([uid for _, uid in batch])}
            for number, uid in batch:
                summary = found.get(uid)
                if summary is None:
                    continue
                if request.unchanged_since is not None and (
                        summary.modseq > request.unchanged_since):
                    modified.append(uid if by_uid else number)  # changed meanwhile: left
                    continue
                letters, keywords = request.applied_to(summary)
                if len(keywords) > IMAP_KEYWORDS_LIMIT:
                    return replies + [tagged(tag, "NO", f"[LIMIT] at most "
                                                        f"{IMAP_KEYWORDS_LIMIT} keywords on a "
                                                        f"message")]
                if letters != set(summary.flags):
                    summary = self.store.set_flags(summary.key, "".join(letters)) or summary
                    s.own[uid] = summary.modseq
                if keywords != set(summary.keywords.split()):
                    summary = self.store.set_keywords(summary, keywords)
                    s.own[uid] = summary.modseq
                if not request.silent or self.condstore:  # 3.1.3: MODSEQ is told
                    names = self.flag_names(s, uid, summary.flags, summary.keywords)
                    shown = "" if request.silent else f"FLAGS ({names})"
                    if self.condstore:
                        shown = f"{shown} MODSEQ ({max(summary.modseq, 1)})".lstrip()
                    replies.append(untagged(f"{number} FETCH ({shown}"
                                            + (f" UID {uid})" if by_uid else ")")))
        if modified:
            return replies + [tagged(tag, "OK", f"[MODIFIED {number_set(modified)}] "
                                                "Conditional STORE failed")]
        return replies + [tagged(tag, "OK", "STORE completed")]

    def search(self, tag: str, arguments: list, by_uid: bool) -> list:
        returned = None  # ESEARCH (RFC 4731): SEARCH RETURN (MIN MAX COUNT ALL) criteria
        if len(arguments) >= 2 and str(arguments[0]).upper() == "RETURN" and isinstance(
                arguments[1], list):
            returned = [str(option).upper() for option in arguments[1]] or ["ALL"]
            if not set(returned) <= {"MIN", "MAX", "COUNT", "ALL"}:
                raise BadCommand("SEARCH RETURN takes MIN, MAX, COUNT and ALL")
            arguments = arguments[2:]
        if len(arguments) >= 2 and str(arguments[0]).upper() == "CHARSET":
            if str(arguments[1]).upper() not in ("UTF-8", "US-ASCII"):
                return [tagged(tag, "NO", "[BADCHARSET (UTF-8 US-ASCII)] unknown charset")]
            arguments = arguments[2:]
        s = self.selected
        if words_in(arguments) > IMAP_SEARCH_KEYS_LIMIT:
            raise BadCommand(f"a SEARCH of at most {IMAP_SEARCH_KEYS_LIMIT} words")
        test = search_program(arguments, len(s.uids), self.largest_uid())
        by_modseq = "MODSEQ" in flat_words(arguments)
        self.condstore = self.condstore or by_modseq
        replies, found, highest = self.updates(expunges=by_uid), [], 0
        for batch in batched(enumerate(s.uids, start=1), 500):
            summaries = {m.uid: m for m in self.store.by_uids([uid for _, uid in batch])}
            for number, uid in batch:
                summary = summaries.get(uid)
                if summary is None:
                    continue
                flags = set(self.flag_names(s, uid, summary.flags, summary.keywords).split())
                if test(SearchFacts(self.store, number, summary, flags)):
                    found.append(uid if by_uid else number)
                    highest = max(highest, summary.modseq, 1)
        # RFC 7162 section 3.1.5: a search by MODSEQ says the highest of what it found.
        told = [f"(MODSEQ {highest})"] if by_modseq and found else []
        if returned is not None:
            return replies + [esearch_reply(tag, by_uid, returned, found,
                                            highest if told else None),
                              tagged(tag, "OK", "SEARCH completed")]
        return replies + [untagged(" ".join(["SEARCH", *map(str, found), *told])),
                          tagged(tag, "OK", "SEARCH completed")]

    def copy(self, tag: str, arguments: list, by_uid: bool) -> list:
        """COPY into INBOX (or the selected mailbox): a duplicate, byte for byte; COPYUID
        says which UIDs the copies have (RFC 4315)."""
        if len(arguments) != 2:
            raise BadCommand("usage: COPY sequence-set mailbox")
        target = self.find_mailbox(arguments[1])
        if target is None:
            return [tagged(tag, "NO", "[TRYCREATE] no such mailbox")]
        if target.read_only:
            return [tagged(tag, "NO", "[CANNOT] a Recipients/ folder is read-only")]
        chosen = self.chosen(arguments[0], by_uid)
        replies, sources, copies = self.updates(expunges=by_uid), [], []
        for _, uid in chosen:
            [summary] = self.store.by_uids([uid]) or [None]
            copied = self.store.copy(summary.key) if summary is not None else None
            if copied is not None:
                sources.append(uid)
                copies.append(copied.uid)
        if not copies:
            return replies + [tagged(tag, "OK", "COPY completed (nothing to copy)")]
        code = (f"[COPYUID {self.store.uidvalidity} {','.join(map(str, sources))} "
                f"{','.join(map(str, copies))}]")
        done = tagged(tag, "OK", f"{code} COPY completed")
        return replies + self.updates(expunges=by_uid) + [done]

    def expunge(self, tag: str, uid_ranges: list | None) -> list:
        s = self.selected
        if s.read_only:
            return [tagged(tag, "NO", "[READ-ONLY] the mailbox is read-only")]
        gone = self.expunge_deleted(uid_ranges)
        return self.updates() + self.forget(s, gone) + [tagged(tag, "OK", "EXPUNGE completed")]

    def expunge_deleted(self, uid_ranges: list | None) -> set[int]:
        """Remove the selected mailbox's messages flagged \\Deleted (of those UIDs)."""
        s, doomed = self.selected, []
        for batch in batched(s.uids, 500):
            doomed += [m.uid for m in self.store.by_uids(batch) if "T" in m.flags and (
                uid_ranges is None or in_ranges(m.uid, uid_ranges))]
        self.store.delete_uids(doomed, s.uidvalidity,
                               s.mailbox.address if self.users is not None else None)
        return set(doomed)

    def append_message_follows(self) -> bool:
        """Whether the literal announced now is APPEND's message (not a mailbox name)."""
        try:
            arguments = parse_imap_arguments([re.sub(rb"^\S+ +\S+ ?", b"", self._pieces[0]),
                                              *self._pieces[1:]])
        except BadCommand:
            return False
        return len(arguments) >= 1

    def begin_append(self, tag: str, size: int) -> ImapReply | None:
        """APPEND's message will come: check where it goes and open a writer for it, or say
        why not (RFC 3501 section 6.3.11)."""
        if self.state not in (ImapState.AUTHENTICATED, ImapState.SELECTED):
            return tagged(tag, "BAD", "log in first")
        if size > self.max_size:
            return tagged(tag, "NO", f"[TOOBIG] at most {self.max_size} octets")
        try:
            arguments = parse_imap_arguments([re.sub(rb"^\S+ +\S+ ?", b"", self._pieces[0]),
                                              *self._pieces[1:]])
            target = self.find_mailbox(arguments[0])
        except BadCommand as problem:
            return tagged(tag, "BAD", str(problem))
        if target is None:
            return tagged(tag, "NO", "[TRYCREATE] no such mailbox")
        if target.read_only:
            return tagged(tag, "NO", "[CANNOT] a Recipients/ folder is read-only")
        # In a recipient's own INBOX the message must name that recipient, or it would not be
        # in it: it gets trace headers, as a delivery would. In the INBOX of all mail it is
        # kept byte for byte.
        envelope = Envelope("", [target.address] if target.address else [], client_name="imap",
                            peer=self.peer, protocol="IMAP")
        try:
            self._literal_writer = self.store.writer(envelope, trace=target.address is not None)
        except OSError as error:
            return tagged(tag, "NO", f"[SERVERBUG] {storage_problem(error).lines[0]}")
        return None

    def abort_append(self, pieces: list) -> None:
        for piece in pieces:
            if isinstance(piece, MaildirWriter):
                piece.abort()

    def append(self, tag: str, arguments: list) -> list:
        """The APPEND command once its message is stored: flags and date, then APPENDUID."""
        writer = arguments[-1] if arguments else None
        if not isinstance(writer, (MaildirWriter, OSError)):
            raise BadCommand("usage: APPEND mailbox [(flags)] [date-time] {size}")
        if isinstance(writer, OSError):
            return [tagged(tag, "NO", f"[SERVERBUG] {storage_problem(writer).lines[0]}")]
        flags = next((a for a in arguments[1:-1] if isinstance(a, list)), [])
        letters = "".join(IMAP_SYSTEM_FLAGS.get(str(name).lower(), "") for name in flags)
        dates = [a for a in arguments[1:-1] if not isinstance(a, list)]
        if dates:  # RFC 3501 section 6.3.11: the message's internal date is the one given
            moment = internal_date(str(dates[0]))
            if moment is None:
                writer.abort()
                raise BadCommand('the date is "dd-Mon-yyyy hh:mm:ss +zzzz"')
            self.store.maildir.rename_arriving(writer, moment)
        try:
            key = writer.commit()
        except OSError as error:
            return [tagged(tag, "NO", f"[SERVERBUG] {storage_problem(error).lines[0]}")]
        if self.transcript is not None:
            self.transcript.message(writer.size, key)
        summary = self.store.summary(key)
        if summary is not None and letters:
            summary = self.store.set_flags(key, letters) or summary
        uid = summary.uid if summary is not None else 0
        return self.updates() + [tagged(tag, "OK", f"[APPENDUID {self.store.uidvalidity} {uid}] "
                                                   "APPEND completed")]

    def connection_lost(self) -> None:
        """However the connection ended: an APPEND half received leaves nothing behind."""
        if isinstance(self._literal_writer, MaildirWriter):
            self._literal_writer.abort()
        self.abort_append(self._pieces)
        self._literal_writer, self._pieces = None, []
        self.state = ImapState.LOGOUT
        if self.idling is not None:
            self.stop_idling()


IMAP_COMMANDS = {"CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE",
                 "ENABLE", "NAMESPACE", "LIST", "LSUB", "SUBSCRIBE", "UNSUBSCRIBE", "STATUS",
                 "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "APPEND", "IDLE", "CHECK",
                 "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "UID"}


# -- 17.4 FETCH items -------------------------------------------------------------------------


@dataclass
class FetchItem:
    name: str  # FLAGS, UID, ENVELOPE, BODY[...] ... (RFC822.* become BODY sections)
    section: tuple | None = None  # (numbers, kind, fields) for BODY[...]
    section_text: str = ""  # as the client wrote it, for the reply's name
    partial: tuple[int, int] | None = None  # <start.count>
    peek: bool = True  # False: fetching it marks the message \Seen
    reply_name: str = ""

    @property
    def needs_file(self) -> bool:
        return self.name not in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE")

    @property
    def marks_seen(self) -> bool:
        return self.section is not None and not self.peek


_FETCH_SECTION = re.compile(r"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?", re.IGNORECASE)
_FETCH_MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
                 "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
                 "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}


def fetch_items(argument) -> list[FetchItem]:
    """FETCH's items (RFC 3501 section 6.4.5), one or a parenthesised list, or a macro."""
    names = argument if isinstance(argument, list) else [argument]
    if len(names) == 1 and str(names[0]).upper() in _FETCH_MACROS:
        names = _FETCH_MACROS[str(names[0]).upper()]
    items = []
    for name in names:
        if isinstance(name, (list, bytes)):
            raise BadCommand("cannot read the FETCH items")
        upper = str(name).upper()
        if upper in ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                     "BODYSTRUCTURE", "BODY", "MODSEQ"):
            items.append(FetchItem(upper))
        elif upper in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            kind = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[upper]
            items.append(FetchItem("BODY", ((), kind, ()), kind, None,
                                   peek=upper == "RFC822.HEADER", reply_name=upper))
        elif found := _FETCH_SECTION.fullmatch(str(name)):
            partial = (imap_number(found.group(3), "an offset"), imap_number(
                found.group(4), "a count")) if found.group(3) else None
            items.append(FetchItem("BODY", parse_section(found.group(2)), found.group(2).upper(),
                                   partial, peek=found.group(1).upper() == "BODY.PEEK"))
        else:
            raise BadCommand(f"{str(name)[:40]!r} is not a FETCH item")
    return items


def fetch_field(item: FetchItem, view, root: MimePart | None, summary: Summary,
                flags: str) -> list:
    """One item of a FETCH response, as bytes, or a (start, end) range of the view that the
    caller sends in pieces."""
    match item.name:
        case "UID":
            return [b"UID %d" % summary.uid]
        case "MODSEQ":  # RFC 7162 section 3.1.4.1: positive, so at least 1
            return [b"MODSEQ (%d)" % max(summary.modseq, 1)]
        case "FLAGS":
            return [f"FLAGS ({flags})".encode()]
        case "INTERNALDATE":
            return [b"INTERNALDATE " + imap_string(imap_date(summary.time))]
        case "RFC822.SIZE":
            return [b"RFC822.SIZE %d" % summary.crlf_size]
        case "ENVELOPE":
            return [b"ENVELOPE " + envelope_of(root)]
        case "BODYSTRUCTURE" | "BODY" if item.section is None:
            return [item.name.encode() + b" " + body_structure(view, root,
                                                               item.name == "BODYSTRUCTURE")]
    numbers, kind, fields = item.section
    if not numbers and not kind:
        data = (0, len(view))  # the whole message: sent in pieces
    else:
        data = section_bytes(view, root, numbers, kind, fields)
    name = item.reply_name or f"BODY[{item.section_text}]"
    if data is None:
        return [name.encode() + b" NIL"]
    if item.partial is not None:
        start, count = item.partial
        if isinstance(data, tuple):
            data = (min(data[0] + start, data[1]), min(data[0] + start + count, data[1]))
        else:
            data = data[start:start + count]
        name += f"<{start}>"
    length = data[1] - data[0] if isinstance(data, tuple) else len(data)
    header = name.encode() + b" {%d}\r\n" % length
    return [header + data] if isinstance(data, bytes) else [header, data]


# ---------------------------------------------------------------------------------------------
# 18. The CLI
#
# main() reads the options once into a Config, starts a Server and waits for Ctrl-C or
# SIGTERM; "sendmail" and "check" are its two other commands.
# ---------------------------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """--help that gives each option's default where it has one: not for a flag (off unless
    given) or an option without one, nor where the help says it in words already."""

    def _get_help_string(self, action) -> str:
        text, default = action.help or "", action.default
        if (default is None or isinstance(default, bool) or default == [] or "default" in text
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    usage_error_status = 2

    def error(self, message: str):
        """One line, then exit 2, rather than argparse's usage block."""
        self.exit(self.usage_error_status, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {text}")
    return port


def cpu_choice(text: str) -> str:
    if text not in ("auto", "all") and not text.isdigit():
        raise argparse.ArgumentTypeError(f"--cpu takes auto, all or a CPU number, not {text}")
    return text


def pin_to_one_cpu(choice: str) -> int | None:
    """Keep the whole process on one CPU; return which, or None if it was left free.

    With a GIL, only one thread runs Python at a time. When the threads are spread over several
    CPUs, each hand-over of the GIL wakes a thread on another CPU, and that costs more than the
    work itself: on 2 CPUs, sheesh handled 2-3x more messages a second on one (README,
    Performance). A free-threaded Python has no GIL to hand over, so "auto" leaves it free.
    """
    if choice == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if choice == "auto":
        has_gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        if not has_gil or len(allowed) < 2:
            return None
        # CPU 0 tends to take more of the machine's interrupts: left out if there are 3 or more.
        cpu = claim_a_cpu(allowed[1:] if len(allowed) > 2 else allowed)
    else:
        cpu = int(choice)
    os.sched_setaffinity(0, {cpu})
    return cpu


_CPU_CLAIMS: list[socket.socket] = []  # held while the process lives


def claim_a_cpu(choices: list[int]) -> int:
    """A CPU that no other sheesh on this machine runs on, if there is one, so that two sinks
    do not share one core. Each running sheesh holds an abstract Unix socket named for its
    CPU (Linux's, as is CPU pinning): no file, and gone when the process ends, however it
    ends. The search starts at the process id, so that when all are taken they still spread.
    SHEESH_CPU_CLAIMS names another set of claims, apart from every other sheesh's: a test
    suite's sheesh then spread among themselves whatever sinks run beside them."""
    namespace = os.environ.get("SHEESH_CPU_CLAIMS", "sheesh")
    start = os.getpid() % len(choices)
    for offset in range(len(choices)):
        cpu = choices[(start + offset) % len(choices)]
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0{namespace}-cpu-{cpu}")
        except OSError:  # another sheesh runs there
            claim.close()
            continue
        _CPU_CLAIMS.append(claim)
        return cpu
    return choices[start]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sheesh", description="A one-file SMTP server that stores every message it is sent "
        "in a Maildir.", formatter_class=HelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (loopback unless you mean otherwise)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="SMTP port; 0 picks a free one")
    parser.add_argument("--maildir", default=DEFAULT_MAILDIR,
                        help="Maildir to store messages in (created if missing)")
    parser.add_argument("--hostname", default=socket.gethostname(),
                        help="name used in the greeting and the Received header")
    parser.add_argument("--max-size", type=positive(int), default=DEFAULT_MAX_SIZE,
                        help="largest message accepted, in bytes (advertised as SIZE)")
    parser.add_argument("--max-recipients", type=positive(int), default=DEFAULT_MAX_RECIPIENTS,
                        help="most recipients in one message")
    parser.add_argument("--max-connections", type=positive(int),
                        default=DEFAULT_MAX_CONNECTIONS, help="most connections at once")
    parser.add_argument("--max-connections-per-ip", type=positive(int),
                        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
                        help="most connections at once from one client address, on all ports "
                        "(loopback clients are not held to it)")
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT,
                        help="seconds a client may stay silent, or take over one command")
    parser.add_argument("--grace", type=positive(float), default=SHUTDOWN_GRACE,
                        help="on SIGTERM or Ctrl-C, seconds that messages already in DATA get "
                        "to finish")
    parser.add_argument("--no-fsync", dest="fsync", action="store_false",
                        help="do not wait for the disk before acknowledging a message (faster, "
                        "but a crash may lose acknowledged mail)")
    parser.add_argument("--cpu", default="auto", type=cpu_choice,
                        help="'auto' runs sheesh on one CPU when Python has a GIL and there are "
                        "several (2-3x faster under load: see README), one that no other sheesh "
                        "runs on if there is one; 'all' on every CPU; a number on that CPU "
                        "(Linux only; elsewhere every CPU)")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    parser.add_argument("--print", dest="print_messages", action="store_true",
                        help="also print each message, with its envelope, to standard output")
    add_store_options(parser)
    parser.add_argument("--version", action="version", version=f"sheesh {__version__}")
    add_web_options(parser.add_argument_group("the web inbox (see README, The web inbox)"))
    add_fault_options(parser.add_argument_group("failing on purpose (see README, Fault "
                                                "injection)"))
    add_pop3_options(parser.add_argument_group("POP3 (see README, POP3)"))
    add_imap_options(parser.add_argument_group("IMAP (see README, IMAP)"))
    add_relay_options(parser.add_argument_group("forwarding (see README, Forwarding and "
                                                "Webhooks)"))
    add_tls_options(parser.add_argument_group("TLS and authentication"))
    return parser


def add_web_options(parser) -> None:
    parser.add_argument("--http-port", type=port_number, metavar="PORT",
                        help=f"port of the web inbox and JSON API (default: "
                        f"{DEFAULT_HTTP_PORT}, the port Mailpit uses; with --port 0, a free "
                        f"one too)")
    parser.add_argument("--no-http", action="store_true", help="no web inbox")
    parser.add_argument("--http-host", metavar="ADDRESS",
                        help="address of the web inbox (default: --host's)")
    parser.add_argument("--http-users", metavar="FILE", type=read_users,
                        help="user:password lines for the web inbox and API (HTTP Basic); "
                        "without it, those of --users, if given, else none asked")
    parser.add_argument("--http-allowed-host", dest="http_allowed_hosts", metavar="NAME",
                        action="append", default=[],
                        help="a Host name the web inbox answers (repeatable; IP addresses, "
                        "localhost and --hostname always are): a reverse proxy's name, or a "
                        "container's")


def add_store_options(parser) -> None:
    parser.add_argument("--max-messages", type=positive(int), metavar="N",
                        help="keep at most N messages: the oldest are removed as new ones "
                        "arrive (default: keep all)")
    parser.add_argument("--max-age", type=duration, metavar="DURATION",
                        help="remove messages older than this: 7d, 12h, 30m or seconds "
                        "(default: keep all)")
    parser.add_argument("--max-sessions", type=positive(int), metavar="N",
                        default=DEFAULT_MAX_SESSIONS,
                        help="session transcripts kept, the newest (see README, Sessions)")


def add_fault_options(failing) -> None:
    failing.add_argument("--fail", dest="faults", metavar="RULE", action="append",
                         default=[],
                         help="inject a failure: " + FAULT_SYNTAX.replace("%", "%%"))
    failing.add_argument("--fail-seed", type=int, metavar="N",
                         help="seed for the chances in --fail rules, to replay a run")


def add_pop3_options(pop3) -> None:
    pop3.add_argument("--pop3-port", type=port_number, metavar="PORT",
                      help="also serve the Maildir over POP3 here (Mailpit uses 1110)")
    pop3.add_argument("--pop3s-port", type=port_number, metavar="PORT",
                      help="and over POP3 with TLS from the first byte (needs a certificate)")


def add_imap_options(imap) -> None:
    imap.add_argument("--imap-port", type=port_number, metavar="PORT",
                      help="also serve the mail over IMAP here (1143 is a good choice)")
    imap.add_argument("--imaps-port", type=port_number, metavar="PORT",
                      help="and over IMAP with TLS from the first byte (needs a certificate)")


def add_relay_options(relay) -> None:
    relay.add_argument("--relay", metavar="HOST:PORT",
                       help="a real SMTP server to release messages to")
    relay.add_argument("--relay-user", help="user name to log in to it with")
    relay.add_argument("--relay-password", help="its password; better, set the environment "
                       "variable SHEESH_RELAY_PASSWORD, which the shell's history does not keep")
    relay.add_argument("--relay-tls", choices=("auto", "starttls", "tls", "none"),
                       default="auto", help="how to talk to it: 'auto' uses STARTTLS when it "
                       "is offered and plain SMTP when not (but sends no password in plain "
                       "text beyond loopback); 'starttls' requires it; 'tls' from the first "
                       "byte (port 465); 'none' plain")
    relay.add_argument("--relay-insecure", action="store_true",
                       help="use TLS without checking the certificate (a self-signed upstream)")
    automatic = relay.add_mutually_exclusive_group()
    automatic.add_argument("--relay-all", action="store_true",
                           help="relay every message to its recipients as it arrives")
    automatic.add_argument("--relay-match", metavar="REGEX",
                           help="relay as they arrive, but only to recipients matching REGEX")
    relay.add_argument("--webhook", dest="webhooks", metavar="URL", action="append",
                       type=web_address, default=[],
                       help="POST each stored message's summary as JSON to URL (repeatable)")
    relay.add_argument("--webhook-secret", metavar="SECRET",
                       help="sign the webhooks' bodies with HMAC-SHA256 (header "
                       "X-Sheesh-Signature); better, set SHEESH_WEBHOOK_SECRET")


def add_tls_options(secure) -> None:
    secure.add_argument("--tls-cert", metavar="FILE", help="certificate (PEM) for STARTTLS and "
                        "--smtps-port")
    secure.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    secure.add_argument("--tls-self-signed", action="store_true",
                        help="make a throwaway self-signed certificate at start-up (needs the "
                        "openssl command)")
    secure.add_argument("--smtps-port", type=port_number, metavar="PORT",
                        help="also listen here for TLS from the first byte (port 465 style)")
    secure.add_argument("--tls-required", action="store_true",
                        help="refuse AUTH and MAIL until the client has started TLS")
    secure.add_argument("--auth-required", action="store_true",
                        help="refuse MAIL until the client has authenticated")
    secure.add_argument("--users", metavar="FILE", type=read_users,
                        help="check AUTH against lines of user:password; without it, any "
                        "user name and password are accepted")


def duration(text: str) -> float:
    """7d, 12h, 30m, 45s, or a number of seconds."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms]?)", text.strip())
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 7d, 12h or 30m, not {text}")
    return float(found.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[found.group(2)]


def web_address(text: str) -> str:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, not {text}")
    return text


def read_users(path: str) -> dict[str, str]:
    """A users file: one user:password per line; blank lines and lines starting with # skipped."""
    users = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise argparse.ArgumentTypeError(f"{path} line {number} is not user:password")
        users[user] = password
    return users


def check_tls_options(options: dict) -> str | None:
    """What is wrong with the TLS options together, if anything."""
    if bool(options["tls_cert"]) != bool(options["tls_key"]):
        return "--tls-cert and --tls-key go together"
    if options["tls_cert"] and options["tls_self_signed"]:
        return "choose --tls-cert or --tls-self-signed, not both"
    if options["tls_cert"] or options["tls_self_signed"]:
        return None
    for option, given in (("--smtps-port", options["smtps_port"] is not None),
                          ("--pop3s-port", options["pop3s_port"] is not None),
                          ("--imaps-port", options["imaps_port"] is not None),
                          ("--tls-required", options["tls_required"])):
        if given:
            return f"{option} needs --tls-cert and --tls-key, or --tls-self-signed"
    return None


# Run as `python3 sheesh.py`, CPython keeps the parse tree of the script until the script ends:
# 19 MB of this file's, for the whole life of the server. Imported, the file keeps only its
# compiled code. So the server starts itself again as a module: the same process (exec keeps
# the process id, the terminal and the open files), with -B so that no __pycache__ appears
# beside the file. Windows has no exec that keeps the process, so there it runs as it is.
RELAUNCH_AS_MODULE = (
    "import importlib.util, sys; sys.argv = sys.argv[1:]; "
    "spec = importlib.util.spec_from_file_location('sheesh', sys.argv[0]); "
    "module = importlib.util.module_from_spec(spec); sys.modules['sheesh'] = module; "
    "spec.loader.exec_module(module); sys.exit(module.main())")


def relaunch_as_module() -> None:
    """Exec the server again as an imported module (above); returns only where it cannot."""
    if os.name != "posix" or not sys.executable or sys.argv[1:2] in (["check"], ["sendmail"]):
        return  # the two commands are short-lived: their parse tree does not matter
    flags = ["-O"] * sys.flags.optimize + [f"-W{option}" for option in sys.warnoptions]
    flags += [f"-X{name}" if value is True else f"-X{name}={value}"
              for name, value in sys._xoptions.items()]
    script = os.path.abspath(sys.argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *flags, "-B", "-c", RELAUNCH_AS_MODULE, script,
                              *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        return sendmail_main(argv[1:])
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    if problem := check_tls_options(options):
        parser.error(problem)
    if (options["relay_all"] or options["relay_match"]) and not options["relay"]:
        parser.error("--relay-all and --relay-match need --relay HOST:PORT")
    quiet, cpu_choice = options.pop("quiet"), options.pop("cpu")
    stop_signals = StopSignals()  # a Ctrl-C while starting stops as cleanly as later
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    try:
        server = Server(Config(**config_options(options)))
    except ValueError as error:  # what Config read and found wrong: a rule, an address...
        parser.error(str(error))
    try:
        cpu = pin_to_one_cpu(cpu_choice)
    except (OSError, ValueError) as error:
        return fail(f"cannot run on CPU {cpu_choice}: {getattr(error, 'strerror', None) or error}")
    try:
        server.start()
    except CannotStart as error:  # it says which step failed, and why
        return fail(error.strerror)
    announce(server, cpu)
    return serve_until_stopped(server, stop_signals)


def config_options(options: dict) -> dict:
    """The parsed options as Config takes them."""
    if options.pop("no_http"):
        options["http_port"] = None
    elif options["http_port"] is None:  # a test harness that asks for any SMTP port runs
        options["http_port"] = 0 if options["port"] == 0 else DEFAULT_HTTP_PORT  # two at once
    for name in ("faults", "http_allowed_hosts", "webhooks"):
        options[name] = tuple(options[name])
    for secret, variable in (("relay_password", "SHEESH_RELAY_PASSWORD"),
                             ("webhook_secret", "SHEESH_WEBHOOK_SECRET")):
        if options[secret] is None:  # from the environment: never shown by --help or ps
            options[secret] = os.environ.get(variable)
    return options


def announce(server: Server, cpu: int | None) -> None:
    """Where everything is, as warnings, so that it shows even with --quiet."""
    smtps = "".join(f" ({name.upper()} on port {port})" for name, port in server.ports.items()
                    if name != "smtp")
    log.warning("sheesh %s listening on %s port %d%s, storing mail in %s%s", __version__,
                server.host, server.port, smtps, server.store.path,
                "" if cpu is None else f", running on CPU {cpu}")
    if server.web_url:
        log.warning("web inbox and API at %s", server.web_url)
    for rule in server.faults.rules:
        log.warning("failing on purpose: %s", escape_for_log(rule.text))
    if server.relay is not None:
        which = ("every message" if server.config.relay_all else
                 f"recipients matching {server.config.relay_match}"
                 if server.config.relay_match else "messages released through the API")
        log.warning("relaying %s to %s", which, server.config.relay)
        threading.Thread(target=check_relay, args=(server.relay,), name="sheesh-relay-check",
                         daemon=True).start()
    for url in server.config.webhooks:
        log.warning("posting each stored message to %s%s", escape_for_log(url_without_password(url)),
                    ", signed" if server.config.webhook_secret else "")
    if not is_loopback(server.host):
        log.warning("warning: %s is not a loopback address: anyone who can reach it can "
                    "send mail here", server.host)
    policy = server.web_policy()
    if server.web is not None and policy.exposed and policy.users is None:
        log.warning("WARNING: the web inbox listens on %s, beyond loopback, without --users or "
                    "--http-users: anyone who can reach it can read and delete the mail. "
                    "Releasing mail and changing fault rules are refused but from loopback. "
                    "Give it --http-users FILE, or keep it on loopback with --http-host "
                    "127.0.0.1.", server.web_host)


def check_relay(relay: Relay) -> None:
    """One connection to the upstream at start-up, so that a wrong setting shows now rather
    than at the first message; a warning if it fails, never a reason not to start."""
    works, how = relay.check()
    if works:
        log.info("relay checked: %s", escape_for_log(how))
    else:
        log.warning("relay check failed, messages will not be relayed as things are: %s",
                    escape_for_log(how))


def check_main(argv: list[str]) -> int:
    """python3 sheesh.py check [--smtputf8] [--sender ADDRESS] FILE.eml... (or - for stdin)

    Says what real mail servers will object to in messages on disk, as the web inbox's
    Checks tab does for the mail sheesh caught (see README, Message checks). Exit status: 1 if
    any finding is an error, 2 if a file cannot be read, else 0: an app's e-mail templates can
    be checked in its CI, without a server.
    """
    parser = ArgumentParser(prog="sheesh check", description=check_main.__doc__.split(
        "\n\n")[1].strip(), formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help="a message, or - for stdin")
    parser.add_argument("--smtputf8", action="store_true",
                        help="it will be sent with SMTPUTF8 (UTF-8 headers are then fine)")
    parser.add_argument("--sender", default="", metavar="ADDRESS",
                        help="the envelope sender it will be sent from (checks alignment)")
    options = parser.parse_args(argv)
    status = 0
    for name in options.files:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as error:
            print(f"sheesh check: cannot read {name}: {error.strerror or error}",
                  file=sys.stderr)
            status = 2
            continue
        if b"\r\n" not in raw:  # a file saved with Unix line endings: sent as CRLF, as
            raw = raw.replace(b"\n", b"\r\n")  # sendmail and mail libraries send it
        findings = check_message(raw, Envelope(options.sender, [], smtputf8=options.smtputf8))
        counts = check_counts(findings)
        print(f"{name}: {counts['error']} error{'s' * (counts['error'] != 1)}, "
              f"{counts['warning']} warning{'s' * (counts['warning'] != 1)}, "
              f"{counts['info']} info")
        for finding in findings:
            print(f"  {finding.severity:7} {finding.id:30} {finding.where}: {finding.text} "
                  f"({finding.reference})")
        if counts["error"] and status == 0:
            status = 1
    return status


def fail(message: str) -> int:
    print(f"sheesh: error: {message}", file=sys.stderr)
    return 2


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8, ::1, or ::ffff:127.x (an IPv4 peer on an IPv6 socket)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or mapped is not None and mapped.is_loopback


class StopSignals:
    """From the moment it is made, Ctrl-C and SIGTERM only ask sheesh to stop: nothing is
    raised in the middle of whatever runs (starting, or stopping after a first Ctrl-C).
    Python's own handler writes a byte to a socket (signal.set_wakeup_fd), which wait()
    sees. A handler that set an Event could hang: it runs in the main thread, which may
    be inside that Event's lock, waiting."""

    def __init__(self) -> None:
        self._woken, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        signal.set_wakeup_fd(self._waker.fileno())
        # SIGINT too: a shell starts background jobs with Ctrl-C ignored, and Python keeps it.
        # Windows has no SIGTERM to catch.
        self._stops = {getattr(signal, name) for name in ("SIGINT", "SIGTERM")
                       if hasattr(signal, name)}
        for number in self._stops:
            signal.signal(number, self._noted)

    def _noted(self, signum, frame) -> None:
        pass  # the byte on the socket is the message

    def wait(self) -> None:
        """Until a stop signal has come (at once if one came already). The socket has a
        byte for every signal Python handles: only these two stop sheesh."""
        while not self._stops.intersection(self._woken.recv(64)):
            pass


def serve_until_stopped(server: Server, stop_signals: StopSignals) -> int:
    """Wait until asked to stop, then stop cleanly and return 0."""
    stop_signals.wait()
    arriving = server.messages_arriving
    if arriving:
        log.warning("stopping: %d message%s in DATA get%s %g seconds to finish", arriving,
                    "s" * (arriving > 1), "s" * (arriving == 1), server.config.grace)
    else:
        log.warning("stopping")  # nothing under way: at once
    server.stop()
    return 0


# ---------------------------------------------------------------------------------------------
# 19. Where the speed comes from
#
# Measured with the benchmark kit beside the project (see the README's Performance section),
# each kept only when it paid:
#   - One CPU. With a GIL, threads on two CPUs hand the GIL between CPUs at every system call;
#     pinned to one (--cpu auto), persistent load went from 3,406 to 6,048 messages a second.
#   - Reads of 64 KiB (READ_SIZE): rfile.read1(n) allocates n bytes before it shrinks to what
#     came; at 256 KiB that cost 40% of the persistent throughput.
#   - Bytes work in C: DataReader finds the terminator and un-stuffs dots with bytes.find() and
#     bytes.replace() over whole buffers, never line by line: 306 MB/s for one big message.
#   - Idle connections wait in poll(), not in read1() (which allocates its result before it
#     blocks), and keep a 1-byte rfile buffer: 22 KB a connection, not 26.
#   - Few system calls per message: the replies of a batch in one write with TCP_NODELAY; the
#     file written through a raw descriptor, the trace headers with the first bytes; new/
#     held open for its fsync.
#   - Nothing on the delivery path that can wait: the index, the checks, transcripts, relaying
#     and webhooks are done by other threads, when deliveries pause.
# ---------------------------------------------------------------------------------------------


# =============================================================================================
# PART III. DATA
#
# The web inbox's page: one self-contained file of HTML, CSS and JavaScript, sent as it is.
# =============================================================================================


# ---------------------------------------------------------------------------------------------
# 20. The page
# ---------------------------------------------------------------------------------------------

INBOX_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sheesh</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<style>
:root{--bg:#fff;--fg:#1d2330;--muted:#6b7385;--line:#e3e6ee;--panel:#f6f7fa;--accent:#2f6fed;
 --accent-fg:#fff;--hover:#eef3fe;--selected:#dbe6fd;--warn:#fff6d6;--bad:#c62f2f;--good:#1f8a4c;
 --code:#f3f4f7}


@media (prefers-color-scheme:dark){:root{--bg:#15181e;--fg:#e3e6ec;--muted:#9aa2b1;
 --line:#2a2f39;--panel:#1c2028;--accent:#6d9bff;--accent-fg:#0b0e13;--hover:#222834;
 --selected:#2a3550;--warn:#3a3320;--bad:#ff7b7b;--good:#5fd08f;--code:#1f242d}}
*{box-sizing:border-box}
html,body{height:100%}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
 background:var(--bg);display:flex;flex-direction:column}
a{color:var(--accent)}
button,select,input{font:inherit;color:inherit}
button{background:var(--panel);border:1px solid var(--line);border-radius:6px;padding:4px 10px;
 cursor:pointer}
button:hover{border-color:var(--accent)}
button.primary{background:var(--accent);color:var(--accent-fg);border-color:var(--accent)}
button:disabled{opacity:.45;cursor:default}
header{display:flex;align-items:center;gap:8px;padding:8px 12px;border-bottom:1px solid var(--line);
 background:var(--panel);flex-wrap:wrap}
#home{font-weight:700;font-size:16px;text-decoration:none;color:var(--fg)}
#counts{color:var(--muted);font-size:12px}
#search{flex:1;min-width:140px;padding:5px 8px;border:1px solid var(--line);border-radius:6px;
 background:var(--bg)}
#mailbox{max-width:220px;padding:4px;border:1px solid var(--line);border-radius:6px;
 background:var(--bg)}
nav{display:flex;gap:6px;align-items:center}
nav a{padding:4px 8px;border-radius:6px;text-decoration:none}
nav a.on{background:var(--selected)}
#panes{flex:1;display:flex;min-height:0}
#list{width:40%;max-width:520px;border-right:1px solid var(--line);display:flex;
 flex-direction:column;min-width:0}
#rows{overflow:auto;flex:1}
.row{display:block;padding:8px 12px;border-bottom:1px solid var(--line);color:inherit;
 text-decoration:none;border-left:3px solid transparent}
.row:hover{background:var(--hover)}
.row.selected{background:var(--selected)}
.row.open{border-left-color:var(--accent)}
.row.unread .subject{font-weight:700}
.line{display:flex;gap:8px;justify-content:space-between;min-width:0}
.line>*{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;min-width:0}
.line>time,.line>.aside{flex:none;color:var(--muted);font-size:12px}
.small{color:var(--muted);font-size:12px}
.badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:11px;border:1px solid}
.badge.stored{color:var(--good)}.badge.refused,.badge.error{color:var(--bad)}
.badge.none,.badge.info{color:var(--muted)}.badge.warning{color:#b7791f}
.badge.keyword{margin-left:6px;font-weight:400}
.checks ul{list-style:none;padding:0;margin:0}
.checks li{padding:8px 0;border-bottom:1px solid var(--line)}
#pager{padding:6px 12px;border-top:1px solid var(--line);display:flex;align-items:center;
 justify-content:space-between;gap:8px}
#view{flex:1;overflow:auto;padding:14px 18px;min-width:0}
#view h1{font-size:20px;margin:0 0 10px;overflow-wrap:anywhere}
dl.fields{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0 0 10px}
dl.fields dt{color:var(--muted)}
dl.fields dd{margin:0;overflow-wrap:anywhere}
.attachments{display:flex;flex-wrap:wrap;gap:6px;margin:0 0 10px;padding:0;list-style:none}
.attachments li{max-width:100%}
.attachments a{display:inline-block;padding:4px 8px;border:1px solid var(--line);
 border-radius:6px;text-decoration:none;max-width:100%;overflow:hidden;text-overflow:ellipsis;
 white-space:nowrap}
.actions,.tabs{display:flex;gap:6px;flex-wrap:wrap}
.toolbar{display:flex;gap:6px;justify-content:space-between;flex-wrap:wrap;margin:0 0 10px}
button.quiet{border:0;background:none;color:var(--accent);padding:2px 0;font-size:12px}
.tabs button.on{background:var(--selected);border-color:var(--accent)}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--code);padding:10px;
 border-radius:6px;margin:0}
iframe{width:100%;border:1px solid var(--line);border-radius:6px;background:#fff;
 min-height:120px;display:block}
.empty{color:var(--muted);padding:20px}
.note{margin:0;padding:6px 12px;background:var(--warn);font-size:12px}
.back{display:none}
table.transcript{border-collapse:collapse;width:100%;font:12px/1.4 ui-monospace,Menlo,Consolas,
 monospace}
table.transcript td{padding:1px 6px;vertical-align:top;overflow-wrap:anywhere}
table.transcript td:first-child{color:var(--muted);white-space:nowrap;text-align:right}
table.transcript td:nth-child(2){white-space:nowrap;overflow-wrap:normal}
#notice{margin:0;padding:6px 12px;font-size:13px;background:var(--warn);color:var(--bad)}
#notice[hidden]{display:none}
tr.client td:nth-child(2){color:var(--accent)}
tr.sheesh td{color:var(--muted);font-style:italic}
#help{position:fixed;inset:0;background:rgba(0,0,0,.45);display:flex;align-items:center;
 justify-content:center}
#help[hidden]{display:none}
#help>div{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:16px 20px;
 max-width:90vw}
kbd{border:1px solid var(--line);border-radius:4px;padding:0 5px;background:var(--panel);
 font:12px ui-monospace,monospace}


@media (max-width:760px){
 #list{width:100%;max-width:none;border-right:0}
 body.reading #list{display:none}
 body:not(.reading) #view{display:none}
 .back{display:inline-block}
 #search{order:5;flex-basis:100%}
 #mailbox{max-width:50%}
 .tabs{flex-wrap:nowrap;overflow-x:auto}
 .tabs button{padding:4px 7px;white-space:nowrap}
}
</style></head>
<body>
<header>
  <a id="home" href="#/">sheesh</a><span id="counts"></span>
  <input id="search" type="search" aria-label="Search"
   placeholder="Search  (/)" title="words, from:, to:, subject:, is:unread, has:attachment">
  <select id="mailbox" aria-label="Mailbox"><option value="">All mail</option></select>
  <nav><a id="to-inbox" href="#/">Inbox</a><a id="to-sessions" href="#/sessions">Sessions</a>
  <button id="help-button" title="Keyboard shortcuts (?)">?</button></nav>
</header>
<p id="notice" role="alert" hidden></p>
<div id="panes">
  <section id="list" aria-label="List">
    <p id="indexing" class="note" hidden></p>
    <div id="rows"><p class="empty">Loading...</p></div>
    <div id="pager"><button id="newer">Newer</button><span id="range" class="small"></span>
    <button id="older">Older</button></div>
  </section>
  <main id="view"><p class="empty">Mail sent to sheesh shows up here as it arrives.</p></main>
</div>
<div id="help" hidden role="dialog" aria-label="Keyboard shortcuts"><div>
  <h2>Keyboard shortcuts</h2>
  <dl class="fields">
    <dt><kbd>j</kbd> <kbd>&#8595;</kbd></dt><dd>next in the list</dd>
    <dt><kbd>k</kbd> <kbd>&#8593;</kbd></dt><dd>previous in the list</dd>
    <dt><kbd>Enter</kbd></dt><dd>open it</dd>
    <dt><kbd>Delete</kbd></dt><dd>delete the open (or chosen) message</dd>
    <dt><kbd>/</kbd></dt><dd>search</dd>
    <dt><kbd>Esc</kbd></dt><dd>back to the list; close this</dd>
    <dt><kbd>?</kbd></dt><dd>this help</dd>
  </dl>
  <p><button id="help-close">Close</button></p></div></div>
<script nonce="{nonce}">
"use strict";
// Every value that comes from a message goes into the page as text (textContent), never as
// HTML. The address says what is shown: #/ (with ?q= and ?mailbox=), #/messages/ID,
// #/sessions and #/sessions/ID, so a message has a link and the back button works.
const PAGE = 50;
const state = {view: "inbox", id: null, query: "", mailbox: "", offset: 0, items: [],
               chosen: -1, total: 0};
const $ = (selector) => document.querySelector(selector);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined)
                         .map((c) => c instanceof Node ? c : String(c)));
  return node;
}

// What went wrong with something the user did, said on the page until the next action.
function tell(text) {
  $("#notice").textContent = text;
  $("#notice").hidden = !text;
}

async function attempt(what, action) {
  tell("");
  try {
    return await action();
  } catch (error) {
    tell(`${what} failed: ${error.message}`);
    return undefined;
  }
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let reason = response.statusText;
    try { reason = (await response.json()).error || reason; } catch (ignored) {}
    throw new Error(reason);
  }
  return response.json();
}

const exact = (seconds) => new Date(seconds * 1000).toLocaleString();
function ago(seconds) {
  const gone = Date.now() / 1000 - seconds;
  if (gone < 45) return "just now";
  for (const [size, name] of [[86400 * 365, "year"], [86400 * 30, "month"], [86400, "day"],
                              [3600, "hour"], [60, "minute"]]) {
    const count = Math.round(gone / size);
    if (count >= 1 && gone >= size * 0.9) return `${count} ${name}${count > 1 ? "s" : ""} ago`;
  }
  return "a minute ago";
}
const time = (seconds) => el("time", {"title": exact(seconds),
  "datetime": new Date(seconds * 1000).toISOString()}, ago(seconds));

function bytes(size) {
  if (size < 1024) return `${size} B`;
  const units = ["KB", "MB", "GB"];
  let value = size / 1024, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

// -- the address

function link(path, withFilters = true) {
  const params = new URLSearchParams();
  if (withFilters && state.query) params.set("q", state.query);
  if (withFilters && state.mailbox) params.set("mailbox", state.mailbox);
  const search = params.toString();
  return "#" + path + (search ? "?" + search : "");
}
const messageLink = (id) => link("/messages/" + encodeURIComponent(id));
const sessionLink = (id) => link("/sessions/" + id, false);

function readAddress() {
  const [path, search] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(search || "");
  const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
  const sessions = parts[0] === "sessions";
  const filters = [params.get("q") || "", params.get("mailbox") || ""];
  if (!sessions && (filters[0] !== state.query || filters[1] !== state.mailbox)) {
    state.offset = 0;
  }
  [state.query, state.mailbox] = sessions ? ["", ""] : filters;
  state.view = sessions ? "sessions" : "inbox";
  state.id = parts[1] || null;
}

async function show() {
  readAddress();
  document.body.classList.toggle("reading", state.id !== null);
  $("#to-inbox").classList.toggle("on", state.view === "inbox");
  $("#to-sessions").classList.toggle("on", state.view === "sessions");
  if ($("#search").value !== state.query) $("#search").value = state.query;
  $("#search").disabled = $("#mailbox").disabled = state.view === "sessions";
  await loadList();
  if (state.id === null) {
    $("#view").replaceChildren(el("p", {"class": "empty"}, state.view === "sessions"
      ? "Every SMTP, POP3 and IMAP conversation is kept here: choose one."
      : "Mail sent to sheesh shows up here as it arrives."));
    setTitle(null);
  } else if (state.view === "sessions") {
    await showSession(state.id);
  } else {
    await showMessage(state.id);
  }
}

function setTitle(subject) {
  const unread = state.unread ? `(${state.unread}) ` : "";
  document.title = subject === null ? unread + "sheesh" : `${subject} - sheesh`;
}

// -- the list

async function loadList() {
  try {
    if (state.view === "sessions") await loadSessions(); else await loadMessages();
  } catch (error) {  // a search that does not parse: say why
    $("#rows").replaceChildren(el("p", {"class": "empty"}, error.message));
    return;
  }
  const rows = [...$("#rows").querySelectorAll(".row")];
  state.chosen = Math.min(state.chosen, rows.length - 1);
  rows.forEach((row, n) => {
    row.classList.toggle("open", row.dataset.id === state.id);
    row.classList.toggle("selected", n === state.chosen);
  });
  $("#range").textContent = state.total ? `${state.offset + 1}-${state.offset + rows.length} ` +
                                          `of ${state.total}` : "";
  $("#newer").disabled = state.offset === 0;
  $("#older").disabled = state.offset + PAGE >= state.total;
}

async function loadMessages() {
  const data = await api(`/api/messages?limit=${PAGE}&offset=${state.offset}` +
    `&query=${encodeURIComponent(state.query)}&mailbox=${encodeURIComponent(state.mailbox)}`);
  state.total = data.total;
  state.unread = data.unread;
  const indexing = data.indexing;
  $("#indexing").hidden = !indexing;
  $("#indexing").textContent = indexing ? `Indexing the Maildir: ${indexing.done} of ` +
    `${indexing.total === null ? "?" : indexing.total} messages so far.` : "";
  if (indexing) setTimeout(soon, 1000);
  $("#counts").textContent = `${data.total} messages` + (data.unread ? `, ${data.unread} unread`
                                                                     : "");
  loadMailboxes().catch(() => {});
  const rows = data.messages.map((m) => el("a", {
      "class": "row" + (m.seen ? "" : " unread"), "href": messageLink(m.id), "data-id": m.id},
    el("div", {"class": "line"}, el("span", {}, m.from || "<" + m.sender + ">"), time(m.time)),
    el("div", {"class": "line"}, el("span", {"class": "subject"}, m.subject || "(no subject)",
       ...m.keywords.map((word) => el("span", {"class": "badge info keyword",
                                              "title": "an IMAP keyword"}, word)))),
    el("div", {"class": "line small"}, el("span", {}, "to " + m.recipients.join(", ")),
       el("span", {"class": "aside"},
          m.checks && m.checks.error ? el("span", {"class": "badge error", "title":
            "what real servers will refuse or break: see the message's Checks"},
            `${m.checks.error} error${m.checks.error > 1 ? "s" : ""}`) : null,
          m.checks && m.checks.error ? " " : null,
          (m.attachments ? `${m.attachments} attached, ` : "") + bytes(m.size)))));
  $("#rows").replaceChildren(...(rows.length ? rows : [el("p", {"class": "empty"},
    state.query || state.mailbox ? "Nothing matches." : "No mail yet.")]));
  if (state.id === null) setTitle(null);
}

async function loadMailboxes() {
  const data = await api("/api/mailboxes");
  const options = data.mailboxes.map((box) => el("option", {"value": box.address},
    `${box.address} (${box.unread ? box.unread + "/" : ""}${box.total})`));
  $("#mailbox").replaceChildren(el("option", {"value": ""}, "All mail"), ...options);
  $("#mailbox").value = state.mailbox;
}

async function loadSessions() {
  const data = await api(`/api/sessions?limit=${PAGE}&offset=${state.offset}`);
  state.total = data.total;
  const rows = data.sessions.map((s) => el("a", {"class": "row", "href": sessionLink(s.id),
                                                  "data-id": String(s.id)},
    el("div", {"class": "line"}, el("span", {}, `${s.protocol} from ${s.peer}`),
       time(s.started)),
    el("div", {"class": "line"}, el("span", {},
       el("span", {"class": "badge " + s.outcome}, s.open ? "open" : s.outcome), " ",
       s.error || (s.messages ? `${s.messages} stored` : "nothing stored")),
       el("span", {"class": "aside"}, [s.user, s.tls ? "TLS" : null].filter(Boolean)
                                                                      .join(", ")))));
  $("#rows").replaceChildren(...(rows.length ? rows : [el("p", {"class": "empty"},
    "No sessions yet.")]));
  $("#counts").textContent = `${data.total} sessions`;
}

// -- a message

function field(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  list.append(el("dt", {}, name), el("dd", {}, value));
}

async function showMessage(id) {
  let m;
  try {
    m = await api(`/api/messages/${encodeURIComponent(id)}`);
  } catch (error) {
    $("#view").replaceChildren(back(), el("p", {"class": "empty"}, error.message));
    return;
  }
  if (state.id !== id) return;  // another was chosen meanwhile
  if (!m.seen) api(`/api/messages/${encodeURIComponent(id)}/seen`, {method: "PUT"})
    .then(soon, () => {});
  setTitle(m.subject || "(no subject)");
  const fields = el("dl", {"class": "fields"});
  field(fields, "From", m.from || "<" + m.sender + ">");
  field(fields, "To", m.to);
  field(fields, "Cc", m.cc);
  field(fields, "Date", m.date);
  field(fields, "Received", el("span", {}, time(m.time), " (" + exact(m.time) + ")"));
  field(fields, "MAIL FROM", "<" + m.sender + ">");
  field(fields, "RCPT TO", m.recipients.map((r) => "<" + r + ">").join(", "));
  if (m.session) field(fields, "Session", el("a", {"href": sessionLink(m.session.id)},
                                             `#${m.session.id}: what the client said`));
  for (const attempt of m.relay || []) {
    field(fields, "Relay", `${exact(attempt.time)}: ${attempt.to.join(", ")}: ${attempt.outcome}`);
  }
  for (const attempt of m.webhooks || []) {
    field(fields, "Webhook", `${exact(attempt.time)}: ${attempt.url}: ${attempt.outcome}`);
  }
  const attachments = el("ul", {"class": "attachments"}, ...m.attachments.map((a) =>
    el("li", {}, el("a", {"href": a.url, "download": a.filename,
                          "title": `${a.filename} (${a.content_type})`},
                    `${a.filename} \\u00b7 ${a.content_type} \\u00b7 ${bytes(a.size)}`))));
  const body = el("div", {"id": "body"});
  const tabs = el("div", {"class": "tabs", "role": "tablist"});
  const parts = [];
  if (m.html_url) parts.push(["HTML", () => htmlFrame(m)]);
  const cut = "The first MiB only: Raw has the whole message.";
  if (m.text) parts.push(["Text", () => m.text_cut
    ? el("div", {}, el("p", {"class": "small"}, cut), el("pre", {}, m.text))
    : el("pre", {}, m.text)]);
  parts.push(["Headers", () => el("pre", {}, m.headers.map(([n, v]) => n + ": " + v)
                                               .join(String.fromCharCode(10)))]);
  parts.push([m.checks && m.checks.error ? `Checks (${m.checks.error})` : "Checks",
              () => checksOf(m)]);
  parts.push(["Raw", () => {
    const pre = el("pre", {}, "Loading...");
    fetch(m.raw_url).then((r) => r.text()).then((text) => { pre.textContent = text; });
    return pre;
  }]);
  for (const [name, make] of parts) {
    const button = el("button", {"role": "tab"}, name);
    button.addEventListener("click", () => {
      for (const other of tabs.children) other.classList.toggle("on", other === button);
      body.replaceChildren(make());
    });
    tabs.append(button);
  }
  $("#view").replaceChildren(back(), el("h1", {}, m.subject || "(no subject)"), fields,
                             ...(m.attachments.length ? [attachments] : []),
                             el("div", {"class": "toolbar"}, tabs, actions(m)), body);
  tabs.firstChild.click();
}

function checksOf(m) {
  const list = el("div", {"class": "checks"}, el("p", {"class": "empty"}, "Checking..."));
  api(`/api/messages/${encodeURIComponent(m.id)}/checks`).then((data) => {
    const rows = data.findings.map((f) => el("li", {"class": f.severity},
      el("span", {"class": "badge " + f.severity}, f.severity), " ", el("b", {}, f.id),
      el("span", {"class": "small"}, " " + f.where), el("div", {}, f.text),
      el("div", {"class": "small"}, f.reference)));
    list.replaceChildren(rows.length ? el("ul", {}, ...rows) : el("p", {},
      "Nothing found: no real server should refuse, break or junk this message for its form."));
  }, (error) => list.replaceChildren(el("p", {"class": "empty"}, error.message)));
  return list;
}

function htmlFrame(m) {
  // Sandboxed without scripts (and the part's own policy forbids them too); same-origin only
  // so that the frame can be made as tall as what it shows.
  const frame = el("iframe", {"sandbox": "allow-popups allow-popups-to-escape-sandbox " +
                              "allow-same-origin", "src": m.html_url, "title": "HTML part"});
  const fit = () => {
    const page = frame.contentDocument && frame.contentDocument.documentElement;
    if (page) frame.style.height = (page.scrollHeight + 2) + "px";
  };
  frame.addEventListener("load", () => {
    fit();
    if (window.ResizeObserver && frame.contentDocument) {
      new ResizeObserver(fit).observe(frame.contentDocument.documentElement);
    }
  });
  const images = el("button", {"class": "quiet"}, "Load remote images");
  images.addEventListener("click", () => { frame.src = m.html_url + "?remote=1"; });
  return el("div", {}, frame, images);
}

function actions(m) {
  const row = el("div", {"class": "actions"});
  const remove = el("button", {}, "Delete");
  remove.addEventListener("click", () => deleteMessage(m.id));
  row.append(remove);
  if (m.relay !== null) {
    const release = el("button", {}, "Release");
    release.addEventListener("click", async () => {
      const to = prompt("Release to (comma-separated)", m.recipients.join(", "));
      if (!to) return;
      const answer = await attempt("Release", () => api(
        `/api/messages/${encodeURIComponent(m.id)}/release`, {
          method: "POST", headers: {"Content-Type": "application/json"},
          body: JSON.stringify({to: to.split(",").map((a) => a.trim()).filter(Boolean)})}));
      if (answer) row.append(el("span", {"class": "small"}, " queued for " + answer.to.join(", ")));
    });
    row.append(release);
  }
  return row;
}

function back() {
  const button = el("button", {"class": "back"}, "\\u2190 Back");
  button.addEventListener("click", () => { location.hash = link(state.view === "sessions"
                                                                  ? "/sessions" : "/"); });
  return button;
}

async function deleteMessage(id) {
  const done = await attempt("Delete", () => api(`/api/messages/${encodeURIComponent(id)}`,
                                                 {method: "DELETE"}));
  if (done === undefined) return;
  if (state.id === id) location.hash = link("/");
  else loadList();
}

// -- a session

async function showSession(id) {
  let s;
  try {
    s = await api(`/api/sessions/${encodeURIComponent(id)}`);
  } catch (error) {
    $("#view").replaceChildren(back(), el("p", {"class": "empty"}, error.message));
    return;
  }
  setTitle(`${s.protocol} session #${s.id}`);
  const fields = el("dl", {"class": "fields"});
  field(fields, "Client", s.peer);
  field(fields, "Began", el("span", {}, time(s.started), " (" + exact(s.started) + ")"));
  field(fields, "Ended", s.open ? "still open" : exact(s.ended));
  field(fields, "TLS", s.tls);
  field(fields, "User", s.user);
  field(fields, "Outcome", el("span", {}, el("span", {"class": "badge " + s.outcome},
                                                 s.outcome), s.error ? " " + s.error : ""));
  if (s.stored.length) {
    field(fields, "Stored", el("span", {}, ...s.stored.flatMap((key, n) => [
      n ? ", " : "", el("a", {"href": "#/messages/" + encodeURIComponent(key)}, key)])));
  }
  const table = el("table", {"class": "transcript"}, ...s.transcript.map((line) =>
    el("tr", {"class": line.from}, el("td", {}, line.t === null ? "" : line.t.toFixed(3)),
       el("td", {}, {"client": "C:", "server": "S:", "sheesh": "*"}[line.from]),
       el("td", {}, line.text))));
  $("#view").replaceChildren(back(), el("h1", {}, `${s.protocol} session #${s.id}`), fields,
                             table);
}

// -- keys, search, live updates

function choose(step) {
  const rows = [...$("#rows").querySelectorAll(".row")];
  if (!rows.length) return;
  const current = state.chosen >= 0 ? state.chosen
    : rows.findIndex((row) => row.dataset.id === state.id);
  state.chosen = Math.max(0, Math.min(rows.length - 1, current + step));
  rows.forEach((row, n) => row.classList.toggle("selected", n === state.chosen));
  rows[state.chosen].scrollIntoView({block: "nearest"});
}

function chosenRow() {
  return [...$("#rows").querySelectorAll(".row")][state.chosen] || null;
}

document.addEventListener("keydown", (event) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName);
  if (event.key === "Escape") {
    if (!$("#help").hidden) $("#help").hidden = true;
    else if (typing) event.target.blur();
    else if (state.id !== null) location.hash = link(state.view === "sessions" ? "/sessions"
                                                                                : "/");
    return;
  }
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const row = chosenRow();
  if (event.key === "j" || event.key === "ArrowDown") choose(1);
  else if (event.key === "k" || event.key === "ArrowUp") choose(-1);
  else if (event.key === "Enter" && row) location.hash = row.getAttribute("href");
  else if (event.key === "Delete" && state.view === "inbox" && (state.id || row)) {
    deleteMessage(state.id || row.dataset.id);
  } else if (event.key === "/") $("#search").focus();
  else if (event.key === "?") $("#help").hidden = !$("#help").hidden;
  else return;
  event.preventDefault();
});

let timer = null;
function soon() { clearTimeout(timer); timer = setTimeout(loadList, 150); }
$("#search").addEventListener("input", (event) => {
  clearTimeout(timer);
  timer = setTimeout(() => { state.query = event.target.value;
                             history.replaceState(null, "", link("/")); show(); }, 250);
});
$("#mailbox").addEventListener("change", (event) => {
  state.mailbox = event.target.value;
  location.hash = link("/");
});
$("#newer").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE);
                                               loadList(); });
$("#older").addEventListener("click", () => { state.offset += PAGE; loadList(); });
$("#help-button").addEventListener("click", () => { $("#help").hidden = false; });
$("#help-close").addEventListener("click", () => { $("#help").hidden = true; });
$("#help").addEventListener("click", (event) => {
  if (event.target === $("#help")) $("#help").hidden = true;
});
window.addEventListener("hashchange", () => { state.chosen = -1; show(); });
setInterval(() => {  // "3 minutes ago" stays true
  for (const node of document.querySelectorAll("time[datetime]")) {
    node.textContent = ago(Date.parse(node.getAttribute("datetime")) / 1000);
  }
}, 30000);

// Changes (new mail, deletions, flags) are noticed by asking /api/health once a second for
// the number of the latest one: a short request, where an event stream would stay open, and
// a browser that takes a screenshot (headless Chromium's --virtual-time-budget) waits for
// every open request to end. (Programs can use /api/events.)
let changes = null;
async function watch() {
  try {
    if (document.visibilityState !== "hidden") {
      const health = await api("/api/health");
      if (changes !== null && health.changes !== changes) soon();
      changes = health.changes;
    }
  } catch (ignored) {}
  setTimeout(watch, 1000);
}
show().finally(watch);
</script>
</body></html>
"""

if __name__ == "__main__":
    if __spec__ is None:  # run as a script, not with -m or imported
        relaunch_as_module()
    raise SystemExit(main())
