"""Presentation contexts the SCP supports: Verification and every storage SOP class
pynetdicom knows, each with the common uncompressed and compressed transfer syntaxes.

Instances are stored exactly as received; the node never transcodes on receipt.
"""

from __future__ import annotations

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _accepted(ts: UID) -> bool:
    # JPIP referenced syntaxes keep the pixel data on a remote server and SMPTE ST 2110 ones
    # describe streams, so the node could neither de-identify nor use the pixels.
    return "JPIP" not in ts.name and "SMPTE" not in ts.name


ACCEPTED_TRANSFER_SYNTAXES: list[UID] = [ts for ts in AllTransferSyntaxes if _accepted(ts)]


def storage_sop_classes() -> list[str]:
    """Every storage SOP Class UID pynetdicom knows."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def supported_contexts() -> list[PresentationContext]:
    """The SCP's supported presentation contexts (Verification + all storage)."""
    contexts = []
    for uid in [str(Verification), *storage_sop_classes()]:
        cx = PresentationContext()
        cx.abstract_syntax = uid
        cx.transfer_syntax = [str(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES]
        contexts.append(cx)
    return contexts
