#!/usr/bin/env python3
"""sheesh: a one-file SMTP server that keeps every message it is sent.

    python sheesh.py                 listen on 127.0.0.1:1025, store mail in the Maildir ./mail
    python sheesh.py --help          every option, with its default
    mutt -f mail                     read what arrived (or mailbox.Maildir("mail") from Python)

sheesh is the successor to ``python -m smtpd -n -c DebuggingServer``, which Python 3.12
removed: a local SMTP sink for programs that send mail, and for their test suites. It is one
file and uses only the standard library of Python 3.11 or later, on Linux, macOS and Windows.

It speaks SMTP as RFC 5321 describes it, with the extensions that clients look for:
SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING (RFC 2920), SMTPUTF8 (RFC 6531),
ENHANCEDSTATUSCODES (RFC 2034, codes from RFC 3463), AUTH (RFC 4954) and STARTTLS (RFC 3207),
and implicit TLS on a second port (RFC 8314).

The file reads top to bottom, the way one message travels through it:

    1. Limits        the numbers that bound every read, and where they come from
    2. Replies       every reply sheesh sends, in one table
    3. Commands      one small class per verb, and parse_command()
    4. DATA          finding the end of a message and removing dot-stuffing
    5. The session   the SMTP state machine: bytes in, replies out; no sockets, files or clocks
    6. Faults        failures injected on purpose, so apps can test their retries
    7. The store     a Maildir: written in tmp/, renamed into new/
    8. The handler   the only code that reads from or writes to a connection
    9. The server    threads, the connection limit, a clean stop, and the in-process API
   10. The web inbox a page and a JSON API over the same Maildir, with http.server
   11. Forwarding    relay and release to a real SMTP server; the sendmail entry point
   12. POP3          the same Maildir, for mail clients (RFC 1939)
   13. The CLI       main()
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
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
import http.server
import json
import itertools
import logging
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
import urllib.parse
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path

try:
    import ssl
except ImportError:  # Python built without OpenSSL: everything but TLS still works
    ssl = None

__version__ = "0.1.0"

log = logging.getLogger("sheesh")


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

# RFC 5321 section 4.5.3.1.4 allows a command line of 512 octets, and section 4.5.3.1.2 lets each
# extension lengthen it: SIZE= adds 26 (RFC 1870), AUTH= adds 500 (RFC 4954), and an SMTPUTF8 path
# of 256 characters may take 1,024 octets of UTF-8 (RFC 6531). 4 KiB holds all of those at once,
# and an AUTH PLAIN initial response with long credentials, and is still a trivial cost per client.
COMMAND_LINE_LIMIT = 4096

# RFC 4954 section 4 leaves it to the server how to slow down password guessing: each failed
# AUTH waits this long before its 535, and the third failure in a session ends it.
AUTH_FAILURE_DELAY = 1.0
MAX_AUTH_FAILURES = 3

# aiosmtpd closes a session after 20 unrecognised commands: a client that sends more is not
# speaking SMTP (it may be an HTTP client, or an attack that smuggles HTTP through SMTP).
MAX_UNKNOWN_COMMANDS = 20

# How much one read from a connection may return. Bodies are handled a buffer at a time, so this
# is also about the most memory that one message in DATA costs, whatever its size. Each read
# allocates this much before it shrinks to what arrived: 256 KiB made small messages 40% slower
# (measured with ../shared/bench), 64 KiB costs 5% against 8 KiB and keeps big ones fast.
READ_SIZE = 64 * 1024

# On SIGTERM or Ctrl-C, messages already in DATA get this long to finish before they are dropped.
SHUTDOWN_GRACE = 5.0

# How far into a message sheesh looks for its Subject (for the log line).
HEADER_SCAN_LIMIT = 64 * 1024

# Server.wait_for_message() hands out arrivals in order; it remembers this many, so that a
# server that runs for months without anyone waiting does not grow without end.
ARRIVALS_KEPT = 10_000


# ---------------------------------------------------------------------------------------------
# 2. Replies
#
# An SMTP reply is a three-digit code and text (RFC 5321 section 4.2). A reply of several lines
# repeats the code on each, with a hyphen after all but the last: "250-first", "250 last".
# The first digit says how it went: 2 done, 3 go on, 4 failed for now, 5 failed for good.
# Most replies also carry an enhanced status code such as 2.1.0 (RFC 2034, RFC 3463), which
# RFC 2034 leaves out of the greeting, the HELO/EHLO reply and the 354 that starts DATA.
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


def reply(code: int, *lines: str) -> Reply:
    return Reply(code, lines)


OK = reply(250, "2.0.0 Ok")
SENDER_OK = reply(250, "2.1.0 Ok")
RECIPIENT_OK = reply(250, "2.1.5 Ok")
START_DATA = reply(354, "End data with <CR><LF>.<CR><LF>")
BYE = reply(221, "2.0.0 Bye")
CANNOT_VRFY = reply(252, "2.5.0 Cannot verify the user, but will accept mail for it")
HELP = reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT AUTH",
             "2.0.0 See RFC 5321 for what each one does")
AUTH_OK = reply(235, "2.7.0 Authentication successful")
AUTH_USERNAME = reply(334, "VXNlcm5hbWU6")  # base64 of "Username:" (the LOGIN mechanism)
AUTH_PASSWORD = reply(334, "UGFzc3dvcmQ6")  # base64 of "Password:"
AUTH_GO_ON = reply(334, "")  # PLAIN without an initial response: an empty challenge
READY_FOR_TLS = reply(220, "2.0.0 Ready to start TLS")

UNKNOWN_COMMAND = reply(500, "5.5.2 Error: command not recognized")
LINE_TOO_LONG = reply(500, "5.5.2 Error: line too long")  # RFC 5321 section 4.5.3.1.4
NOT_IMPLEMENTED = reply(502, "5.5.1 Error: command not implemented")
NEED_HELO = reply(503, "5.5.1 Error: send HELO or EHLO first")
NEED_EHLO = reply(503, "5.5.1 Error: send EHLO first")
NESTED_MAIL = reply(503, "5.5.1 Error: nested MAIL command")
NEED_MAIL = reply(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = reply(503, "5.5.1 Error: need RCPT command")
ALREADY_AUTHENTICATED = reply(503, "5.5.1 Error: already authenticated")
TLS_ALREADY_ACTIVE = reply(503, "5.5.1 Error: TLS already active")
NEED_TLS = reply(530, "5.7.0 Must issue a STARTTLS command first")  # RFC 3207 section 4
NEED_AUTH = reply(530, "5.7.0 Authentication required")  # RFC 4954 section 6
NEED_TLS_FOR_AUTH = reply(538, "5.7.11 Encryption required for requested authentication "
                          "mechanism")
AUTH_IN_TRANSACTION = reply(503, "5.5.1 Error: AUTH not allowed during a mail transaction")
UNKNOWN_MECHANISM = reply(504, "5.5.4 Error: unrecognized authentication type")
AUTH_CANCELLED = reply(501, "5.0.0 Authentication cancelled")
BAD_BASE64 = reply(501, "5.5.2 Error: cannot decode the response")
BAD_CREDENTIALS = reply(535, "5.7.8 Error: authentication credentials invalid")
BAD_SENDER = reply(501, "5.1.7 Error: bad sender address syntax")
BAD_RECIPIENT = reply(501, "5.1.3 Error: bad recipient address syntax")
UNKNOWN_PARAMETER = reply(555, "5.5.4 Error: MAIL FROM/RCPT TO parameter not recognized")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3 Error: too many recipients")  # RFC 5321 4.5.3.1.10
MESSAGE_TOO_BIG = reply(552, "5.3.4 Error: message exceeds the fixed maximum message size")
STORAGE_FULL = reply(452, "4.3.1 Error: insufficient system storage")
STORAGE_FAILED = reply(451, "4.3.0 Error: local error in processing, try again later")
TOO_MANY_UNKNOWN = reply(421, "4.7.0 Error: too many unrecognized commands, goodbye")
TOO_MANY_AUTH_FAILURES = reply(421, "4.7.0 Error: too many failed authentications, goodbye")
TLS_ON_PLAIN_PORT = reply(421, "4.7.0 Error: this port speaks plain SMTP first, use STARTTLS")
# Not a reply: what an injected "disconnect" fault returns, so the handler hangs up instead.
HANG_UP = Reply(0, ("(the connection is closed without a reply)",))
TOO_MANY_CONNECTIONS = reply(421, "4.7.0 Error: too many connections, try again later")
TIMEOUT = reply(421, "4.4.2 Error: timeout exceeded, goodbye")
SHUTTING_DOWN = reply(421, "4.3.2 Service shutting down, goodbye")
INTERNAL_ERROR = reply(421, "4.3.0 Error: internal server error, goodbye")


def usage(syntax: str) -> Reply:
    """501 with the command's syntax, as smtpd did: the client learns what was expected."""
    return reply(501, f"5.5.4 Syntax: {syntax}")


def greeting(hostname: str) -> Reply:
    return reply(220, f"{hostname} ESMTP sheesh")


def queued(queue_id: str) -> Reply:
    return reply(250, f"2.0.0 Ok: queued as {queue_id}")


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
    body: str = "7BIT"  # BODY=7BIT or BODY=8BITMIME (RFC 6152)
    smtputf8: bool = False  # SMTPUTF8 (RFC 6531)
    has_parameters: bool = False


@dataclass(frozen=True)
class Rcpt:
    recipient: str  # a forward-path


@dataclass(frozen=True)
class Data:
    pass


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


Command = (Helo | Ehlo | Mail | Rcpt | Data | Rset | Noop | Vrfy | Help | Quit | Auth
           | StartTls | NotImplemented_ | Unknown | Invalid)

MAIL_USAGE = usage("MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8] [AUTH=x]")
RCPT_USAGE = usage("RCPT TO:<address>")


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
    if not is_valid_address(sender, null_allowed=True):
        return Invalid(BAD_SENDER)
    if not parameters:
        return Mail(sender)
    size, body, smtputf8 = None, "7BIT", False
    for keyword, value in parameters:
        match keyword, value:
            case "SIZE", str() if value.isdigit() and value.isascii():
                size = int(value)
            case "BODY", str() if value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper()
            case "SMTPUTF8", None:
                smtputf8 = True
            case "AUTH", str():
                pass  # RFC 4954 section 5: the submitter's identity; senders commonly send AUTH=<>
            case ("SIZE" | "BODY" | "SMTPUTF8" | "AUTH"), _:
                return Invalid(MAIL_USAGE)
            case _:
                return Invalid(UNKNOWN_PARAMETER)
    return Mail(sender, size, body, smtputf8, has_parameters=True)


def parse_rcpt(argument: str) -> Rcpt | Invalid:
    """RCPT TO:<forward-path> (RFC 5321 section 4.1.1.3). sheesh knows no RCPT parameters."""
    if argument[:3].upper() != "TO:":
        return Invalid(RCPT_USAGE)
    parsed = parse_path(argument[3:])
    if parsed is None:
        return Invalid(RCPT_USAGE)
    recipient, parameters = parsed
    if not is_valid_address(recipient, null_allowed=False):
        return Invalid(BAD_RECIPIENT)
    if parameters:
        return Invalid(UNKNOWN_PARAMETER)
    return Rcpt(recipient)


def parse_path(text: str) -> tuple[str, list[tuple[str, str | None]]] | None:
    """Split "<address> KEY=VALUE ..." into the address and its parameters, or None.

    The address may come in angle brackets, as RFC 5321 requires, or bare, as many clients
    send it. A source route ("<@relay:user@host>") is accepted and ignored (RFC 5321 appendix C).
    """
    text = text.lstrip(" ")  # "MAIL FROM: <a@b>" is wrong but common
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return None
        address, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(" "):
            return None
    else:
        address, _, rest = text.partition(" ")
        if not address:
            return None  # only "<>" is the null sender
    if address.startswith("@"):
        address = address.partition(":")[2]
    parameters = []
    for word in rest.split():
        keyword, equals, value = word.partition("=")
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") (RFC 5321 section 4.1.2)
        if not (keyword.isascii() and keyword.replace("-", "").isalnum() and keyword[0] != "-"):
            return None
        parameters.append((keyword.upper(), value if equals else None))
    return address, parameters


def is_valid_address(address: str, *, null_allowed: bool) -> bool:
    """Whether an address is safe to keep. Refusing control characters (CR and LF above all)
    keeps a client from writing extra header lines into a stored message; isprintable() also
    refuses bytes that were not UTF-8, which surrogateescape turned into lone surrogates."""
    if not address:
        return null_allowed
    return address.isprintable() and not any(ch in address for ch in " <>")


def parse_auth(argument: str) -> Auth | Invalid:
    """AUTH mechanism [initial-response] (RFC 4954 section 4)."""
    mechanism, _, initial = argument.partition(" ")
    if not mechanism or " " in initial.strip(" "):
        return Invalid(usage("AUTH mechanism [initial-response]"))
    return Auth(mechanism.upper(), initial.strip(" ") or None)


# ---------------------------------------------------------------------------------------------
# 4. DATA: where a message ends, and dot-stuffing
#
# After DATA the client sends the message and ends it with a line holding a single dot: the
# five bytes CR LF . CR LF (RFC 5321 section 4.1.1.4). So that a line of the message can begin
# with a dot too, the client doubles that dot ("dot-stuffing") and the server removes one
# again (section 4.5.2). Only CR LF . CR LF ends a message: a bare LF or CR around the dot does
# not, or a second message could be smuggled inside the first (CVE-2023-51766, CVE-2024-27305).
#
# DataReader does this a buffer at a time with bytes.find() and bytes.replace(), which run in C,
# rather than a line at a time in Python. Its one subtlety is the boundary between two buffers:
# the end of one may hold the start of the terminator, so it keeps those bytes back for the next.
# ---------------------------------------------------------------------------------------------

END_OF_DATA = b"\r\n.\r\n"


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
# 5. The session
#
# One SMTP conversation, as a state machine that takes the client's bytes and returns the
# replies to send (the "sans-IO" style of h11): it never touches a socket, a file or a clock,
# so the tests drive it directly and read like SMTP transcripts.
#
#   CONNECTED --HELO/EHLO--> GREETED --MAIL--> MAIL --RCPT--> RCPT --DATA--> DATA
#       ^                     |    ^                                         |
#       |           AUTH <----+    +-------------- the final dot, RSET -------+
#       |      (334 challenges, until 235 or 535)
#       +-- RSET keeps a session that has not said HELO where it is; STARTTLS comes back here
#
# Delivery is handed in as a store with one method, begin(envelope), which returns a writer
# with write(bytes), commit() -> queue id, and abort(). The store may raise OSError at any
# step (a full disk, a vanished folder): the client then hears 451 or 452.
# ---------------------------------------------------------------------------------------------


class State(enum.Enum):
    CONNECTED = "waiting for HELO or EHLO"
    GREETED = "ready for MAIL"
    MAIL = "have the sender, waiting for RCPT"
    RCPT = "have recipients, waiting for more RCPT or DATA"
    DATA = "reading the message"
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
    protocol: str = "SMTP"  # SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848)
    auth_user: str | None = None
    tls: str | None = None  # the TLS version and cipher, when the session used TLS


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
class Session:
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
    tls_requested: bool = False  # STARTTLS was accepted: the handler must now run the handshake
    envelope: Envelope = field(default_factory=Envelope)
    unknown_commands: int = 0
    auth_failures: int = 0
    closing_note: str = ""  # why the session closed itself, for the log
    faults: FaultPlan | None = None  # failures to inject on purpose (--fail)
    fault_notes: list[str] = field(default_factory=list)  # injected faults, for the log
    delay: float = 0.0  # seconds the handler should wait before sending the next replies
    _unread: bytes = b""  # the start of a command line whose end has not arrived
    _overlong: bool = False  # dropping the rest of a command line that was too long
    _data: DataReader | None = None
    _writer: object = None  # the store's writer for the message in DATA
    _message_size: int = 0
    _data_problem: Reply | None = None  # why the message in DATA will not be stored
    _auth_mechanism: str = ""
    _auth_username: str | None = None
    _auth_challenge: bytes = b""

    def greeting(self) -> Reply:
        if (fault := self.inject("connect")) is not None:
            self.state = State.CLOSED  # a refused connection: say why, then close
            return fault
        return greeting(self.hostname)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def in_data(self) -> bool:
        return self.state is State.DATA

    @property
    def busy(self) -> bool:
        """Whether a command line or a message has begun to arrive and not yet ended."""
        return self.state is State.DATA or bool(self._unread) or self._overlong

    def receive(self, data: bytes) -> list[Reply]:
        """Take the bytes the client sent; return the replies they call for, in order.

        A client that pipelines (RFC 2920) sends several commands, or a whole message and the
        next transaction, in one write: they are answered one by one, in the order they came.
        """
        if self.state is State.CONNECTED and not self._unread and data.startswith(b"\x16\x03"):
            return [self.close(TLS_ON_PLAIN_PORT, "the client spoke TLS to the plain port")]
        buffer, position, replies = self._unread + data, 0, []
        while position < len(buffer) and not self.closed and not self.tls_requested:
            if self.state is State.DATA:
                done, buffer, position = self.handle_data(buffer[position:]), b"", 0
                if done:
                    reply_, buffer = done
                    replies.append(reply_)
                continue
            end = buffer.find(b"\n", position)
            if end < 0:
                break
            replies.append(self.handle_raw_line(buffer[position:end]))
            position = end + 1
        self._unread = self._hold_partial_line(buffer[position:])
        return replies

    def _hold_partial_line(self, partial: bytes) -> bytes:
        # After STARTTLS, what the client sent before the handshake is dropped, never read as
        # commands: a man in the middle could have put it there (RFC 3207 section 4.2, and
        # CVE-2011-0411, "STARTTLS command injection").
        if self.closed or self.state is State.DATA or self.tls_requested:
            return b""
        if len(partial) >= COMMAND_LINE_LIMIT:
            self._overlong = True  # drop it, and answer once its end arrives
            return b""
        return partial

    def handle_raw_line(self, raw: bytes) -> Reply:
        """One command line as bytes, without its LF (a CR before the LF is removed here)."""
        if self._overlong or len(raw) >= COMMAND_LINE_LIMIT:
            self._overlong = False
            if self.state is State.AUTH:
                self.state = State.GREETED
            return LINE_TOO_LONG
        # surrogateescape keeps bytes that are not UTF-8, so they can be refused, not mangled.
        return self.handle_line(raw.removesuffix(b"\r").decode("utf-8", "surrogateescape"))

    def handle_line(self, line: str) -> Reply:
        """One command line: the heart of SMTP."""
        if self.state is State.AUTH:
            return self.continue_auth(line)
        match parse_command(line):
            case Helo(name) | Ehlo(name) as hello:
                if (fault := self.inject("ehlo")) is not None:
                    return fault
                return self.hello(name, extended=isinstance(hello, Ehlo))
            case Mail() as mail:
                return self.mail(mail)
            case Rcpt(recipient):
                return self.rcpt(recipient)
            case Data():
                return self.data()
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
            case Invalid(reply_):
                return reply_
            case Unknown():
                return self.unknown()

    def hello(self, client_name: str, *, extended: bool) -> Reply:
        # RFC 5321 section 4.1.4: a second HELO or EHLO resets the transaction, as RSET does.
        self.client_name, self.extended = client_name, extended
        self.state = State.GREETED
        self.envelope = Envelope()
        if not extended:
            return reply(250, self.hostname)
        return reply(250, self.hostname, *self.extensions())

    def extensions(self) -> list[str]:
        """What EHLO advertises (RFC 5321 section 4.1.1.1), one keyword per line."""
        extensions = ["PIPELINING", f"SIZE {self.policy.max_size}", "8BITMIME", "SMTPUTF8",
                      "ENHANCEDSTATUSCODES"]
        if self.policy.tls_available and self.tls is None:
            extensions.append("STARTTLS")
        if self.tls is not None or not self.policy.tls_required:  # no passwords in the clear
            extensions.append("AUTH " + " ".join(self.mechanisms()))
        return extensions + ["HELP"]

    def mechanisms(self) -> list[str]:
        # CRAM-MD5 proves the client knows a password without sending it, so it needs one to
        # compare with: only with --users.
        return ["PLAIN", "LOGIN"] + (["CRAM-MD5"] if self.policy.users is not None else [])

    def mail(self, mail: Mail) -> Reply:
        if self.state is State.CONNECTED:
            return NEED_HELO
        if self.state in (State.MAIL, State.RCPT):
            return NESTED_MAIL
        if self.policy.tls_required and self.tls is None:
            return NEED_TLS
        if self.policy.auth_required and self.auth_user is None:
            return NEED_AUTH
        if mail.has_parameters and not self.extended:
            return UNKNOWN_PARAMETER  # parameters are ESMTP: a HELO client cannot use them
        if mail.size is not None and mail.size > self.policy.max_size:
            return MESSAGE_TOO_BIG  # RFC 1870 section 6.1: refuse it before it is sent
        if (fault := self.inject("mail", mail.sender)) is not None:
            return fault
        self.envelope = Envelope(sender=mail.sender, body=mail.body, smtputf8=mail.smtputf8)
        self.state = State.MAIL
        return SENDER_OK

    def rcpt(self, recipient: str) -> Reply:
        if self.state not in (State.MAIL, State.RCPT):
            return NEED_MAIL
        if len(self.envelope.recipients) >= self.policy.max_recipients:
            return TOO_MANY_RECIPIENTS
        if (fault := self.inject("rcpt", recipient)) is not None:
            return fault  # this recipient only: the others stay in the transaction
        self.envelope.recipients.append(recipient)
        self.state = State.RCPT
        return RECIPIENT_OK

    def data(self) -> Reply:
        if self.state is State.MAIL:
            return NEED_RCPT
        if self.state is not State.RCPT:
            return NEED_MAIL if self.state is State.GREETED else NEED_HELO
        if (fault := self.inject("data")) is not None:
            return fault
        envelope = self.envelope
        envelope.client_name, envelope.peer, envelope.tls = self.client_name, self.peer, self.tls
        envelope.auth_user = self.auth_user
        envelope.protocol = "SMTP" if not self.extended else "ESMTP" + (
            "S" if self.tls is not None else "") + ("A" if self.auth_user is not None else "")
        try:
            self._writer = self.store.begin(self.envelope)
        except OSError as error:
            return storage_problem(error)
        self.state, self._data = State.DATA, DataReader()
        self._message_size, self._data_problem = 0, None
        return START_DATA

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
        """The final dot arrived: store the message and say so, or say why not."""
        writer, problem = self._writer, self._data_problem
        self._writer = None
        try:
            if problem is not None:
                return problem
            if (fault := self.inject("end-of-data")) is not None:
                writer.abort()  # a refused message leaves nothing behind
                return fault
            return queued(writer.commit())  # only now is the message on disk: a 250 promises it
        except OSError as error:
            return storage_problem(error)
        finally:
            self.reset_transaction()

    def reset_transaction(self) -> None:
        """RSET, a new HELO, or the end of DATA: forget the transaction, keep the session."""
        self._abort_writer()
        self.envelope, self._data = Envelope(), None
        if self.state not in (State.CONNECTED, State.CLOSED):
            self.state = State.GREETED

    def unknown(self) -> Reply:
        self.unknown_commands += 1
        if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
            return self.close(TOO_MANY_UNKNOWN, "too many unrecognized commands")
        return UNKNOWN_COMMAND

    def inject(self, stage: str, subject: str = "") -> Reply | None:
        """A failure configured for this point (--fail), or None to go on as usual. A delay
        is left to the handler, which waits before it sends the replies."""
        rule = self.faults.decide(stage, subject) if self.faults is not None else None
        if rule is None:
            return None
        self.fault_notes.append(f"{stage} {subject}: {rule.text}".replace("  ", " "))
        if rule.delay:
            self.delay += rule.delay
            return None
        if rule.disconnect:
            self.state = State.CLOSED
            return HANG_UP
        return rule.reply

    def goodbye(self, reason: str) -> Reply:
        """The last reply when the handler ends the connection: "timeout", "shutdown",
        "busy" (too many connections) or "error" (a bug, whose details stay in the log)."""
        return {"timeout": TIMEOUT, "shutdown": SHUTTING_DOWN, "busy": TOO_MANY_CONNECTIONS,
                "error": INTERNAL_ERROR}[reason]

    def close(self, last_reply: Reply, note: str) -> Reply:
        """End the session from our side, with a last reply and a note for the log."""
        self.state, self.closing_note = State.CLOSED, note
        return last_reply

    def starttls(self) -> Reply:
        """STARTTLS (RFC 3207): the handler runs the handshake once this reply is sent."""
        if not self.policy.tls_available:
            return NOT_IMPLEMENTED
        if self.tls is not None:
            return TLS_ALREADY_ACTIVE
        if self.state is State.CONNECTED:
            return NEED_EHLO
        self.tls_requested = True
        return READY_FOR_TLS

    def tls_started(self, description: str) -> None:
        """The handshake succeeded. RFC 3207 section 4.2: forget all that the client said
        before it, since it could have been forged; it must say EHLO again."""
        self.reset_transaction()
        self.state, self.tls, self.tls_requested = State.CONNECTED, description, False
        self.client_name, self.extended, self.auth_user = "", False, None

    def auth(self, mechanism: str, initial_response: str | None) -> Reply:
        """AUTH (RFC 4954). Without a users file any user name and password are accepted, since
        many clients insist on logging in; the name is recorded with each message sent."""
        if self.state is State.CONNECTED or not self.extended:
            return NEED_EHLO
        if self.state is not State.GREETED:
            return AUTH_IN_TRANSACTION
        if self.auth_user is not None:
            return ALREADY_AUTHENTICATED
        if self.policy.tls_required and self.tls is None:
            return NEED_TLS_FOR_AUTH
        if mechanism not in self.mechanisms():
            return UNKNOWN_MECHANISM
        if (fault := self.inject("auth")) is not None:
            return fault
        self._auth_mechanism, self._auth_username = mechanism, None
        self.state = State.AUTH
        if mechanism == "CRAM-MD5":  # RFC 2195: the server speaks first, with a fresh challenge
            self._auth_challenge = f"<{secrets.token_hex(12)}@{self.hostname}>".encode()
            return reply(334, base64.b64encode(self._auth_challenge).decode())
        if initial_response is None:
            return AUTH_GO_ON if mechanism == "PLAIN" else AUTH_USERNAME
        return self.continue_auth(initial_response)

    def continue_auth(self, response: str) -> Reply:
        """The client's answer to a 334 challenge: a line of base64, or "*" to give up."""
        self.state = State.GREETED  # unless a further challenge is sent, below
        if response == "*":
            return AUTH_CANCELLED
        try:
            decoded = base64.b64decode(response.encode("ascii"), validate=True)
        except (UnicodeError, binascii.Error):
            return BAD_BASE64
        match self._auth_mechanism:
            case "LOGIN" if self._auth_username is None:
                self._auth_username = decoded.decode("utf-8", "replace")
                self.state = State.AUTH
                return AUTH_PASSWORD
            case "LOGIN":
                return self.check_password(self._auth_username, decoded)
            case "PLAIN":  # RFC 4616: authorization identity, NUL, user name, NUL, password
                parts = decoded.split(b"\0")
                if len(parts) != 3:
                    return BAD_BASE64
                return self.check_password(parts[1].decode("utf-8", "replace"), parts[2])
            case _:  # CRAM-MD5: "user hex(HMAC-MD5(password, challenge))"
                user, _, digest = decoded.decode("utf-8", "replace").rpartition(" ")
                return self.check_cram_md5(user, digest.lower().encode())

    def check_password(self, user: str, password: bytes) -> Reply:
        if self.policy.users is None or password_matches(self.policy.users, user, password):
            return self.authenticated(user)
        return self.auth_failed()

    def check_cram_md5(self, user: str, digest: bytes) -> Reply:
        known = self.policy.users.get(user)
        expected = hmac.new((known or "\0 unknown").encode(), self._auth_challenge, "md5")
        same = hmac.compare_digest(digest, expected.hexdigest().encode())
        return self.authenticated(user) if same and known is not None else self.auth_failed()

    def authenticated(self, user: str) -> Reply:
        self.auth_user = user
        return AUTH_OK

    def auth_failed(self) -> Reply:
        self.auth_failures += 1
        self.delay += AUTH_FAILURE_DELAY  # slows down guessing; only this client waits
        if self.auth_failures >= MAX_AUTH_FAILURES:
            return self.close(TOO_MANY_AUTH_FAILURES, "too many failed authentications")
        return BAD_CREDENTIALS

    def connection_lost(self) -> None:
        """The connection ended, however it ended: a message not yet acknowledged leaves no trace."""
        self.reset_transaction()
        self.state = State.CLOSED


def password_matches(users: dict[str, str], user: str, password: bytes) -> bool:
    """Whether the password is the user's. compare_digest takes as long whatever the bytes,
    and an unknown user is compared too, so the time an answer takes tells nothing about a
    password or a user name. (SMTP AUTH and POP3 PASS both ask here.)"""
    known = users.get(user)
    same = hmac.compare_digest(password, (known or "\0 unknown").encode())
    return same and known is not None


def storage_problem(error: OSError) -> Reply:
    """A failed write is the server's problem, and a temporary one (RFC 5321 section 4.2.2)."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return STORAGE_FULL
    return STORAGE_FAILED


# ---------------------------------------------------------------------------------------------
# 6. Fault injection
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

    def public(self) -> dict:
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
    if found := re.search(r",\s*(always|\d+(?:\.\d+)?%|first\s+\d+)\s*$", action, re.I):
        action, frequency = action[:found.start()].strip(), found.group(1).lower()
    if frequency.endswith("%"):
        rule.probability = min(float(frequency[:-1]) / 100, 1.0)
    elif frequency.startswith("first"):
        rule.times_left = int(frequency.split()[1])
    if action.lower() == "disconnect":
        rule.disconnect = True
    elif found := re.fullmatch(r"delay\s+(\d+(?:\.\d+)?)", action, re.I):
        rule.delay = float(found.group(1))
    elif found := re.fullmatch(r"([45]\d\d)(?:\s+(\S.*))?", action):
        rule.reply = reply(int(found.group(1)), found.group(2) or "Error: failure injected")
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
    """The rules in force, shared by every session; replaced at run time through the API."""

    def __init__(self, rules: list[FaultRule] = (), seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self.replace(rules, seed)

    def replace(self, rules: list[FaultRule], seed: int | None = None) -> None:
        with self._lock:
            self.rules, self.seed = list(rules), seed
            self._random = random.Random(seed)  # a seed makes a run of chances repeatable

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

    def public(self) -> dict:
        with self._lock:
            return {"seed": self.seed, "rules": [rule.public() for rule in self.rules]}


# ---------------------------------------------------------------------------------------------
# 7. The store: a Maildir
#
# A Maildir is a folder with three folders in it: tmp, new and cur. A message is written into
# tmp/ under a name nobody else will use, flushed to disk, and only then renamed into new/, so a
# reader (mutt, Python's mailbox module) never sees half a message. A rename within a filesystem
# is atomic. Names follow the usual pattern, seconds.M<microseconds>P<pid>Q<counter>.<host>, which
# cannot collide between threads (the counter) or processes (the pid).
#
# On top of the message as sent go the trace headers (RFC 5321 section 4.4): Return-Path with
# the envelope sender, Delivered-To with each envelope recipient (so Bcc recipients are kept),
# and Received. Below them, the bytes are exactly the bytes the client sent.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A message the store has just put in new/."""

    queue_id: str
    path: str
    envelope: Envelope
    size: int  # the message as sent, without the trace headers


class Maildir:
    """Writes messages into a Maildir; safe to use from many threads at once."""

    def __init__(self, path: str | os.PathLike, hostname: str = "localhost", *,
                 fsync: bool = True, on_delivery=None) -> None:
        self.path = Path(path)
        # Plain strings for the paths built per message: os.path is several times faster.
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

    def _unique_name(self) -> str:
        now = time.time()
        return (f"{int(now)}.M{int(now % 1 * 1e6):06d}P{self._pid}Q{next(self._counter)}"
                f".{self._name_host}")

    def begin(self, envelope: Envelope) -> MaildirWriter:
        name = self._unique_name()
        tmp_path = f"{self._tmp}{os.sep}{name}"
        try:
            # O_EXCL: never write over another file. A raw descriptor, not open(): with many
            # threads every system call is a chance to lose the GIL, and open() makes three.
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
        except OSError as error:
            self.failed(error)
            raise
        return MaildirWriter(self, fd, tmp_path, name, envelope,
                             self.trace_headers(envelope, name))

    def trace_headers(self, envelope: Envelope, queue_id: str) -> bytes:
        recipients = envelope.recipients
        lines = [f"Return-Path: <{envelope.sender}>"]
        lines += [f"Delivered-To: {recipient}" for recipient in recipients]
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

    def keys(self) -> list[str]:
        """The messages in new/ and cur/, oldest first."""
        entries = []
        for sub in ("new", "cur"):
            with os.scandir(self.path / sub) as found:
                entries += [(entry.stat().st_mtime_ns, entry.name, sub) for entry in found
                            if not entry.name.startswith(".")]
        return [f"{sub}/{name}" for _, name, sub in sorted(entries)]


_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise turn LF into CRLF


class MaildirWriter:
    """One message on its way into the Maildir."""

    def __init__(self, store: Maildir, fd: int, tmp_path: str, name: str, envelope: Envelope,
                 trace_headers: bytes):
        self.store, self.fd, self.tmp_path, self.name = store, fd, tmp_path, name
        self.envelope = envelope
        self.size = 0
        self._unwritten = trace_headers  # written with the first bytes of the body: one write

    def write(self, data: bytes) -> None:
        try:
            write_all(self.fd, self._unwritten + data if self._unwritten else data)
        except OSError as error:
            self.store.failed(error)
            raise
        self._unwritten = b""
        self.size += len(data)

    def commit(self) -> str:
        """Put the message on disk and move it into new/; return its queue id."""
        final_path = f"{self.store._new}{os.sep}{self.name}"
        try:
            if self._unwritten:
                self.write(b"")  # an empty message still has its trace headers
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
        self.store.delivered(Delivery(self.name, final_path, self.envelope, self.size))
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


def header_safe(text: str) -> str:
    """Client text made fit for a header comment: printable ASCII, no parentheses."""
    return _NOT_HEADER_SAFE.sub("?", text) or "unknown"


_NOT_HEADER_SAFE = re.compile(r"[^ -'*-\[\]-~]")  # all but printable ASCII, ( ) and backslash


def escape_for_log(text: str) -> str:
    """Client text made safe for a terminal: control characters and stray bytes as escapes."""
    return "".join(ch if ch.isprintable() else
                   f"\\x{ord(ch) & 0xFF:02x}" if "\udc80" <= ch <= "\udcff" or ord(ch) < 0x100
                   else f"\\u{ord(ch):04x}" for ch in text)


# ---------------------------------------------------------------------------------------------
# 8. The handler
#
# socketserver gives each connection a thread and a StreamRequestHandler, with rfile and wfile
# over the socket. The handler moves bytes between the socket and the session and does nothing
# else: it reads what has arrived, hands it to the session, and writes the replies back in one
# write (one sendall per batch matters: a reply per packet waits on delayed ACKs under Nagle).
# ---------------------------------------------------------------------------------------------


class ConnectionHandler(socketserver.StreamRequestHandler):
    """The only code that reads from or writes to an SMTP (or POP3) connection."""

    disable_nagle_algorithm = True  # replies are small and already batched: send them now
    # read1() reads straight into the bytes it returns and never uses rfile's buffer, so a
    # 1-byte buffer instead of 8 KiB saves memory on every idle connection (3.6 KB each).
    rbufsize = 1

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

    def handle(self) -> None:
        server: Listener = self.server
        self.session = server.make_session(self.client_address[0])
        refusal = server.admit(self)
        if refusal is not None:
            self.send_last(self.session.goodbye(refusal))
            return
        try:
            self.converse()
        except TimeoutError:
            self.send_last(self.session.goodbye("timeout"))
        except OSError:
            pass  # the client went away; the session below cleans up
        except Exception:
            log.exception("unexpected error in the session with %s", self.client_address[0])
            self.send_last(self.session.goodbye("error"))  # never the exception's text
        finally:
            if self.session.closing_note:
                log.info("closed the session with %s: %s", self.client_address[0],
                         self.session.closing_note)
            self.session.connection_lost()
            server.release(self)

    def finish(self) -> None:
        super().finish()
        if self.request is not self.plain_socket:
            self.request.close()  # the TLS socket; socketserver closes only the one it made

    def converse(self) -> None:
        """The connection loop: read, let the session answer, write."""
        session, server = self.session, self.server
        if server.implicit_tls and not self.start_tls():
            return
        self.answer([session.greeting()])
        self.unit_started = time.monotonic()
        while not session.closed:
            data = self.read()
            if not data:
                if server.stopping:
                    self.send_last(session.goodbye("shutdown"))
                return
            was_busy = session.busy
            self.answer(session.receive(data))
            if session.busy and not was_busy:
                self.unit_started = time.monotonic()
            if session.tls_requested and not self.start_tls():
                return
            if server.stopping and not session.busy and not session.closed:
                self.send_last(session.goodbye("shutdown"))
                return

    def read(self) -> bytes:
        """The client's next bytes, within the timeout (RFC 5321 section 4.5.3.2.7). A line or a
        message that has begun must end within one timeout in all, so a client that trickles
        a byte at a time cannot hold a connection forever."""
        timeout = self.server.idle_timeout
        if self.session.busy:
            timeout -= time.monotonic() - self.unit_started
            if timeout <= 0:
                raise TimeoutError
        if timeout != self.connection.gettimeout():  # most reads wait as long as the last one
            self.connection.settimeout(timeout)  # and sends too: a client must read its replies
        if self.poller is not None and not self.poller.poll(timeout * 1000):
            raise TimeoutError
        return self.rfile.read1(READ_SIZE)

    def start_tls(self) -> bool:
        """Run the TLS handshake on this connection, after STARTTLS or at once on the SMTPS
        port. Whatever the client sent before it stays unread in the plain socket's buffers,
        which are dropped with it. False if the handshake failed (then the connection ends)."""
        self.connection.settimeout(self.server.idle_timeout)
        try:
            tls = self.server.tls_context.wrap_socket(self.connection, server_side=True)
        except OSError as error:  # ssl.SSLError and timeouts are OSErrors too
            log.info("TLS handshake with %s failed: %s", self.client_address[0],
                     escape_for_log(str(error)))
            return False
        self.request = tls
        self.setup()  # rfile and wfile over TLS now
        self.session.tls_started(f"{tls.version()} with cipher {tls.cipher()[0]}")
        return True

    def answer(self, replies: list[Reply]) -> None:
        """Send the session's replies, after any delay it asked for (a failed AUTH, an injected
        fault); an injected "disconnect" hangs up instead of sending its reply."""
        session = self.session
        for note in session.fault_notes:
            log.warning("injected fault for %s: %s", self.client_address[0], escape_for_log(note))
        session.fault_notes.clear()
        if session.delay:
            time.sleep(session.delay)
            session.delay = 0.0
        if session.closed and replies and replies[-1] is HANG_UP:
            replies = replies[:-1]  # the session stopped there: nothing follows it
        self.send(replies)

    def send(self, replies: list) -> None:
        if replies:
            self.wfile.write(b"".join([reply_.wire for reply_ in replies]))

    def send_last(self, reply_) -> None:
        """A reply on the way out: the client may already be gone, and that is fine."""
        try:
            self.send([reply_])
        except OSError:
            pass

    def hang_up(self) -> None:
        """From another thread: end the connection's reads, so its loop sees the end of input."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_RD)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# 9. The server
#
# Listener is socketserver's ThreadingTCPServer with the limits a long-running server needs:
# a deep listen backlog, a cap on connections, and a stop that lets messages in DATA finish.
# One listens for each port (SMTP, and SMTPS, POP3, POP3S when asked for). Server puts them,
# the web inbox and the relay together for use from Python (the CLI uses it, and so can a
# test suite): it runs in background threads and can list, await and clear the messages.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    maildir: str | os.PathLike = DEFAULT_MAILDIR
    hostname: str = field(default_factory=socket.gethostname)
    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
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
    faults: tuple[str, ...] = ()  # rules for failing on purpose (section 6)
    fail_seed: int | None = None  # makes the chances in those rules repeatable
    relay: str | None = None  # "host:port" of a real SMTP server to forward to (section 11)
    relay_user: str | None = None
    relay_password: str | None = None
    relay_tls: str = "starttls"  # "starttls", "tls" (from the first byte) or "none"
    relay_all: bool = False  # forward every message to its recipients as it arrives
    relay_match: str | None = None  # or only to the recipients that match this regex
    pop3_port: int | None = None  # POP3 over the same Maildir (section 12); None: off
    pop3s_port: int | None = None  # POP3 with TLS from the first byte

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_self_signed)

    def policy(self) -> Policy:
        return Policy(max_size=self.max_size, max_recipients=self.max_recipients,
                      tls_available=self.tls, tls_required=self.tls_required,
                      auth_required=self.auth_required, users=self.users)


class Listener(socketserver.ThreadingTCPServer):
    """One listening port: SMTP, SMTPS, POP3 or POP3S. make_session(peer) makes the session
    for each connection; with implicit_tls, TLS starts at the first byte (RFC 8314)."""

    daemon_threads = True
    block_on_close = False  # stop() waits for the sessions itself, with a deadline
    request_queue_size = 1024  # socketserver's listen backlog of 5 drops a burst of connections
    allow_reuse_address = os.name != "nt"  # on Windows it would let two servers share a port
    serving = False  # set when a thread runs serve_forever(): shutdown() waits for that thread

    def __init__(self, config: Config, port: int, make_session, tls_context=None,
                 implicit_tls: bool = False, idle_timeout: float | None = None) -> None:
        self.config, self.make_session = config, make_session
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.idle_timeout = config.timeout if idle_timeout is None else idle_timeout
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.stopping = False
        self._handlers: set[ConnectionHandler] = set()
        self._changed = threading.Condition()
        super().__init__((config.host, port), ConnectionHandler)

    def admit(self, handler: ConnectionHandler) -> str | None:
        """Register a new connection, or say why it is refused."""
        with self._changed:
            if self.stopping:
                return "shutdown"
            if len(self._handlers) >= self.config.max_connections:
                log.warning("refused a connection from %s: already %d connections",
                            handler.client_address[0], len(self._handlers))
                return "busy"
            self._handlers.add(handler)
            return None

    @property
    def connections(self) -> int:
        return len(self._handlers)

    def release(self, handler: ConnectionHandler) -> None:
        with self._changed:
            self._handlers.discard(handler)
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
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
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


@dataclass(frozen=True)
class StoredMessage:
    """A message in the Maildir, with the envelope it arrived with."""

    key: str  # its name in the Maildir, which is also the queue id in the 250 reply
    path: Path
    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def raw(self) -> bytes:
        return self.path.read_bytes()


def read_stored_message(path: str | Path) -> StoredMessage:
    path = Path(path)
    with open(path, "rb") as file:
        message = email.parser.BytesParser(policy=email.policy.default).parse(file)
    return StoredMessage(path.name, path, *envelope_of(message), message)


def envelope_of(message: EmailMessage) -> tuple[str, list[str]]:
    """The envelope sender and recipients, from the trace headers sheesh put on top."""
    sender, recipients = "", []
    for name, value in message.raw_items():  # our trace headers, on top, end at Received
        if name.lower() == "received":
            break
        # The parser keeps UTF-8 (SMTPUTF8 addresses) as surrogate escapes: undo that.
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
        if name.lower() == "return-path":
            sender = value.removeprefix("<").removesuffix(">")
        elif name.lower() == "delivered-to":
            recipients.append(value)
    return sender, recipients


class Server:
    """sheesh running in background threads, for the CLI and for test suites.

        with sheesh.Server(port=0, maildir=tmp_path / "mail") as smtp:
            smtplib.SMTP(smtp.host, smtp.port).sendmail("me@example.com", ["you@example.com"],
                                                         "Subject: hi\\r\\n\\r\\nHello")
            print(smtp.wait_for_message().message["Subject"])  # hi
    """

    def __init__(self, config: Config | None = None, **options) -> None:
        self.config = replace(config or Config(), **options)
        self.store = Maildir(self.config.maildir, self.config.hostname, fsync=self.config.fsync,
                             on_delivery=self._delivered)
        self._arrived: collections.deque[str] = collections.deque(maxlen=ARRIVALS_KEPT)
        self._arrival = threading.Condition()
        self._print_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self.address: tuple[str, int] = (self.config.host, self.config.port)
        self.ports: dict[str, int] = {}  # "smtp", "smtps", "pop3", "pop3s": the real ports
        self.pop3_locks = MaildropLocks()
        self.tls_context = None
        self.index: MessageIndex | None = None
        self.web: WebServer | None = None
        self.faults = FaultPlan([parse_fault(rule) for rule in self.config.faults],
                                self.config.fail_seed)
        self.relay = Relay(self.config) if self.config.relay else None
        self.policy = self.config.policy()
        self._relay_match = re.compile(self.config.relay_match) if self.config.relay_match else None

    def start(self) -> Server:
        """Create the Maildir, set up TLS, bind the ports and start serving. OSError (or
        ValueError, for a bad certificate) if any of it fails, with nothing left running."""
        if self.config.tls:
            self.tls_context = make_tls_context(self.config)
        self.store.create()
        try:
            config, context = self.config, self.tls_context
            for name, port, make_session, idle_timeout in [
                    ("smtp", config.port, self.smtp_session, config.timeout),
                    ("smtps", config.smtps_port, self.smtp_session, config.timeout),
                    ("pop3", config.pop3_port, self.pop3_session, POP3_TIMEOUT),
                    ("pop3s", config.pop3s_port, self.pop3_session, POP3_TIMEOUT)]:
                if port is not None:
                    listener = Listener(config, port, make_session, context,
                                        implicit_tls=name.endswith("s"), idle_timeout=idle_timeout)
                    self._listeners.append(listener)
                    self.ports[name] = listener.server_address[1]
            if self.config.http_port is not None:
                self.index = MessageIndex(self.store)
                self.web = WebServer(self.config.host, self.config.http_port,
                                     WebApp(self.index, self.faults, self.allowed_hosts(),
                                            self.relay))
        except OSError:
            self.stop()
            raise
        self.address = self._listeners[0].server_address[:2]
        if self.relay is not None:
            self.relay.start()
        for listener in self._listeners + ([self.web] if self.web else []):
            thread = threading.Thread(target=listener.serve_forever, args=(0.05,),
                                      name=f"sheesh-{listener.server_address[1]}", daemon=True)
            listener.serving = True
            thread.start()
            self._threads.append(thread)
        return self

    def smtp_session(self, peer: str) -> Session:
        return Session(self.store, self.config.hostname, peer, self.policy, faults=self.faults)

    def pop3_session(self, peer: str) -> Pop3Session:
        return Pop3Session(self.store, self.pop3_locks, self.config.users,
                           tls_available=self.tls_context is not None, peer=peer)

    def allowed_hosts(self) -> frozenset[str] | None:
        """The Host headers the web inbox answers: its own names, when it listens on loopback.
        Anything else is a page of another site that renamed itself (DNS rebinding)."""
        if not is_loopback(self.config.host):
            return None
        return frozenset({"localhost", "127.0.0.1", "[::1]", self.config.host,
                          self.config.hostname.lower()})

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
        if self.web is not None:
            self.index.close()  # ends the event streams and waits
            if self.web.serving:
                self.web.shutdown()
            self.web.server_close()
        if self.relay is not None:
            self.relay.stop()
        for thread in self._threads:
            thread.join()
        self._listeners, self._threads, self.web = [], [], None
        self.store.close()

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
    def active_connections(self) -> int:
        """How many clients are connected right now, on every port."""
        return sum(listener.connections for listener in self._listeners)

    def messages(self) -> list[StoredMessage]:
        """Every message in the Maildir, oldest first."""
        return [read_stored_message(self.store.path / key) for key in self.store.keys()]

    def wait_for_message(self, timeout: float = 5.0) -> StoredMessage:
        """The next message this server stored that no earlier call returned, waiting up to
        `timeout` seconds for it to arrive; TimeoutError if none does."""
        with self._arrival:
            if not self._arrival.wait_for(lambda: self._arrived, timeout):
                raise TimeoutError(f"no message arrived within {timeout} seconds")
            return read_stored_message(self._arrived.popleft())

    def clear(self) -> None:
        """Delete every message in the Maildir."""
        with self._arrival:
            self._arrived.clear()
            for key in self.store.keys():
                (self.store.path / key).unlink(missing_ok=True)

    def _delivered(self, delivery: Delivery) -> None:
        if self.index is not None:
            self.index.delivered(delivery)
        if self.relay is not None and (self.config.relay_all or self._relay_match):
            recipients = [r for r in delivery.envelope.recipients
                          if self._relay_match is None or self._relay_match.search(r)]
            if recipients:  # only to the allowed recipients: never an open relay
                self.relay.submit(delivery.queue_id, delivery.path, delivery.envelope.sender,
                                  recipients)
        with self._arrival:
            self._arrived.append(delivery.path)
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
    text = (f"from <{envelope.sender}> to {recipients} subject {subject_of(delivery.path)!r}"
            f" size {delivery.size} stored {delivery.path}")
    return escape_for_log(text)


def subject_of(path: str) -> str:
    """The Subject header, decoded from RFC 2047 words; "" if there is none or it is unreadable."""
    with open(path, "rb") as file:
        head = file.read(HEADER_SCAN_LIMIT)
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    return header_text(headers, "Subject")


# ---------------------------------------------------------------------------------------------
# 10. The web inbox and JSON API
#
# A page to read the mail in a browser, and a JSON API for tests, served by http.server from
# the same Maildir, at http://127.0.0.1:8025 (the port Mailpit and MailHog use). The same split
# as SMTP: MessageIndex keeps in memory the few headers the inbox lists, so that a page of a
# Maildir of 10,000 messages reads no file; WebApp turns a request into a Response and never
# touches a socket; WebHandler only moves bytes.
#
# Captured mail is hostile content. Every value from a message is put in the page as text (the
# page builds it with textContent, never innerHTML); an HTML part is shown in an <iframe sandbox>
# without scripts, under a Content-Security-Policy that blocks scripts and remote content until
# the reader asks for images; an id in a URL is only ever looked up, never made into a path.
# ---------------------------------------------------------------------------------------------

SUMMARY_READ_LIMIT = 256 * 1024  # the inbox summarises a message from at most its first 256 KiB
SEARCH_TEXT_LIMIT = 4096  # body search looks at this much of each message's text
PAGE_LIMIT_MAX = 500  # the most messages one API call lists
WAIT_TIMEOUT_MAX = 300.0  # the longest /api/messages/wait may hold a request
EVENT_KEEPALIVE = 15.0  # seconds between keep-alive comments on an idle event stream
EVENTS_KEPT = 1000  # events remembered for event streams that fell behind
REQUEST_BODY_LIMIT = 64 * 1024


@dataclass
class Summary:
    """What the inbox lists about one message."""

    id: str  # the Maildir key: the file name without its flags
    filename: str  # "new/<key>" or "cur/<key>:2,S"
    time: float
    size: int
    sender: str
    recipients: list[str]
    from_: str
    to: str
    subject: str
    attachments: int
    search_text: str  # lower case: from, to, envelope, subject and the start of the body

    @property
    def seen(self) -> bool:
        flags = self.filename.rpartition(MAILDIR_INFO)[2] if MAILDIR_INFO in self.filename else ""
        return "S" in flags

    def public(self) -> dict:
        return {"id": self.id, "time": self.time, "size": self.size, "sender": self.sender,
                "recipients": self.recipients, "from": self.from_, "to": self.to,
                "subject": self.subject, "attachments": self.attachments, "seen": self.seen}


# Maildir puts flags after ":2," in a file name; Windows cannot have ":" in a name, so the
# mailbox module uses "!" there instead.
MAILDIR_INFO = "!" if os.name == "nt" else ":"


def maildir_key(filename: str) -> str:
    return filename.split(MAILDIR_INFO, 1)[0]


def parse_message(data: bytes) -> EmailMessage:
    return email.parser.BytesParser(policy=email.policy.default).parsebytes(data)


def header_text(message: EmailMessage, name: str) -> str:
    """A header as readable text, decoded from RFC 2047; never an exception, whatever it holds."""
    try:
        value = message.get(name)
    except (ValueError, LookupError, IndexError, TypeError, AttributeError):
        value = message.get_all(name, failobj=[""])[0] if name in message else ""
    return "" if value is None else str(value).encode("utf-8", "replace").decode("utf-8")


def message_parts(message: EmailMessage) -> tuple[str, str, list[EmailMessage]]:
    """The text part, the HTML part and the attachments of a message."""
    text = html = None
    attachments = []
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        is_body = part.get_content_disposition() != "attachment" and part.get_filename() is None
        if is_body and kind == "text/plain" and text is None:
            text = part_text(part)
        elif is_body and kind == "text/html" and html is None:
            html = part_text(part)
        else:
            attachments.append(part)
    return text or "", html or "", attachments


def part_text(part: EmailMessage) -> str:
    """A text part decoded; an unknown or wrong charset gives replacement characters."""
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")  # lines as Python writes them; /raw has the bytes


def summarize(key: str, filename: str, data: bytes, size: int, mtime: float) -> Summary:
    message = parse_message(data)
    sender, recipients = envelope_of(message)
    try:
        text, html, attachments = message_parts(message)
    except Exception:  # a broken MIME structure: list the message, just without its parts
        text, html, attachments = "", "", []
    from_, to, subject = (header_text(message, name) for name in ("From", "To", "Subject"))
    search = " ".join([from_, to, sender, *recipients, subject, (text or html)[:SEARCH_TEXT_LIMIT]])
    return Summary(key, filename, delivery_time(key, mtime), size, sender, recipients, from_, to,
                   subject, len(attachments), search.lower())


def delivery_time(key: str, fallback: float) -> float:
    """When a message arrived, from its Maildir name ("seconds.M<microseconds>P..."), or the
    file's time for names that other programs made."""
    match = re.match(r"(\d+)\.M(\d{1,6})P", key)
    return int(match.group(1)) + int(match.group(2)) / 1e6 if match else fallback


class MessageIndex:
    """The inbox's view of the Maildir, in memory, and the events the page listens to."""

    def __init__(self, store: Maildir) -> None:
        self.store = store
        self._summaries: dict[str, Summary] = {}
        self._changed = threading.Condition()
        self._events: collections.deque[tuple[int, str, dict]] = collections.deque(
            maxlen=EVENTS_KEPT)
        self._event_number = 0
        self.closed = False

    def refresh(self) -> None:
        """Bring the index up to date with the folder: other programs (mutt) change it too.
        A scan of the names is cheap; only messages not seen before are read."""
        found = {}
        for sub in ("new", "cur"):
            with os.scandir(self.store.path / sub) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        found[maildir_key(entry.name)] = f"{sub}/{entry.name}"
        with self._changed:
            for key in self._summaries.keys() - found.keys():
                del self._summaries[key]
            known = {key: s.filename for key, s in self._summaries.items()}
        for key, filename in found.items():
            if known.get(key) != filename:
                self._add(key, filename)

    def _add(self, key: str, filename: str) -> None:
        path = self.store.path / filename
        try:
            with open(path, "rb") as file:
                data = file.read(SUMMARY_READ_LIMIT)
                stat = os.fstat(file.fileno())
        except OSError:
            return  # gone or moved since the scan: the next refresh sees where
        summary = summarize(key, filename, data, stat.st_size, stat.st_mtime)
        with self._changed:
            self._summaries[key] = summary

    def delivered(self, delivery: Delivery) -> None:
        """Called by the store, in the SMTP session's thread, for each message it accepts: so
        only announced here; it is read when someone asks for the list (refresh)."""
        with self._changed:
            self._publish("new", {"id": delivery.queue_id})
            self._changed.notify_all()

    def _publish(self, event: str, data: dict) -> None:
        self._event_number += 1
        self._events.append((self._event_number, event, data))

    def search(self, query: str, limit: int, offset: int) -> tuple[int, int, list[Summary]]:
        """(how many match, how many are unread, the page asked for), newest first."""
        words = query.lower().split()
        with self._changed:
            everything = list(self._summaries.values())
        matching = [s for s in everything if all(word in s.search_text for word in words)]
        matching.sort(key=lambda s: (s.time, s.id), reverse=True)
        unread = sum(not s.seen for s in everything)
        return len(matching), unread, matching[offset:offset + limit]

    def get(self, key: str) -> Summary | None:
        """The summary of one message; a key not known yet may have just arrived: look."""
        with self._changed:
            summary = self._summaries.get(key)
        if summary is None and len(key) < 256:
            self.refresh()
            with self._changed:
                summary = self._summaries.get(key)
        return summary

    def read(self, key: str) -> bytes | None:
        summary = self.get(key)
        if summary is None:
            return None
        try:
            return (self.store.path / summary.filename).read_bytes()
        except OSError:
            return None

    def mark_seen(self, key: str) -> bool:
        """Move a message to cur/ with the Seen flag, as mutt does when it is read."""
        summary = self.get(key)
        if summary is None:
            return False
        if not summary.seen:
            flags = summary.filename.partition(f"{MAILDIR_INFO}2,")[2]
            filename = f"cur/{key}{MAILDIR_INFO}2,{''.join(sorted(set(flags + 'S')))}"
            try:
                os.replace(self.store.path / summary.filename, self.store.path / filename)
            except OSError:
                return False
            with self._changed:
                summary.filename = filename
                self._publish("seen", {"id": key})
                self._changed.notify_all()
        return True

    def delete_all(self) -> int:
        with self._changed:
            keys = list(self._summaries)
        return self.delete(keys)

    def delete(self, keys: list[str]) -> int:
        deleted = 0
        for key in keys:
            summary = self.get(key)
            if summary is None:
                continue
            try:
                (self.store.path / summary.filename).unlink()
            except FileNotFoundError:
                pass
            with self._changed:
                self._summaries.pop(key, None)
                self._publish("deleted", {"id": key})
                self._changed.notify_all()
            deleted += 1
        return deleted

    def wait_for(self, query: str, after: float, timeout: float) -> Summary | None:
        """The newest message matching query that arrived after `after` (a Unix time),
        waiting up to `timeout` seconds for one to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            last_event = self.last_event
            self.refresh()
            found = self.search(query, 1, 0)[2]
            if found and found[0].time > after:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return None
            self.events_after(last_event, remaining)

    def events_after(self, number: int, timeout: float) -> list[tuple[int, str, dict]]:
        """Events after the given number, waiting up to `timeout` for the first one."""
        with self._changed:
            self._changed.wait_for(lambda: self.closed or self._event_number > number, timeout)
            return [event for event in self._events if event[0] > number]

    @property
    def last_event(self) -> int:
        return self._event_number

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


@dataclass
class Response:
    status: int
    body: bytes = b""
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
HTML_PART_POLICY = ("default-src 'none'; style-src 'unsafe-inline' data:; img-src data:{remote}; "
                    "font-src data:; frame-ancestors 'self'; sandbox allow-popups "
                    "allow-popups-to-escape-sandbox")


class WebApp:
    """The web inbox's routes: a request in, a Response out."""

    def __init__(self, index: MessageIndex, faults: FaultPlan | None = None,
                 allowed_hosts: frozenset[str] | None = None, relay: Relay | None = None) -> None:
        self.index, self.faults, self.relay = index, faults or FaultPlan(), relay
        self.allowed_hosts = allowed_hosts  # None: any Host header (listening beyond loopback)

    def respond(self, method: str, target: str, headers=None,
                body: bytes = b"") -> Response | EventStream:
        headers = headers or {}
        if (refusal := self.refuse_foreign(method, headers)) is not None:
            return refusal
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            return self.route(method, parts, query, body)
        except BadRequest as problem:
            return json_error(400, str(problem))

    def refuse_foreign(self, method: str, headers) -> Response | None:
        """Requests another web site makes the browser send are refused: a Host that is not
        ours (DNS rebinding), or a change of state asked for by a page of another origin."""
        host = (headers.get("Host") or "").rpartition(":")[0] or headers.get("Host") or ""
        if self.allowed_hosts is not None and host.lower() not in self.allowed_hosts:
            return json_error(403, "unknown Host")
        if method not in ("GET", "HEAD") and (headers.get("Sec-Fetch-Site") == "cross-site" or (
                headers.get("Origin") and urllib.parse.urlsplit(
                    headers["Origin"]).netloc != headers.get("Host"))):
            return json_error(403, "cross-origin requests cannot change the mail")
        return None

    def route(self, method: str, parts: list[str], query: dict, body: bytes):
        match method, parts:
            case "GET", []:
                return self.page()
            case "GET", ["api", "health"]:
                self.index.refresh()
                return json_response({"status": "ok", "version": __version__,
                                      "messages": self.index.search("", 0, 0)[0],
                                      "relay": self.relay is not None})
            case "GET", ["api", "messages"]:
                return self.list_messages(query)
            case "DELETE", ["api", "messages"]:
                self.index.refresh()
                return json_response({"deleted": self.index.delete_all()})
            case "GET", ["api", "messages", "latest"]:
                self.index.refresh()
                newest = self.index.search(query.get("query", ""), 1, 0)[2]
                return self.message(newest[0].id) if newest else json_error(404, "no messages")
            case "GET", ["api", "messages", "wait"]:
                return self.wait(query)
            case "GET", ["api", "messages", key]:
                return self.message(key)
            case "DELETE", ["api", "messages", key]:
                return (json_response({"deleted": 1}) if self.index.delete([key])
                        else json_error(404, "no such message"))
            case "POST", ["api", "messages", key, "release"]:
                return self.release(key, body)
            case "PUT", ["api", "messages", key, "seen"]:
                return (json_response({"seen": True}) if self.index.mark_seen(key)
                        else json_error(404, "no such message"))
            case "GET", ["api", "messages", key, "raw"]:
                return self.raw(key)
            case "GET", ["api", "messages", key, "html"]:
                return self.html_part(key, remote=query.get("remote") == "1")
            case "GET", ["api", "messages", key, "attachments", number]:
                return self.attachment(key, number)
            case "GET", ["api", "events"]:
                return EventStream(self.index.last_event)
            case "GET", ["api", "faults"]:
                return json_response(self.faults.public())
            case "PUT", ["api", "faults"]:
                return self.replace_faults(body)
            case _, ["api", *_]:
                return json_error(404 if method in ("GET", "DELETE", "PUT", "POST") else 405,
                                  f"no such endpoint: {method} /{'/'.join(parts)}")
            case _:
                return Response(404, b"Not found", "text/plain; charset=utf-8")

    def list_messages(self, query: dict) -> Response:
        text = query.get("query", "")
        limit, offset = number(query, "limit", 50), number(query, "offset", 0)
        if len(text) > 1000:
            raise BadRequest("query is longer than 1000 characters")
        self.index.refresh()
        total, unread, page = self.index.search(text, min(limit, PAGE_LIMIT_MAX), offset)
        return json_response({"total": total, "unread": unread, "offset": offset,
                              "messages": [summary.public() for summary in page]})

    def release(self, key: str, body: bytes) -> Response:
        """POST /api/messages/{id}/release {"to": [...]}: send a stored message on, to its
        own recipients or to the ones given."""
        if self.relay is None:
            return json_error(409, "no relay is configured (start sheesh with --relay HOST:PORT)")
        summary = self.index.get(key)
        if summary is None:
            return json_error(404, "no such message")
        try:
            recipients = json.loads(body or b"{}").get("to") or summary.recipients
        except (ValueError, AttributeError):
            raise BadRequest('the body must be JSON: {"to": ["address", ...]}') from None
        if not isinstance(recipients, list) or not all(
                isinstance(r, str) and is_valid_address(r, null_allowed=False) for r in recipients):
            raise BadRequest('"to" must be a list of addresses')
        path = str(self.index.store.path / summary.filename)
        if not self.relay.submit(key, path, summary.sender, recipients):
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
        except (ValueError, AttributeError) as error:  # json.JSONDecodeError is a ValueError
            raise BadRequest(str(error)) from None
        self.faults.replace(rules, seed)
        log.warning("fault rules replaced through the API: %s",
                    escape_for_log("; ".join(rule.text for rule in rules) or "none"))
        return json_response(self.faults.public())

    def wait(self, query: dict) -> Response:
        timeout = min(float(number(query, "timeout", 10)), WAIT_TIMEOUT_MAX)
        after = float(number(query, "after", 0))
        found = self.index.wait_for(query.get("query", ""), after, timeout)
        if found is None:
            return json_error(408, f"no message matching the query arrived in {timeout:g} s")
        return self.message(found.id)

    def message(self, key: str) -> Response:
        data, summary = self.index.read(key), self.index.get(key)
        if data is None or summary is None:
            return json_error(404, "no such message")
        message = parse_message(data)
        try:
            text, html, attachments = message_parts(message)
        except Exception:  # a broken MIME structure: show what can be shown
            text, html, attachments = data.decode("utf-8", "replace"), "", []
        url = f"/api/messages/{urllib.parse.quote(key)}"
        return json_response({
            **summary.public(),
            "relay": self.relay.history(key) if self.relay is not None else None,
            "headers": [[name, str(value).encode("utf-8", "replace").decode("utf-8")]
                        for name, value in message.raw_items()],
            "text": text, "html": html, "raw_url": f"{url}/raw",
            "html_url": f"{url}/html" if html else None,
            "attachments": [{"index": n, "filename": attachment_name(part, n),
                             "content_type": part.get_content_type(),
                             "size": len(part.get_payload(decode=True) or b""),
                             "url": f"{url}/attachments/{n}"}
                            for n, part in enumerate(attachments)]})

    def raw(self, key: str) -> Response:
        data = self.index.read(key)
        if data is None:
            return json_error(404, "no such message")
        return Response(200, data, "text/plain; charset=utf-8")

    def html_part(self, key: str, *, remote: bool) -> Response:
        data = self.index.read(key)
        if data is None:
            return json_error(404, "no such message")
        _, html, attachments = message_parts(parse_message(data))
        policy = HTML_PART_POLICY.format(remote=" https: http:" if remote else "")
        html = inline_cid_images(html, attachments)
        return Response(200, html.encode("utf-8"), "text/html; charset=utf-8",
                        {"Content-Security-Policy": policy})

    def attachment(self, key: str, number_text: str) -> Response:
        data = self.index.read(key)
        if data is None:
            return json_error(404, "no such message")
        attachments = message_parts(parse_message(data))[2]
        if not number_text.isdigit() or int(number_text) >= len(attachments):
            return json_error(404, "no such attachment")
        part = attachments[int(number_text)]
        name = attachment_name(part, int(number_text))
        ascii_name = name.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "_")
        disposition = (f"attachment; filename=\"{ascii_name}\"; "
                       f"filename*=UTF-8''{urllib.parse.quote(name)}")  # RFC 6266
        return Response(200, part.get_payload(decode=True) or b"", part.get_content_type(),
                        {"Content-Disposition": disposition})

    def page(self) -> Response:
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                  "img-src 'self' data:; frame-src 'self'; frame-ancestors 'none'")
        return Response(200, INBOX_PAGE.replace("{nonce}", nonce).encode("utf-8"),
                        "text/html; charset=utf-8", {"Content-Security-Policy": policy})


def inline_cid_images(html: str, parts: list[EmailMessage]) -> str:
    """Images an HTML part refers to as cid:ID (RFC 2392) come with the message: put each in
    the page as a data: URL, which the HTML part's policy allows and which fetches nothing."""
    by_id = {}
    for part in parts:
        content_id = (part.get("Content-ID") or "").strip().strip("<>")
        if content_id and part.get_content_maintype() == "image":
            encoded = base64.b64encode(part.get_payload(decode=True) or b"").decode()
            by_id[content_id] = f"data:{part.get_content_type()};base64,{encoded}"
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
    if not text.isdigit() or len(text) > 15:
        raise BadRequest(f"{name} must be a whole number, not {text[:20]!r}")
    return int(text)


def attachment_name(part: EmailMessage, number_: int) -> str:
    try:
        name = part.get_filename()
    except (ValueError, LookupError, TypeError):
        name = None
    # Only the last path component, and no control characters: it becomes a download's name.
    name = re.sub(r"[\x00-\x1f\x7f]", "", (name or "").replace("\\", "/").rpartition("/")[2])
    return name or f"attachment-{number_ + 1}"


class WebHandler(http.server.BaseHTTPRequestHandler):
    """The only code that reads or writes a web connection."""

    server_version = f"sheesh/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection is closed after a minute

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
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > REQUEST_BODY_LIMIT:
            self.send(json_error(413, "request body too large"))
            self.close_connection = True
            return
        body = self.rfile.read(int(length))
        try:
            response = self.server.app.respond("GET" if method == "HEAD" else method, self.path,
                                               self.headers, body)
        except Exception:
            log.exception("error answering %s", escape_for_log(self.path))
            response = json_error(500, "internal error")
        if isinstance(response, EventStream):
            self.stream_events(response.after)
        else:
            self.send(response, with_body=method != "HEAD")

    def send(self, response: Response, *, with_body: bool = True) -> None:
        self.send_response(response.status)
        headers = {"Content-Type": response.content_type,
                   "Content-Length": str(len(response.body)),
                   "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def stream_events(self, after: int) -> None:
        """Server-Sent Events: one "event:" and "data:" pair per change, until either side
        stops; a comment now and then keeps proxies from closing an idle stream."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff")):
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        index = self.server.app.index
        while not index.closed:
            events = index.events_after(after, EVENT_KEEPALIVE)
            chunk = "".join(f"event: {event}\ndata: {json.dumps(data)}\n\n"
                            for _, event, data in events) or ": keep-alive\n\n"
            if events:
                after = events[-1][0]
            self.wfile.write(chunk.encode("utf-8"))

    def log_message(self, format: str, *args) -> None:
        log.debug("web: %s %s", self.address_string(), escape_for_log(format % args))


class WebServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    serving = False  # as Listener.serving

    def __init__(self, host: str, port: int, app: WebApp) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        super().__init__((host, port), WebHandler)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a browser closing a tab is no error
            log.exception("error on a web connection from %s", client_address[0])


INBOX_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sheesh</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:#222;display:flex;height:100vh}
#list{width:42%;min-width:320px;border-right:1px solid #ccc;display:flex;flex-direction:column}
#bar{display:flex;gap:6px;padding:8px;border-bottom:1px solid #ccc}
#bar input{flex:1;padding:4px}
#rows{overflow:auto;flex:1}
.row{padding:6px 10px;border-bottom:1px solid #eee;cursor:pointer}
.row:hover,.row.open{background:#eef4ff}
.row.unread .subject{font-weight:bold}
.meta{color:#666;font-size:12px;display:flex;justify-content:space-between;gap:8px}
.subject{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#pager{padding:6px 10px;border-top:1px solid #ccc;display:flex;justify-content:space-between}
#view{flex:1;overflow:auto;padding:12px 16px}
table.envelope td{padding:1px 8px 1px 0;vertical-align:top}
table.envelope td:first-child{color:#666;white-space:nowrap}
#tabs button.on{background:#dde8ff}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:8px}
iframe{width:100%;height:60vh;border:1px solid #ccc}
.empty{color:#888;padding:20px}
</style></head>
<body>
<section id="list">
  <div id="bar"><input id="search" type="search" placeholder="Search sender, recipients, subject, body">
  <button id="delete-all">Delete all</button></div>
  <div id="rows"><p class="empty">Loading...</p></div>
  <div id="pager"><button id="newer">Newer</button><span id="count"></span>
  <button id="older">Older</button></div>
</section>
<main id="view"><p class="empty">Mail sent to sheesh shows up here as it arrives.</p></main>
<script nonce="{nonce}">
"use strict";
// Every value that comes from a message goes into the page as text, never as HTML.
const PAGE = 50;
let offset = 0, query = "", openId = null;
const $ = (selector) => document.querySelector(selector);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  node.append(...children.map((child) => child instanceof Node ? child : String(child)));
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) throw new Error((await response.json()).error || response.statusText);
  return response.json();
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

async function loadList() {
  const data = await api(`/api/messages?limit=${PAGE}&offset=${offset}` +
                         `&query=${encodeURIComponent(query)}`);
  const rows = data.messages.map((m) => {
    const row = el("div", {"class": "row" + (m.seen ? "" : " unread") +
                              (m.id === openId ? " open" : ""), "data-id": m.id},
      el("div", {"class": "meta"}, el("span", {}, m.from || m.sender || "<>"),
         el("span", {}, when(m.time))),
      el("div", {"class": "subject"}, m.subject || "(no subject)"),
      el("div", {"class": "meta"}, el("span", {}, "to " + m.recipients.join(", ")),
         el("span", {}, (m.attachments ? `${m.attachments} attached, ` : "") +
            Math.ceil(m.size / 1024) + " KB")));
    row.addEventListener("click", () => show(m.id));
    return row;
  });
  $("#rows").replaceChildren(...(rows.length ? rows : [el("p", {"class": "empty"}, "No mail.")]));
  $("#count").textContent = data.total ? `${offset + 1}-${offset + data.messages.length} of ` +
                                         `${data.total}` : "";
  $("#newer").disabled = offset === 0;
  $("#older").disabled = offset + PAGE >= data.total;
  document.title = (data.unread ? `(${data.unread}) ` : "") + "sheesh";
}

async function show(id) {
  openId = id;
  const m = await api(`/api/messages/${encodeURIComponent(id)}`);
  if (!m.seen) api(`/api/messages/${encodeURIComponent(id)}/seen`, {method: "PUT"}).catch(() => {});
  const envelope = el("table", {"class": "envelope"});
  const line = (name, value) => envelope.append(el("tr", {}, el("td", {}, name), el("td", {}, value)));
  line("MAIL FROM", "<" + m.sender + ">");
  line("RCPT TO", m.recipients.map((r) => "<" + r + ">").join(", "));
  line("From", m.from); line("To", m.to); line("Received", when(m.time));
  const body = el("div");
  const tabs = el("div", {"id": "tabs"});
  const views = {
    "Text": () => el("pre", {}, m.text || "(no text part)"),
    "HTML": () => {
      if (!m.html_url) return el("p", {"class": "empty"}, "(no HTML part)");
      const frame = el("iframe", {"sandbox": "allow-popups allow-popups-to-escape-sandbox",
                                   "src": m.html_url, "title": "HTML part"});
      const images = el("button", {}, "Load remote images");
      images.addEventListener("click", () => { frame.src = m.html_url + "?remote=1"; });
      return el("div", {}, images, frame);
    },
    "Headers": () => el("pre", {}, m.headers.map(([n, v]) => n + ": " + v).join("\\n")),
    "Raw": () => {
      const pre = el("pre", {}, "Loading...");
      fetch(m.raw_url).then((r) => r.text()).then((text) => { pre.textContent = text; });
      return pre;
    },
  };
  for (const name of Object.keys(views)) {
    const button = el("button", {}, name);
    button.addEventListener("click", () => {
      for (const other of tabs.children) other.classList.toggle("on", other === button);
      body.replaceChildren(views[name]());
    });
    tabs.append(button);
  }
  const attachments = el("ul");
  for (const a of m.attachments) {
    attachments.append(el("li", {}, el("a", {"href": a.url, "download": a.filename}, a.filename),
                          ` (${a.content_type}, ${a.size} bytes)`));
  }
  const remove = el("button", {}, "Delete");
  remove.addEventListener("click", async () => {
    await api(`/api/messages/${encodeURIComponent(id)}`, {method: "DELETE"});
    $("#view").replaceChildren(el("p", {"class": "empty"}, "Deleted."));
  });
  const actions = el("p", {}, remove);
  if (m.relay !== null) {
    const release = el("button", {}, "Release");
    release.addEventListener("click", async () => {
      const to = prompt("Release to (comma-separated)", m.recipients.join(", "));
      if (!to) return;
      const answer = await api(`/api/messages/${encodeURIComponent(id)}/release`, {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({to: to.split(",").map((a) => a.trim()).filter(Boolean)})});
      actions.append(" queued for " + answer.to.join(", "));
    });
    actions.append(" ", release);
    for (const attempt of m.relay) {
      line("Relay", `${when(attempt.time)}: ${attempt.to.join(", ")}: ${attempt.outcome}`);
    }
  }
  $("#view").replaceChildren(el("h2", {}, m.subject || "(no subject)"), envelope, actions, tabs,
                             body, ...(m.attachments.length ? [el("h3", {}, "Attachments"),
                                                               attachments] : []));
  tabs.children[m.html_url && !m.text ? 1 : 0].click();
  loadList();
}

let timer = null;
function soon() { clearTimeout(timer); timer = setTimeout(loadList, 150); }
$("#search").addEventListener("input", (e) => { query = e.target.value; offset = 0; soon(); });
$("#newer").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadList(); });
$("#older").addEventListener("click", () => { offset += PAGE; loadList(); });
$("#delete-all").addEventListener("click", async () => {
  if (confirm("Delete every message?")) { await api("/api/messages", {method: "DELETE"}); }
});
const events = new EventSource("/api/events");
for (const kind of ["new", "deleted", "seen"]) events.addEventListener(kind, soon);
loadList();
</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# 11. Forwarding: relay and release to a real SMTP server
#
# "Why does my mail not show up in my Gmail?" Because a sink keeps it. With --relay HOST:PORT,
# a message can be sent on: released by hand (the API, or the page's button), or relayed as it
# arrives (--relay-all, or --relay-match REGEX for an allow-list of recipients). The message is
# stored and acknowledged first; one worker thread sends it afterwards, so relaying never slows
# a session, and a dead upstream never loses the stored copy. A temporary failure (a 4xx, a
# refused connection, a timeout) is tried again after 2, 4, 8 and 16 seconds; a permanent
# one (a 5xx) is not. sheesh relays nothing unless one of these options is given.
# ---------------------------------------------------------------------------------------------

RELAY_ATTEMPTS = 5  # the first try and four retries
RELAY_FIRST_RETRY = 2.0  # seconds; each later wait is twice the one before
RELAY_QUEUE_LIMIT = 1000  # messages waiting to be relayed; past that, new ones are not queued
RELAY_TIMEOUT = 30.0  # seconds the upstream server has for each step
RELAY_HISTORY_KEPT = 10_000  # messages whose relay attempts the API can show


def strip_trace_headers(raw: bytes) -> bytes:
    """The message as it was sent: without the Return-Path, Delivered-To and Received lines
    that sheesh put on top (the Received header ends where a line does not start with a tab)."""
    position = 0
    while raw.startswith((b"Return-Path:", b"Delivered-To:"), position):
        position = raw.index(b"\r\n", position) + 2
    if raw.startswith(b"Received:", position):
        position = raw.index(b"\r\n", position) + 2
        while raw.startswith(b"\t", position):
            position = raw.index(b"\r\n", position) + 2
    return raw[position:]


@dataclass
class RelayJob:
    key: str
    path: str
    sender: str
    recipients: list[str]
    attempts: int = 0


class Relay:
    """Sends stored messages on to another SMTP server, from one worker thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        host, _, port = config.relay.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._queue: list[tuple[float, int, RelayJob]] = []  # a heap, by when each is due
        self._numbers = itertools.count()
        self._changed = threading.Condition()
        self._history: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sheesh-relay", daemon=True)

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
            log.warning("relay: %d message(s) were still waiting and were not sent (they stay "
                        "stored)", left)

    def submit(self, key: str, path: str, sender: str, recipients: list[str]) -> bool:
        """Queue a message; False if the queue is full (it stays stored all the same)."""
        with self._changed:
            if len(self._queue) >= RELAY_QUEUE_LIMIT:
                log.warning("relay: queue full, not relaying %s", key)
                self._record(key, recipients, "not queued: the relay queue is full")
                return False
            job = RelayJob(key, path, sender, list(recipients))
            heapq.heappush(self._queue, (time.monotonic(), next(self._numbers), job))
            self._changed.notify_all()
            return True

    def history(self, key: str) -> list[dict]:
        with self._changed:
            return list(self._history.get(key, []))

    def _record(self, key: str, recipients: list[str], outcome: str) -> None:
        entries = self._history.setdefault(key, [])
        entries.append({"time": time.time(), "to": recipients, "outcome": outcome})
        self._history.move_to_end(key)
        while len(self._history) > RELAY_HISTORY_KEPT:
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
            self._attempt(job)

    def _attempt(self, job: RelayJob) -> None:
        job.attempts += 1
        try:
            refused = self.send(job)
            failed = {recipient: (code, text.decode("utf-8", "replace"))
                      for recipient, (code, text) in refused.items()}
        except smtplib.SMTPRecipientsRefused as error:
            failed = {r: (code, text.decode("utf-8", "replace"))
                      for r, (code, text) in error.recipients.items()}
        except smtplib.SMTPResponseException as error:
            text = error.smtp_error.decode("utf-8", "replace") if isinstance(
                error.smtp_error, bytes) else str(error.smtp_error)
            failed = {recipient: (error.smtp_code, text) for recipient in job.recipients}
        except (OSError, smtplib.SMTPException) as error:  # refused, timed out, hung up
            failed = {recipient: (421, f"{type(error).__name__}: {error}")
                      for recipient in job.recipients}
        sent = [r for r in job.recipients if r not in failed]
        later = [r for r, (code, _) in failed.items() if 400 <= code < 500]
        self._report(job, sent, failed, later)
        if later and job.attempts < RELAY_ATTEMPTS:
            delay = RELAY_FIRST_RETRY * 2 ** (job.attempts - 1)
            job.recipients = later
            with self._changed:
                heapq.heappush(self._queue, (time.monotonic() + delay, next(self._numbers), job))
                self._changed.notify_all()

    def _report(self, job: RelayJob, sent: list[str], failed: dict, later: list[str]) -> None:
        with self._changed:
            if sent:
                self._record(job.key, sent, "sent")
            for recipient, (code, text) in failed.items():
                final = recipient not in later or job.attempts >= RELAY_ATTEMPTS
                outcome = (f"{'failed' if final else 'will retry'}: {code} {text}"
                           if code < 500 else f"refused: {code} {text}")
                self._record(job.key, [recipient], outcome)
        log.info("relay of %s, attempt %d: %s", job.key, job.attempts, escape_for_log(
            "; ".join([f"sent to {', '.join(sent)}"] * bool(sent)
                      + [f"{r}: {c} {t}" for r, (c, t) in failed.items()])))

    def send(self, job: RelayJob) -> dict:
        """One attempt: the stored bytes, less sheesh's trace headers, from the original sender."""
        with open(job.path, "rb") as file:
            data = strip_trace_headers(file.read())
        config = self.config
        # The system's trusted certificates, checked: smtplib's own default checks nothing.
        context = ssl.create_default_context() if config.relay_tls != "none" else None
        if config.relay_tls == "tls":
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=RELAY_TIMEOUT,
                                      context=context)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=RELAY_TIMEOUT)
        with client:
            client.ehlo_or_helo_if_needed()
            if config.relay_tls == "starttls":
                client.starttls(context=context)
                client.ehlo()
            if config.relay_user:
                client.login(config.relay_user, config.relay_password or "")
            options = []
            if any(byte > 127 for byte in data) and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not (job.sender + "".join(job.recipients)).isascii():
                options.append("SMTPUTF8")
            return client.sendmail(job.sender, job.recipients, data, options)


def sendmail_main(argv: list[str]) -> int:
    """python sheesh.py sendmail [-t] [-f SENDER] [-i] [RECIPIENT...] < message

    A sendmail-compatible way in, for programs that call /usr/sbin/sendmail (PHP's mail(),
    cron, git send-email): the message on standard input goes to a running sheesh by SMTP.
    Exit status as sendmail's (sysexits.h): 64 bad usage, 69 refused, 75 try again later.
    """
    options = build_sendmail_parser().parse_args(argv)
    data, recipients = sys.stdin.buffer.read(), list(options.recipients)
    if options.from_headers:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        fields = [value for name in ("To", "Cc", "Bcc") for value in headers.get_all(name, [])]
        recipients += [address for _, address in email.utils.getaddresses(fields) if address]
        data = remove_header(data, b"Bcc")
    if not recipients:
        print("sheesh sendmail: no recipients (give them as arguments, or use -t)",
              file=sys.stderr)
        return 64
    # Programs hand sendmail lines ending in LF; SMTP wants CRLF (RFC 5321 section 2.3.8),
    # and smtplib leaves bytes as they are.
    data = re.sub(rb"\r?\n", b"\r\n", data)
    sender = options.sender or f"{os.environ.get('USER') or 'sheesh'}@{socket.gethostname()}"
    return submit(options.host, options.port, sender, recipients, data)


def build_sendmail_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sheesh sendmail", description=sendmail_main.__doc__.split(
        "\n\n")[1].strip())
    parser.usage_error_status = 64  # EX_USAGE, as sendmail
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT")
    parser.add_argument("-t", dest="from_headers", action="store_true",
                        help="also send to the To, Cc and Bcc headers' addresses; remove Bcc")
    parser.add_argument("-f", "-r", dest="sender", help="the envelope sender")
    parser.add_argument("-F", dest="full_name", help="ignored (the sender's full name)")
    parser.add_argument("-i", "-oi", dest="ignore_dots", action="store_true",
                        help="ignored: a lone dot never ends the message here")
    parser.add_argument("-o", dest="other_options", action="append", metavar="OPTION",
                        help="ignored, for -oem, -odi and the like")
    parser.add_argument("-B", dest="body_type", help="ignored (7BIT or 8BITMIME)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="where sheesh listens")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT)
    return parser


def submit(host: str, port: int, sender: str, recipients: list[str], data: bytes) -> int:
    """Send one message by SMTP; the exit status, with a one-line message on failure."""
    try:
        with smtplib.SMTP(host, port, timeout=RELAY_TIMEOUT) as client:
            refused = client.sendmail(sender, recipients, data)
    except smtplib.SMTPResponseException as error:
        print(f"sheesh sendmail: refused: {error.smtp_code} "
              f"{error.smtp_error.decode('utf-8', 'replace')}", file=sys.stderr)
        return 75 if 400 <= error.smtp_code < 500 else 69
    except smtplib.SMTPRecipientsRefused as error:
        print(f"sheesh sendmail: every recipient was refused: {error.recipients}",
              file=sys.stderr)
        return 69
    except (OSError, smtplib.SMTPException) as error:
        print(f"sheesh sendmail: cannot send to {host} port {port}: "
              f"{getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 69 if isinstance(error, ConnectionRefusedError) else 75
    for recipient, (code, text) in refused.items():
        print(f"sheesh sendmail: {recipient} refused: {code} {text.decode('utf-8', 'replace')}",
              file=sys.stderr)
    return 69 if refused else 0


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
# 12. POP3: read the captured mail from any mail client
#
# POP3 (RFC 1939) is how Thunderbird, mutt, fetchmail or Python's poplib download mail. A
# session has three stages: AUTHORIZATION (USER and PASS), TRANSACTION (STAT, LIST, RETR, TOP,
# UIDL, DELE, RSET, NOOP) and UPDATE, which happens at QUIT: only then are the messages marked
# with DELE deleted. A connection that drops without QUIT deletes nothing. Replies start with
# "+OK" or "-ERR"; a reply of several lines ends with a line holding a dot, and dots that
# start a line are doubled, as in SMTP's DATA. Pop3Session is pure like Session: the handler
# of section 8 carries its bytes.
#
# The maildrop is the Maildir. A user name that is an email address sees only the messages
# delivered to that address (an envelope recipient); any other name sees every message.
# ---------------------------------------------------------------------------------------------

POP3_TIMEOUT = 600.0  # RFC 1939 section 3: an idle timer of at least 10 minutes
POP3_HEAD_LIMIT = 64 * 1024  # how much of a message is read to learn its recipients


class Pop3State(enum.Enum):
    AUTHORIZATION = "waiting for USER and PASS"
    TRANSACTION = "logged in"
    CLOSED = "closed"


@dataclass(frozen=True)
class Pop3Reply:
    wire: bytes


def pop3_ok(text: str = "") -> Pop3Reply:
    return Pop3Reply(f"+OK {text}".rstrip().encode("utf-8") + b"\r\n")


def pop3_error(text: str) -> Pop3Reply:
    return Pop3Reply(f"-ERR {text}".encode("utf-8") + b"\r\n")


def pop3_lines(first_line: str, body: bytes) -> Pop3Reply:
    """A multi-line reply (RFC 1939 section 3): lines ending in CRLF, each leading dot doubled,
    then a line with a single dot."""
    stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    return Pop3Reply(pop3_ok(first_line).wire + stuffed + b".\r\n")


def with_crlf(data: bytes) -> bytes:
    """A message as POP3 sends it: every line ending in CRLF, the last one too."""
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


@dataclass
class DropMessage:
    key: str  # the Maildir key: the UIDL, stable across sessions
    filename: str
    size: int  # octets as RETR sends them (RFC 1939: with CRLF, before dot-stuffing)


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

    def release(self, maildrop: str) -> None:
        with self._lock:
            self._held.discard(maildrop)


def open_maildrop(store: Maildir, user: str) -> list[DropMessage]:
    """The messages a user sees, oldest first: for an address, those delivered to it."""
    address = user.lower() if "@" in user else None
    messages = []
    for filename in store.keys():
        try:
            data = (store.path / filename).read_bytes()
        except OSError:
            continue  # deleted meanwhile
        if address is not None:
            head = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                data[:POP3_HEAD_LIMIT])
            if address not in (r.lower() for r in envelope_of(head)[1]):
                continue
        messages.append(DropMessage(maildir_key(filename.split("/", 1)[1]), filename,
                                    len(with_crlf(data))))
    return messages


@dataclass
class Pop3Session:
    """One POP3 conversation: bytes in, replies out."""

    store: Maildir  # where the maildrop is: keys(), path
    locks: MaildropLocks
    users: dict[str, str] | None = None  # as for SMTP AUTH: None accepts any user and password
    tls_available: bool = False
    peer: str = ""
    state: Pop3State = Pop3State.AUTHORIZATION
    user: str | None = None
    tls: str | None = None
    tls_requested: bool = False
    maildrop: list[DropMessage] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)  # message numbers marked by DELE
    unknown_commands: int = 0
    auth_failures: int = 0
    closing_note: str = ""
    fault_notes: list[str] = field(default_factory=list)  # (the handler reads these)
    delay: float = 0.0
    in_data: bool = False
    _maildrop_name: str | None = None  # the maildrop this session has locked
    _unread: bytes = b""
    _overlong: bool = False

    def greeting(self) -> Pop3Reply:
        return pop3_ok("sheesh POP3 server ready")

    def goodbye(self, reason: str) -> Pop3Reply:
        return pop3_error({"timeout": "[SYS/TEMP] timeout, goodbye",
                           "shutdown": "[SYS/TEMP] server shutting down, goodbye",
                           "busy": "[SYS/TEMP] too many connections, try again later",
                           "error": "[SYS/TEMP] internal server error, goodbye"}[reason])

    @property
    def closed(self) -> bool:
        return self.state is Pop3State.CLOSED

    @property
    def busy(self) -> bool:
        return bool(self._unread) or self._overlong

    def receive(self, data: bytes) -> list[Pop3Reply]:
        """Lines in, replies out, in order (RFC 2449 PIPELINING)."""
        buffer, position, replies = self._unread + data, 0, []
        while not self.closed and not self.tls_requested:
            end = buffer.find(b"\n", position)
            if end < 0:
                break
            raw, position = buffer[position:end], end + 1
            if self._overlong or len(raw) >= COMMAND_LINE_LIMIT:
                self._overlong = False
                replies.append(pop3_error("line too long"))
                continue
            replies.append(self.handle_line(raw.removesuffix(b"\r").decode("utf-8", "replace")))
        partial = b"" if self.closed or self.tls_requested else buffer[position:]
        self._overlong = self._overlong or len(partial) >= COMMAND_LINE_LIMIT
        self._unread = b"" if self._overlong else partial
        return replies

    def handle_line(self, line: str) -> Pop3Reply:
        verb, _, argument = line.strip().partition(" ")
        verb, argument = verb.upper(), argument.strip()
        logged_in = self.state is Pop3State.TRANSACTION
        match verb:
            case "CAPA":
                return self.capabilities()
            case "QUIT":
                return self.quit()
            case "NOOP" if logged_in:
                return pop3_ok()
            case "USER" if not logged_in:
                self.user = argument or None
                return pop3_ok("send PASS") if argument else pop3_error("usage: USER name")
            case "PASS" if not logged_in:
                return self.password(argument)
            case "STLS" if not logged_in:
                return self.starttls()
            case "STAT" if logged_in:
                live = self.live()
                return pop3_ok(f"{len(live)} {sum(m.size for _, m in live)}")
            case "LIST" | "UIDL" if logged_in:
                return self.listing(verb, argument)
            case "RETR" if logged_in:
                return self.retrieve(argument, None)
            case "TOP" if logged_in:
                number, _, lines = argument.partition(" ")
                if not lines.strip().isdigit():
                    return pop3_error("usage: TOP message lines")
                return self.retrieve(number, int(lines))
            case "DELE" if logged_in:
                return self.delete(argument)
            case "RSET" if logged_in:
                self.deleted.clear()
                return pop3_ok(f"{len(self.maildrop)} messages")
            case "USER" | "PASS" | "STLS" | "APOP" | "AUTH":
                return pop3_error("not in this state" if logged_in else "not supported")
            case "STAT" | "LIST" | "UIDL" | "RETR" | "TOP" | "DELE" | "RSET" | "NOOP":
                return pop3_error("log in first (USER and PASS)")
            case _:
                self.unknown_commands += 1
                if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
                    self.state, self.closing_note = Pop3State.CLOSED, "too many bad commands"
                    return pop3_error("too many unknown commands, goodbye")
                return pop3_error("unknown command")

    def capabilities(self) -> Pop3Reply:
        """CAPA (RFC 2449): what this server supports."""
        lines = ["TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                 f"IMPLEMENTATION sheesh-{__version__}"]
        if self.tls_available and self.tls is None and self.state is Pop3State.AUTHORIZATION:
            lines.append("STLS")
        return pop3_lines("capability list follows", "".join(f"{line}\r\n"
                                                              for line in lines).encode())

    def starttls(self) -> Pop3Reply:
        """STLS (RFC 2595), with the same care as SMTP's STARTTLS for what came before it."""
        if not self.tls_available or self.tls is not None:
            return pop3_error("TLS is not available" if self.tls is None else "TLS is already on")
        self.tls_requested = True
        return pop3_ok("begin TLS negotiation")

    def tls_started(self, description: str) -> None:
        self.tls, self.tls_requested, self.user = description, False, None

    def password(self, password: str) -> Pop3Reply:
        if self.user is None:
            return pop3_error("send USER first")
        if self.users is not None and not password_matches(self.users, self.user,
                                                           password.encode()):
            self.auth_failures += 1
            self.delay += AUTH_FAILURE_DELAY
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.state, self.closing_note = Pop3State.CLOSED, "too many failed logins"
            return pop3_error("[AUTH] invalid user name or password")
        name = self.user.lower() if "@" in self.user else "*"
        if not self.locks.acquire(name):
            return pop3_error("[IN-USE] the maildrop is open in another session")
        self._maildrop_name = name
        try:
            self.maildrop = open_maildrop(self.store, self.user)
        except OSError:
            self.release()
            return pop3_error("[SYS/TEMP] cannot read the maildrop")
        self.state = Pop3State.TRANSACTION
        return pop3_ok(f"{len(self.maildrop)} messages")

    def live(self) -> list[tuple[int, DropMessage]]:
        return [(n, m) for n, m in enumerate(self.maildrop, 1) if n not in self.deleted]

    def message(self, number_text: str) -> DropMessage | Pop3Reply:
        """The message with that number, or the error to send."""
        if not number_text.isdigit() or not 0 < int(number_text) <= len(self.maildrop):
            return pop3_error("no such message")
        if int(number_text) in self.deleted:
            return pop3_error("message already deleted")
        return self.maildrop[int(number_text) - 1]

    def listing(self, verb: str, argument: str) -> Pop3Reply:
        column = (lambda m: str(m.size)) if verb == "LIST" else (lambda m: m.key)
        if argument:
            found = self.message(argument)
            return found if isinstance(found, Pop3Reply) else pop3_ok(
                f"{argument} {column(found)}")
        lines = "".join(f"{n} {column(m)}\r\n" for n, m in self.live())
        return pop3_lines(f"{len(self.live())} messages", lines.encode())

    def retrieve(self, number: str, top_lines: int | None) -> Pop3Reply:
        found = self.message(number)
        if isinstance(found, Pop3Reply):
            return found
        try:
            data = with_crlf((self.store.path / found.filename).read_bytes())
        except OSError:
            return pop3_error("[SYS/TEMP] the message is gone")
        if top_lines is not None:  # TOP: the headers, the blank line, and n lines of the body
            head, blank, body = data.partition(b"\r\n\r\n")
            kept = b"".join(body.splitlines(keepends=True)[:top_lines])
            data = head + blank + kept if blank else with_crlf(head)
        return pop3_lines(f"{found.size} octets", data)

    def delete(self, number: str) -> Pop3Reply:
        found = self.message(number)
        if isinstance(found, Pop3Reply):
            return found
        self.deleted.add(int(number))
        return pop3_ok(f"message {number} deleted")

    def quit(self) -> Pop3Reply:
        """QUIT: in TRANSACTION, the UPDATE state: remove what DELE marked, one file at a time
        (each removal is atomic), then let the maildrop go."""
        failed = 0
        if self.state is Pop3State.TRANSACTION:
            for number in sorted(self.deleted):
                try:
                    (self.store.path / self.maildrop[number - 1].filename).unlink()
                except FileNotFoundError:
                    pass  # someone else deleted it: it is gone all the same
                except OSError:
                    failed += 1
        self.release()
        self.state = Pop3State.CLOSED
        if failed:
            return pop3_error(f"[SYS/TEMP] {failed} messages could not be deleted")
        return pop3_ok("sheesh POP3 server signing off")

    def release(self) -> None:
        if self._maildrop_name is not None:
            self.locks.release(self._maildrop_name)
            self._maildrop_name = None

    def connection_lost(self) -> None:
        """A connection that ends without QUIT deletes nothing (RFC 1939 section 6)."""
        self.release()
        self.state = Pop3State.CLOSED


# ---------------------------------------------------------------------------------------------
# 13. The CLI
# ---------------------------------------------------------------------------------------------


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
        cpu = allowed[-1]  # CPU 0 tends to take more of the machine's interrupts
    else:
        cpu = int(choice)
    os.sched_setaffinity(0, {cpu})
    return cpu


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sheesh", description="A one-file SMTP server that stores every message it is sent "
        "in a Maildir.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                        "several (2-3x faster under load: see README), 'all' on every CPU, "
                        "a number on that CPU (Linux only; elsewhere every CPU)")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    parser.add_argument("--print", dest="print_messages", action="store_true",
                        help="also print each message, with its envelope, to standard output")
    parser.add_argument("--http-port", type=port_number, default=8025,
                        help="port of the web inbox and JSON API (the port Mailpit uses)")
    parser.add_argument("--no-http", dest="http_port", action="store_const", const=None,
                        help="no web inbox")
    parser.add_argument("--version", action="version", version=f"sheesh {__version__}")
    add_fault_options(parser.add_argument_group("failing on purpose (see README, Fault "
                                                "injection)"))
    add_pop3_options(parser.add_argument_group("POP3 (see README, POP3)"))
    add_relay_options(parser.add_argument_group("forwarding (see README, Forwarding)"))
    add_tls_options(parser.add_argument_group("TLS and authentication"))
    return parser


def add_fault_options(failing) -> None:
    failing.add_argument("--fail", dest="faults", metavar="RULE", action="append",
                         type=fault_rule, default=[],
                         help="inject a failure: " + FAULT_SYNTAX.replace("%", "%%"))
    failing.add_argument("--fail-seed", type=int, metavar="N",
                         help="seed for the chances in --fail rules, to replay a run")


def add_pop3_options(pop3) -> None:
    pop3.add_argument("--pop3-port", type=port_number, metavar="PORT",
                      help="also serve the Maildir over POP3 here (Mailpit uses 1110)")
    pop3.add_argument("--pop3s-port", type=port_number, metavar="PORT",
                      help="and over POP3 with TLS from the first byte (needs a certificate)")


def add_relay_options(relay) -> None:
    relay.add_argument("--relay", metavar="HOST:PORT", type=host_and_port,
                       help="a real SMTP server to release messages to")
    relay.add_argument("--relay-user", help="user name to log in to it with")
    relay.add_argument("--relay-password", help="its password; better, set the environment "
                       "variable SHEESH_RELAY_PASSWORD, which the shell's history does not keep")
    relay.add_argument("--relay-tls", choices=("starttls", "tls", "none"), default="starttls",
                       help="how to talk to it: STARTTLS, TLS from the first byte, or plain")
    automatic = relay.add_mutually_exclusive_group()
    automatic.add_argument("--relay-all", action="store_true",
                           help="relay every message to its recipients as it arrives")
    automatic.add_argument("--relay-match", metavar="REGEX", type=regex,
                           help="relay as they arrive, but only to recipients matching REGEX")


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


def host_and_port(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text}")
    return text


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {error}")
    return text


def fault_rule(text: str) -> str:
    try:
        parse_fault(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
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
                          ("--tls-required", options["tls_required"])):
        if given:
            return f"{option} needs --tls-cert and --tls-key, or --tls-self-signed"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        return sendmail_main(argv[1:])
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    if problem := check_tls_options(options):
        parser.error(problem)
    if (options["relay_all"] or options["relay_match"]) and not options["relay"]:
        parser.error("--relay-all and --relay-match need --relay HOST:PORT")
    quiet, cpu_choice_ = options.pop("quiet"), options.pop("cpu")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    options["faults"] = tuple(options["faults"])
    if options["relay_password"] is None:  # from the environment: never shown by --help
        options["relay_password"] = os.environ.get("SHEESH_RELAY_PASSWORD")
    server = Server(Config(**options))
    try:
        cpu = pin_to_one_cpu(cpu_choice_)
    except (OSError, ValueError) as error:
        return fail(f"cannot run on CPU {cpu_choice_}: {getattr(error, 'strerror', None) or error}")
    try:
        server.store.create()
    except OSError as error:
        return fail(f"cannot use {server.store.path} as a Maildir: {error.strerror or error}")
    try:
        server.start()
    except (OSError, ValueError) as error:
        return fail(start_failure(server, error))
    # Logged as a warning so that it shows even with --quiet: it says where everything is.
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
    if not is_loopback(server.host):
        log.warning("warning: %s is not a loopback address: anyone who can reach it can "
                    "send mail here", server.host)
    return serve_until_stopped(server)


def start_failure(server: Server, error: OSError | ValueError) -> str:
    """Say which part of starting up failed: the TLS certificate or a port."""
    config = server.config
    if config.tls and server.tls_context is None:
        files = f" with {config.tls_cert} and {config.tls_key}" if config.tls_cert else ""
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        return f"cannot set up TLS{files}: {reason}"
    ports = " or ".join(str(port) for port in (config.port, config.smtps_port, config.pop3_port,
                                               config.pop3s_port) if port is not None)
    return f"cannot listen on {config.host} port {ports}: {error.strerror or error}"


def fail(message: str) -> int:
    print(f"sheesh: error: {message}", file=sys.stderr)
    return 2


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def serve_until_stopped(server: Server) -> int:
    """Wait for Ctrl-C or SIGTERM, then stop cleanly and return 0."""
    def stop(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too: a shell starts background jobs with Ctrl-C ignored, and Python keeps that.
    for name in ("SIGINT", "SIGTERM"):  # Windows has no SIGTERM to catch
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    log.warning("stopping: messages already in DATA get %g seconds to finish",
                server.config.grace)
    try:
        server.stop()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
