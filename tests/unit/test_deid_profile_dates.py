"""Table E.1-1 as data, the resolution of actions (PS3.15 E.1.1, E.3) and date shifting (E.3.6)."""

from __future__ import annotations

import datetime as dt

import pytest

from node.deid.dates import offset_days, shift_da, shift_dt, shift_values
from node.deid.profile import (
    OPTION_CODES,
    Action,
    Option,
    build_profile,
    load_table,
    resolve,
)


def test_table_has_every_row_and_the_2026c_additions() -> None:
    rows = load_table()
    patterns = {r.pattern for r in rows}
    assert len([r for r in rows if r.tag is not None]) >= 617 + 30
    assert "(60XX,3000)" in patterns and "(50XX,XXXX)" in patterns
    additions = {0x00700006, 0x0040B020, 0x300A0054, 0x00181010, 0x00102161}
    assert additions <= {r.tag for r in rows}
    icon = next(r for r in rows if r.tag == 0x00880200)
    assert icon.name == "Icon Image Sequence" and icon.basic == "X"


@pytest.mark.parametrize(
    ("code", "tag", "expected"),
    [
        ("X/Z", 0x00080022, Action.EMPTY),
        ("Z/D", 0x00080023, Action.DUMMY),  # Content Date: Type 1 in SR, enhanced images
        ("Z/D", 0x00180010, Action.EMPTY),  # Contrast/Bolus Agent: Type 2
        ("X/Z/D", 0x00080080, Action.DUMMY),  # Institution Name: Type 1 in Enh. Gen. Equipment
        ("X/Z/D", 0x00081010, Action.EMPTY),  # Station Name
        ("X/D", 0x300A0006, Action.DUMMY),  # RT Plan Date: Type 2 in RT General Plan
        ("X/D", 0x00181400, Action.REMOVE),
        ("X/Z/U*", 0x00081140, Action.KEEP),  # Referenced Image Sequence: kept, UIDs replaced
        ("U", 0x00080018, Action.UID),
    ],
)
def test_compound_actions_resolve(code: str, tag: int, expected: Action) -> None:
    assert resolve(code, tag) is expected


def test_unknown_action_code_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown"):
        resolve("Q", 0x00100010)


def test_options_override_the_basic_profile() -> None:
    basic = build_profile(set())
    assert basic.action(0x00100010) is Action.EMPTY  # Patient's Name Z (fednode: keyed token)
    assert basic.action(0x00080020) is Action.EMPTY  # Study Date Z
    assert basic.action(0x00080018) is Action.UID
    assert basic.private_action is Action.REMOVE
    modified = build_profile({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES})
    assert modified.action(0x00080020) is Action.CLEAN
    assert modified.action(0x00100030) is Action.EMPTY  # birth date is never shifted
    full = build_profile({Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_UIDS})
    assert full.action(0x00080020) is Action.KEEP and full.action(0x00080018) is Action.KEEP
    safe = build_profile({Option.RETAIN_SAFE_PRIVATE})
    assert safe.private_action is Action.CLEAN
    # two options on one attribute: keeping wins over cleaning
    both = build_profile({Option.RETAIN_DEVICE_IDENTITY, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES})
    assert both.action(0x00181204) is Action.KEEP  # Date of Manufacture
    # the additions follow the table's pattern for Retain UIDs
    assert build_profile({Option.RETAIN_UIDS}).action(0x300A0054) is Action.KEEP


def test_exclusive_temporal_options() -> None:
    with pytest.raises(ValueError, match="exclude"):
        build_profile(
            {Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}
        )


def test_option_codes_are_cid_7050() -> None:
    codes = {o: c.value for o, c in OPTION_CODES.items()}
    assert codes[Option.CLEAN_PIXEL_DATA] == "113101"
    assert codes[Option.RETAIN_SAFE_PRIVATE] == "113111"
    assert codes[Option.RETAIN_INSTITUTION_IDENTITY] == "113112"
    assert len(set(codes.values())) == len(codes)
    assert all(len(c.meaning) <= 64 for c in OPTION_CODES.values())


# -- dates ------------------------------------------------------------------------------------


def test_offset_is_keyed_deterministic_and_in_range() -> None:
    key = b"\x07" * 32
    offsets = {offset_days(key, f"P{i}", -3650, -365) for i in range(200)}
    assert all(-3650 <= o <= -365 for o in offsets) and len(offsets) > 150
    assert offset_days(key, "P1", -3650, -365) == offset_days(key, "P1", -3650, -365)
    assert offset_days(key, "P1", 5, 5) == 5
    assert offset_days(b"\x08" * 32, "P1", -(10**4), 10**4) != offset_days(
        key, "P1", -(10**4), 10**4
    )
    with pytest.raises(ValueError):
        offset_days(key, "P1", 2, 1)


def test_shift_da() -> None:
    assert shift_da(b"20240301", -1) == b"20240229"
    assert shift_da(b"2024.03.01", 1) == b"20240302"  # ACR-NEMA form, normalised
    assert shift_da(b"20241301", 1) == b""  # invalid: emptied, not kept
    assert shift_da(b"garbage!", 1) == b""
    assert shift_da(b"00010101", -5) == b"00010101"  # clamped at the calendar's edge


def test_shift_dt_keeps_precision_time_and_zone() -> None:
    assert shift_dt(b"20240301120000.123456+0100", -1) == b"20240229120000.123456+0100"
    assert shift_dt(b"202403", 31) == b"202404"
    assert shift_dt(b"2024", -1) == b"2023"
    assert shift_dt(b"20240301-0500", 1) == b"20240302-0500"
    assert shift_dt(b"xx", 1) == b""


def test_shift_values_multi_valued() -> None:
    assert shift_values(b"20240101\\20240105 ", "DA", 10) == b"20240111\\20240115"
    assert shift_values(b"20240101120000\\", "DT", 1) == b"20240102120000\\"


def test_interval_survives() -> None:
    days = -1234
    a, b = shift_da(b"19991231", days), shift_da(b"20000301", days)
    da = dt.datetime.strptime(a.decode(), "%Y%m%d") - dt.datetime.strptime(b.decode(), "%Y%m%d")
    assert da == dt.datetime(1999, 12, 31) - dt.datetime(2000, 3, 1)
