"""fednode: a DICOM node for privacy-preserving AI.

The package ``node`` is the running node (DICOM, de-identification, pipeline, CLI); it builds on
``plugins`` (task plugins) which builds on ``storage`` (persistence only).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fednode")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
