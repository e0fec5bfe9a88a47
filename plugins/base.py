"""The task plugin interface and the registry of tasks.

A *task* says which de-identified studies it wants (:meth:`TaskPlugin.accepts`), how a study
becomes a model input (:meth:`TaskPlugin.preprocess`), which model it trains
(:meth:`TaskPlugin.build_model`), how that model runs under CKKS homomorphic encryption
(:attr:`TaskPlugin.he_encoding`) and how its result is coded in a Structured Report
(:attr:`TaskPlugin.finding`, :attr:`TaskPlugin.classes`). Federated training and encrypted
inference are generic over tasks.

Tasks are named in the node's configuration (``[tasks] enabled``) either by a built-in name
(:data:`BUILTIN_TASKS`) or by a ``"package.module:attr"`` reference to a :class:`TaskPlugin`
subclass, instance or factory; :func:`load_tasks` resolves them and raises
:class:`PluginLoadError` with a message that names the reference and the fix.

torch is imported lazily: only :meth:`TaskPlugin.build_model` and :func:`architecture_hash` need
it, so a node that only receives and de-identifies never loads it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

TASK_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""A task name: lower-case letters, digits and ``_``, at most 32 characters (it appears in job
dedupe keys, label columns and artifact file names)."""

BUILTIN_TASKS: dict[str, str] = {
    "chest_xray": "plugins.chest_xray:ChestXrayTask",
}
"""Built-in task names and the references they stand for."""


class TaskPluginError(Exception):
    """A task plugin could not be loaded or failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class PluginLoadError(TaskPluginError):
    """A task plugin reference could not be resolved to a valid task."""


class PreprocessingError(TaskPluginError):
    """A study could not be turned into a model input."""


class UnsupportedOperation(TaskPluginError):
    """The task plugin does not offer this operation."""


# --------------------------------------------------------------------------------------------
# Descriptions


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept (PS3.3 Table 8.8-1 Code Sequence Macro), as used in an SR."""

    value: str
    """Code Value (0008,0100)."""
    scheme_designator: str
    """Coding Scheme Designator (0008,0102), for example ``"SCT"`` for SNOMED CT."""
    meaning: str
    """Code Meaning (0008,0104)."""


@dataclass(frozen=True)
class TaskClass:
    """One output class of a task: its label name, its SR coding and its decision threshold."""

    name: str
    """Name used in label files and in the database (for example ``"pneumonia"``)."""
    concept: CodedConcept
    """How the class is coded in the SR (for a binary finding: present or absent)."""
    threshold: float | None = None
    """Probability at or above which this class is reported (the positive class of a binary
    task); ``None`` for the class reported otherwise."""


@dataclass(frozen=True)
class HEEncoding:
    """How a task's model is evaluated under CKKS homomorphic encryption (TenSEAL).

    The node encrypts the preprocessed input with these parameters; the model owner evaluates
    the network on the ciphertext; only the node can decrypt the output. The input is packed
    with the *im2col* encoding of a single-channel image for the model's one leading
    convolution (kernel ``kernel_size``, stride ``stride``), every activation is a square, and
    every further layer is a plaintext-ciphertext matrix product, so the circuit uses
    ``multiplicative_depth`` rescalings.

    CKKS decodes a value correctly only if ``|value| * 2**global_scale_bits`` stays below half
    the last remaining modulus, i.e. ``|value| < 2**(coeff_mod_bit_sizes[0] -
    global_scale_bits - 1)`` (16 with the defaults); the model keeps its logit within
    ``output_bound``, well inside that limit.

    The ring and modulus fields here are the task's declared defaults (the tutorial-style
    evaluation the benchmark compares against). fednode's evaluator does not use them: the
    inference service chooses the CKKS parameters per trained model from a guaranteed bound of
    its logit (:func:`plugins.he.choose_parameters`) and publishes them; ``kernel_size``,
    ``stride``, ``input_range`` and ``output_bound`` do apply.
    """

    scheme: str = "CKKS"
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (31, 26, 26, 26, 26, 26, 26, 31)
    global_scale_bits: int = 26
    packing: str = "im2col"
    kernel_size: int = 8
    stride: int = 8
    multiplicative_depth: int = 5
    input_range: tuple[float, float] = (-1.0, 1.0)
    output_bound: float = 8.0

    @property
    def slots(self) -> int:
        """Number of values one CKKS ciphertext holds (half the polynomial degree)."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_output(self) -> float:
        """The largest magnitude the final (decrypted) value may have."""
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.global_scale_bits - 1))

    def windows(self, input_shape: tuple[int, int, int]) -> int:
        """Number of convolution windows over an input of *input_shape* ``(C, H, W)``."""
        _, height, width = input_shape
        rows = (height - self.kernel_size) // self.stride + 1
        cols = (width - self.kernel_size) // self.stride + 1
        return rows * cols

    def problems(self, input_shape: tuple[int, int, int]) -> list[str]:
        """What is inconsistent in these parameters for an input of *input_shape*."""
        out: list[str] = []
        n = self.poly_modulus_degree
        if self.scheme != "CKKS":
            out.append(f"scheme {self.scheme!r} is not supported (only CKKS)")
        if n < 4096 or n & (n - 1):
            out.append(f"poly_modulus_degree {n} is not a power of two >= 4096")
        if len(self.coeff_mod_bit_sizes) < 2:
            out.append("coeff_mod_bit_sizes needs at least two primes")
        elif len(self.coeff_mod_bit_sizes) - 2 < self.multiplicative_depth:
            out.append(
                f"multiplicative depth {self.multiplicative_depth} needs "
                f"{self.multiplicative_depth + 2} primes, not {len(self.coeff_mod_bit_sizes)}"
            )
        if any(b != self.global_scale_bits for b in self.coeff_mod_bit_sizes[1:-1]):
            out.append("the middle primes must have global_scale_bits bits (exact rescaling)")
        if self.packing != "im2col":
            out.append(f"packing {self.packing!r} is not supported (only im2col)")
        channels, height, width = input_shape
        if channels != 1:
            out.append("im2col packing needs a single-channel input")
        if self.kernel_size > min(height, width) or self.stride < 1:
            out.append("the convolution kernel does not fit the input")
        elif self.windows(input_shape) * self.kernel_size**2 > self.slots:
            out.append(
                f"{self.windows(input_shape)} windows of {self.kernel_size}x{self.kernel_size} "
                f"do not fit in {self.slots} slots"
            )
        lo, hi = self.input_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            out.append("input_range must be finite with low < high")
        if not 0 < self.output_bound < self.max_abs_output:
            out.append(
                f"output_bound {self.output_bound} must be positive and below "
                f"{self.max_abs_output} (CKKS decoding limit of these parameters)"
            )
        return out


@dataclass(frozen=True)
class SyntheticStudy:
    """One generated study: its instances, its label and the (fake) keys a label file uses."""

    datasets: tuple[Dataset, ...]
    label: str
    study_instance_uid: str
    accession_number: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Non-identifying facts about the generation (modality, view, finding size ...)."""


# --------------------------------------------------------------------------------------------
# The interface


class TaskPlugin(ABC):
    """A task: which studies it accepts, how it preprocesses, its model, its SR coding.

    Subclasses set the class attributes and implement :meth:`accepts`, :meth:`preprocess` and
    :meth:`build_model`. Instances must be stateless (one instance serves every worker thread).

    Attributes
    ----------
    name : str
        The task's name (:data:`TASK_NAME_RE`): label column, job payloads, artifact names.
    version : str
        Version of the task definition (preprocessing + architecture). Change it whenever a
        trained model of the old version would be wrong for the new one.
    description : str
        One line for ``fednode`` listings.
    input_shape : tuple of int
        ``(channels, height, width)`` of :meth:`preprocess`'s output.
    finding : CodedConcept
        What the task assesses (for example SNOMED CT 233604007 "Pneumonia").
    classes : tuple of TaskClass
        The output classes, negative first for a binary task.
    he_encoding : HEEncoding
        The CKKS parameters and input packing the model is built for.
    label_aliases : dict of str to str
        Extra spellings accepted in label files (lower-case alias → class name).
    """

    name: str
    version: str
    description: str = ""
    input_shape: tuple[int, int, int]
    finding: CodedConcept
    classes: tuple[TaskClass, ...]
    he_encoding: HEEncoding = HEEncoding()
    label_aliases: dict[str, str] = {}

    # -- what the task wants ---------------------------------------------------------------
    @abstractmethod
    def accepts(self, header: Dataset) -> bool:
        """Whether this task wants the instance with this de-identified *header*.

        Parameters
        ----------
        header : pydicom.dataset.Dataset
            A de-identified header, usually read without pixel data.
        """

    # -- study -> input ---------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, datasets: Sequence[Dataset]) -> np.ndarray:
        """Turn a study's accepted, de-identified instances into one model input.

        Parameters
        ----------
        datasets : sequence of pydicom.dataset.Dataset
            The instances of one study that :meth:`accepts` wants, with pixel data.

        Returns
        -------
        numpy.ndarray
            ``float32`` of shape :attr:`input_shape`, values within ``he_encoding.input_range``.

        Raises
        ------
        PreprocessingError
            If no usable image is among *datasets* or the pixel data cannot be decoded.
        """

    # -- the model --------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh, untrained torch model evaluable under :attr:`he_encoding`.

        It takes a batch of inputs ``(N, *input_shape)`` and returns logits ``(N, 1)`` for a
        binary task. It has one leading convolution, polynomial (square) activations and no
        other non-linearity, and is trained to keep ``|logit| < he_encoding.output_bound``.
        """

    # -- labels and decisions ---------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def positive_class(self) -> TaskClass:
        """The class a binary task's probability is about (the one with a threshold)."""
        for cls in self.classes:
            if cls.threshold is not None:
                return cls
        raise UnsupportedOperation(f"task {self.name} has no class with a threshold")

    def class_index(self, name: str) -> int:
        """Index of class *name* (the training target)."""
        try:
            return self.class_names.index(name)
        except ValueError:
            raise ValueError(f"{name!r} is not a class of task {self.name}") from None

    def parse_label(self, value: str) -> str:
        """The class name a label-file cell stands for.

        Accepted: a class name (any case), an alias from :attr:`label_aliases`, or the class
        index (``"0"`` … ``"n-1"``).

        Raises
        ------
        ValueError
            If *value* names no class (the message does not repeat the value).
        """
        text = value.strip().lower()
        for name in self.class_names:
            if text == name.lower():
                return name
        if text in self.label_aliases:
            return self.label_aliases[text]
        if text.isdigit() and int(text) < len(self.classes):
            return self.classes[int(text)].name
        allowed = ", ".join([*self.class_names, *sorted(self.label_aliases)])
        raise ValueError(f"not a class of task {self.name} (allowed: {allowed})")

    def decide(self, probability: float) -> TaskClass:
        """The class reported for a binary task's *probability* of the positive class."""
        positive = self.positive_class
        assert positive.threshold is not None  # by positive_class
        if probability >= positive.threshold:
            return positive
        return next(c for c in self.classes if c is not positive)

    # -- optional capabilities --------------------------------------------------------------
    def synthetic_studies(
        self, count: int, *, seed: int, image_size: int
    ) -> Iterator[SyntheticStudy]:
        """Generate *count* synthetic studies with labels (for demos and tests).

        Raises
        ------
        UnsupportedOperation
            If the task has no generator (the default).
        """
        raise UnsupportedOperation(f"task {self.name} has no synthetic data generator")

    def __repr__(self) -> str:
        return f"<task {self.name} {self.version}>"


# --------------------------------------------------------------------------------------------
# Validation and fingerprints


def check_plugin(plugin: TaskPlugin, *, model: nn.Module | None = None) -> None:
    """Check that *plugin* describes itself consistently.

    With *model* (a model of the plugin, trained or not), also check that the HE evaluator
    can run it (:func:`plugins.he.he_circuit`: only ``conv -> x² -> linear -> x² -> linear``
    with no other layer) and that CKKS parameters exist for it. Loading tasks does not pass a
    model (that would import torch in every process); the inference service and ``fednode
    infer`` do.

    Raises
    ------
    PluginLoadError
        Listing every problem found.
    """
    problems: list[str] = []
    name = getattr(plugin, "name", None)
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        problems.append(f"name {name!r} must match {TASK_NAME_RE.pattern}")
    version = getattr(plugin, "version", None)
    if not isinstance(version, str) or not version.strip():
        problems.append("version must be a non-empty string")
    shape = getattr(plugin, "input_shape", None)
    if not (
        isinstance(shape, tuple)
        and len(shape) == 3
        and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        problems.append("input_shape must be three positive integers (C, H, W)")
        shape = None
    if not isinstance(getattr(plugin, "finding", None), CodedConcept):
        problems.append("finding must be a CodedConcept")
    classes = getattr(plugin, "classes", None)
    if not isinstance(classes, tuple) or len(classes) < 2:
        problems.append("classes must be a tuple of at least two TaskClass")
    else:
        names = [c.name for c in classes if isinstance(c, TaskClass)]
        if len(names) != len(classes) or len(set(names)) != len(names):
            problems.append("classes must be TaskClass entries with distinct names")
        thresholds = [c.threshold for c in classes if isinstance(c, TaskClass)]
        given = [t for t in thresholds if t is not None]
        if len(classes) == 2 and len(given) != 1:
            problems.append("a binary task needs a threshold on exactly one (the positive) class")
        if any(not 0.0 < t < 1.0 for t in given):
            problems.append("thresholds must lie strictly between 0 and 1")
        for alias, target in getattr(plugin, "label_aliases", {}).items():
            if target not in names or alias != alias.lower():
                problems.append(f"label alias {alias!r} must be lower-case and name a class")
    he = getattr(plugin, "he_encoding", None)
    if not isinstance(he, HEEncoding):
        problems.append("he_encoding must be an HEEncoding")
    elif shape is not None:
        problems.extend(f"he_encoding: {p}" for p in he.problems(shape))
    if model is not None and not problems:
        from plugins.he import HECircuitError, choose_parameters, he_circuit

        try:
            choose_parameters(he_circuit(plugin, model), he.input_range)  # type: ignore[union-attr]
        except HECircuitError as exc:
            problems.append(f"model: {exc}")
    if problems:
        raise PluginLoadError(f"task plugin {name!r} is invalid: " + "; ".join(problems))


def architecture_hash(plugin: TaskPlugin, model: nn.Module) -> str:
    """A SHA-256 fingerprint of *model*'s architecture (not its weights).

    It covers the task name, the input shape, the HE encoding, every module's type and
    configuration and every parameter's name, shape and dtype: two models with the same hash
    can exchange weights (federated averaging relies on it).
    """
    description = {
        "task": plugin.name,
        "input_shape": list(plugin.input_shape),
        "he_encoding": asdict(plugin.he_encoding),
        "modules": [
            [name, type(module).__name__, module.extra_repr()]
            for name, module in model.named_modules()
        ],
        "parameters": [
            [name, list(tensor.shape), str(tensor.dtype)]
            for name, tensor in model.state_dict().items()
        ],
    }
    blob = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------
# Registry


def _import_reference(ref: str, target: str) -> object:
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise PluginLoadError(
            f"task {ref!r} is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
            'nor a "package.module:attr" reference'
        )
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginLoadError(
            f"task plugin {ref!r}: module {module_name!r} not found ({exc.name} is missing); "
            "install the plugin's package or fix [tasks] enabled"
        ) from exc
    except Exception as exc:
        raise PluginLoadError(
            f"task plugin {ref!r}: importing module {module_name!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginLoadError(
                f"task plugin {ref!r}: {module_name!r} has no attribute {attr_path!r}; "
                "fix [tasks] enabled"
            ) from None
    return obj


def resolve_task(ref: str) -> TaskPlugin:
    """Resolve a built-in task name or a ``"package.module:attr"`` reference to a task.

    *attr* may name a :class:`TaskPlugin` subclass (instantiated without arguments), an
    instance, or a callable returning one.

    Raises
    ------
    PluginLoadError
        If the reference cannot be imported, names something else, or the task is invalid.
    """
    target = BUILTIN_TASKS.get(ref, ref)
    obj = _import_reference(ref, target)
    if not isinstance(obj, TaskPlugin):
        if not callable(obj):
            raise PluginLoadError(
                f"task plugin {ref!r} is a {type(obj).__name__}, not a TaskPlugin"
            )
        try:
            obj = obj()
        except Exception as exc:
            raise PluginLoadError(
                f"task plugin {ref!r}: creating it failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(obj, TaskPlugin):
            raise PluginLoadError(
                f"task plugin {ref!r} returned a {type(obj).__name__}, not a TaskPlugin"
            )
    check_plugin(obj)
    return obj


def load_tasks(refs: Iterable[str]) -> dict[str, TaskPlugin]:
    """Resolve every reference in *refs*; return the tasks by name, in the given order.

    Raises
    ------
    PluginLoadError
        On the first broken reference, or if two references give tasks of the same name.
    """
    tasks: dict[str, TaskPlugin] = {}
    for ref in refs:
        plugin = resolve_task(ref)
        if plugin.name in tasks:
            raise PluginLoadError(
                f"task plugin {ref!r} is named {plugin.name!r}, like another enabled task"
            )
        tasks[plugin.name] = plugin
        logger.debug("task %s %s loaded from %s", plugin.name, plugin.version, ref)
    return tasks
