"""Logging set-up, called only at the entry point (house style 6).

Every record is one line, whatever reads it (a terminal, journald, a file): the text format
writes a message's or a traceback's line breaks as ``\\n`` when the output is not a terminal,
and the JSON format is one object per line. Timestamps are RFC 3339 with the local UTC offset
(``2026-12-02T05:01:02.345+01:00``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime
from typing import IO, Any

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def rfc3339(created: float) -> str:
    """*created* (seconds since the epoch) as an RFC 3339 timestamp with the local offset."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields (structured, PHI-free) are kept."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "at": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STD:
                out[key] = value
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``<RFC 3339 time> <level> <process> <logger>: <message>``; with *one_line*, line breaks
    inside the record (a multi-line message, a traceback) are written as ``\\n``."""

    def __init__(self, *, one_line: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s")
        self.one_line = one_line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\n", "\\n") if self.one_line else text


_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


_QUOTED = re.compile(r"'[^'\n]*'?|\"[^\"\n]*\"?")


def _from(record: logging.LogRecord, library: str) -> bool:
    return record.name == library or record.name.startswith(library + ".")


class RedactLibraryIdentifiers(logging.Filter):
    """Keep values quoted by libraries out of the log (the PHI boundary).

    pynetdicom quotes values it received in some messages (an invalid or non-conformant SOP
    Instance UID, for one): in its records every dotted-number sequence becomes ``<uid>``.
    pydicom quotes the value of every element it finds invalid (``Invalid value for VR PN:
    '<a patient's name>'``, likewise UI, DA, AS, CS, TM, IS, DS ...): its records are dropped
    (they never say anything an operator could act on), whatever level pydicom's logger is
    set to. Warnings reach the log through :func:`logging.captureWarnings` (``py.warnings``):
    quoted text and dotted numbers in them are replaced. fednode's own messages carry
    pseudonyms only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _from(record, "pydicom"):
            return False
        if _from(record, "pynetdicom"):
            record.msg = _UID_LIKE.sub("<uid>", record.getMessage())
            record.args = None
        elif record.name == "py.warnings":
            record.msg = _UID_LIKE.sub("<uid>", _QUOTED.sub("<value>", record.getMessage()))
            record.args = None
        return True


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactLibraryIdentifiers())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(one_line=not _is_terminal(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # through the handler's redaction, not straight to stderr
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


KEY_PREFIX_CHARS = 17
"""Characters of a pseudonymous key kept in log lines (``2.25.`` and 12 digits)."""


def short_key(key: str | None) -> str:
    """A pseudonymous key (``2.25.<decimal>`` study or instance key) shortened for a log line.

    The first :data:`KEY_PREFIX_CHARS` characters (about 40 bits) tell studies apart in a log
    and match the start of the full key that ``fednode status`` and the database show. Every
    log line that names a study, series or instance uses this, and passes the full key as a
    structured field (``extra={"study_key": key}``) where the JSON format carries it. Never
    call it on an original UID: those are never logged.
    """
    if not key:
        return "-"
    return key if len(key) <= KEY_PREFIX_CHARS else key[:KEY_PREFIX_CHARS] + "…"
