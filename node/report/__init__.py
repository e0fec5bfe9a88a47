"""Structured Reports: a task's result as a DICOM TID 1500 Measurement Report (highdicom).

:mod:`node.report.builder` builds the SR from the vault's original header (so it files under
the original patient and study) and the result; :mod:`node.report.codes` holds the coded
concepts it uses. highdicom is imported lazily, by the builder only.
"""
