"""De-identification: DICOM PS3.15 Annex E profile, keyed pseudonyms, burned-in gating, vault."""
