"""Per-patient date shifting (PS3.15 E.3.6, Retain Longitudinal Temporal Information with
Modified Dates).

Every date of one patient moves by the same whole number of days, picked by a keyed hash of
the Patient ID within the configured range, so intervals within a patient survive exactly and
the same patient gets the same offset on every study, in every process, after every restart.
DA values move by the offset; DT values move their date part and keep their time and time zone
offset (``&ZZXX``); TM values are times of day, which a whole-day shift leaves as they are:
shifting them alone would break the pairing of a date with its time (Study Date with Study
Time). Multi-valued attributes are shifted value by value. A value that is not a valid date is
emptied rather than kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

_ORD_MIN = dt.date(1, 1, 1).toordinal()
_ORD_MAX = dt.date(9999, 12, 31).toordinal()


def offset_days(site_key: bytes, patient_identity: str, low: int, high: int) -> int:
    """The patient's date offset in days, in ``[low, high]``, keyed by the site key."""
    if low > high:
        raise ValueError("low must not exceed high")
    mac = hmac.new(site_key, b"date-offset\x00" + patient_identity.encode(), hashlib.sha256)
    span = high - low + 1
    return low + int.from_bytes(mac.digest()[:8], "big") % span


def _shift_ordinal(year: int, month: int, day: int, days: int) -> dt.date:
    ordinal = dt.date(year, month, day).toordinal() + days
    return dt.date.fromordinal(min(max(ordinal, _ORD_MIN), _ORD_MAX))


def shift_da(value: bytes, days: int) -> bytes:
    """Shift one DA value (``YYYYMMDD``, or the ACR-NEMA ``YYYY.MM.DD``); ``b""`` if invalid."""
    text = value.strip(b" \x00")
    if len(text) == 10 and text[4:5] == b"." and text[7:8] == b".":
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        return b""
    try:
        new = _shift_ordinal(int(text[:4]), int(text[4:6]), int(text[6:8]), days)
    except ValueError:
        return b""
    return b"%04d%02d%02d" % (new.year, new.month, new.day)


def shift_dt(value: bytes, days: int) -> bytes:
    """Shift the date part of one DT value, keeping its precision, time and time zone."""
    text = value.strip(b" \x00")
    zone = b""
    for sign in (b"+", b"-"):
        cut = text.find(sign, 4)
        if cut != -1:
            text, zone = text[:cut], text[cut:]
            break
    digits = len(text) if text.isdigit() else text.find(b".")
    if digits < 4 or not text[:4].isdigit():
        return b""
    precision = min(digits, 8)
    if not text[:precision].isdigit() or precision not in (4, 6, 8):
        return b""
    year = int(text[:4])
    month = int(text[4:6]) if precision >= 6 else 1
    day = int(text[6:8]) if precision == 8 else 1
    try:
        new = _shift_ordinal(year, month, day, days)
    except ValueError:
        return b""
    stamp = b"%04d%02d%02d" % (new.year, new.month, new.day)
    return stamp[:precision] + text[precision:] + zone


def shift_values(raw: bytes, vr: str, days: int) -> bytes:
    """Shift every value of a multi-valued DA or DT element (backslash-separated)."""
    shift = shift_da if vr == "DA" else shift_dt
    return b"\\".join(shift(v, days) for v in raw.rstrip(b" \x00").split(b"\\"))
