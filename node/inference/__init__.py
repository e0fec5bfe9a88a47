"""Homomorphic-encrypted inference with TenSEAL CKKS (a later issue; see shared DESIGN.md)."""
