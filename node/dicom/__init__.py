"""DICOM networking: the SCP that receives (C-ECHO, C-STORE) and the SCU that sends."""
