"""Errors of encrypted inference (messages never hold PHI, ciphertexts or key material)."""

from __future__ import annotations

from node.errors import ExitCode, NodeError


class InferenceError(NodeError):
    """Encrypted inference failed."""


class ServiceUnavailable(InferenceError):
    """The inference service cannot be reached or is busy; try again later."""

    exit_code = ExitCode.NETWORK


class ServiceRefused(InferenceError):
    """The inference service refused the request (retrying the same request cannot help)."""

    exit_code = ExitCode.NETWORK


class WireError(InferenceError):
    """A message of the inference protocol is malformed."""
