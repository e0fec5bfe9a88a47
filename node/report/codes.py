"""Coded concepts of fednode's Structured Reports (PS3.16 code tables).

Kept as plain ``(value, scheme, meaning)`` triples of :class:`plugins.base.CodedConcept`, so
that importing them does not import highdicom.
"""

from __future__ import annotations

from plugins.base import CodedConcept

IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
"""Procedure Reported (TID 1500 row 4; CID 100 "Quantitative Diagnostic Imaging Procedures"):
the task's imaging procedure, when the task does not name a more specific one."""

PROBABILITY = CodedConcept("122157", "DCM", "Probability")
"""Concept name of the probability measurement (TID 300)."""

NO_UNITS = CodedConcept("1", "UCUM", "no units")
"""UCUM unity: the probability is a unitless fraction in [0, 1]."""

ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")
"""Algorithm Family (TID 4019 row 1)."""

SR_FORMATS: dict[str, str] = {
    "comprehensive-3d": "1.2.840.10008.5.1.4.1.1.88.34",
    "enhanced": "1.2.840.10008.5.1.4.1.1.88.22",
}
"""The SR storage SOP classes the node can write (PS3.4 B.5): Comprehensive 3D SR (the
default) and Enhanced SR (for a PACS that does not store Comprehensive 3D SR)."""
