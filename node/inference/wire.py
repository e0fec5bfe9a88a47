"""The inference protocol's binary message: a JSON header and opaque parts (ciphertexts, keys).

``b"FNHE1" || u32 header length || header JSON || u32 part count || (u32 length || bytes)*``,
big-endian. The header holds only identifiers, counts and timings; the parts are serialised
SEAL/TenSEAL objects. One format for requests and replies keeps what crosses the wire easy to
inspect (``tests/integration/test_inference_service.py`` does).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from node.inference.errors import WireError

MAGIC = b"FNHE1"
CONTENT_TYPE = "application/vnd.fednode.he+octet-stream"
MAX_HEADER = 64 * 1024


def pack(header: dict[str, Any], parts: list[bytes]) -> bytes:
    """One message of *header* and *parts*."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    out = [MAGIC, struct.pack(">I", len(head)), head, struct.pack(">I", len(parts))]
    for part in parts:
        out.append(struct.pack(">I", len(part)))
        out.append(part)
    return b"".join(out)


def unpack(data: bytes, *, max_parts: int = 4096) -> tuple[dict[str, Any], list[bytes]]:
    """The header and parts of a message.

    Raises
    ------
    WireError
        If *data* is not a complete, well-formed message.
    """
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise WireError("not a fednode HE message (bad magic)")
    pos = len(MAGIC)

    def u32() -> int:
        nonlocal pos
        if pos + 4 > len(view):
            raise WireError("truncated message")
        (value,) = struct.unpack_from(">I", view, pos)
        pos += 4
        return int(value)

    size = u32()
    if size > MAX_HEADER or pos + size > len(view):
        raise WireError("bad header length")
    try:
        header = json.loads(bytes(view[pos : pos + size]))
    except ValueError as exc:
        raise WireError("the header is not JSON") from exc
    if not isinstance(header, dict):
        raise WireError("the header is not a JSON object")
    pos += size
    count = u32()
    if count > max_parts:
        raise WireError(f"too many parts ({count} > {max_parts})")
    parts = []
    for _ in range(count):
        length = u32()
        if pos + length > len(view):
            raise WireError("truncated part")
        parts.append(bytes(view[pos : pos + length]))
        pos += length
    if pos != len(view):
        raise WireError("trailing bytes after the last part")
    return header, parts
