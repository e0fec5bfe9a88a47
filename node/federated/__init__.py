"""Federated training as a Flower client (a later issue; see shared DESIGN.md)."""
