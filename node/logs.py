"""Logging set-up, called only at the entry point (house style 6)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields (structured, PHI-free) are kept."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD:
                out[key] = value
        return json.dumps(out, default=str)


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


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactLibraryIdentifiers())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # through the handler's redaction, not straight to stderr
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
