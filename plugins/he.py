"""The circuit a task's model becomes under CKKS, its slot layout and its parameters.

The HE evaluator (:mod:`node.inference.ckks`) runs one family of networks::

    conv(1 -> C, k x k, stride s) -> x² -> linear(C·W -> H) -> x² -> linear(H -> 1)

(``W`` convolution windows), which is what :class:`plugins.base.TaskPlugin.build_model`
promises. :func:`he_circuit` reads such a model into plain arrays (:class:`HECircuit`) and
refuses anything else with a message naming the layers it cannot run; it also checks
numerically that the model's ``forward`` computes exactly that circuit.

:func:`choose_parameters` picks the CKKS parameters per model: it bounds the logit over every
input within the task's ``input_range`` by interval arithmetic (a guarantee, not an estimate
from training data), leaves that much integer headroom above the scale in the last prime (a
value beyond it would wrap silently when decoded), and spends the rest of the 128-bit-security
modulus budget on the scale (precision). :class:`HELayout` is the slot layout both sides derive
from the circuit's dimensions and the slot count.

Only numpy here; torch only inside :func:`he_circuit` (it receives a model).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from plugins.base import TaskPlugin

MAX_MODULUS_BITS = {8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient modulus for 128-bit security (HomomorphicEncryption.org
standard, as SEAL enforces it), by polynomial modulus degree."""
DEPTH = 4
"""Rescalings of the circuit: convolution, first square, hidden layer, last square (the final
linear layer is folded into the last square, see :class:`HELayout`)."""
MIN_SCALE_BITS = 30
MAX_SCALE_BITS = 40
MAX_PRIME_BITS = 60


class HECircuitError(ValueError):
    """The model cannot be evaluated under CKKS by fednode's evaluator."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class HECircuit:
    """A model as plain float64 arrays, in the order the HE evaluator runs it."""

    input_shape: tuple[int, int, int]
    kernel: int
    stride: int
    conv_weight: np.ndarray
    """``(C, k*k)``, kernel positions row-major (as ``Conv2d.weight`` flattens)."""
    conv_bias: np.ndarray
    """``(C,)``."""
    fc1_weight: np.ndarray
    """``(H, C*W)``; input index ``c*W + w`` (channel-major, as ``flatten(1)`` orders it)."""
    fc1_bias: np.ndarray
    fc2_weight: np.ndarray
    """``(H,)``."""
    fc2_bias: float

    @property
    def channels(self) -> int:
        return int(self.conv_weight.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        _, height, width = self.input_shape
        return (height - self.kernel) // self.stride + 1, (width - self.kernel) // self.stride + 1

    @property
    def windows(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def hidden(self) -> int:
        return int(self.fc1_weight.shape[0])

    def im2col(self, image: np.ndarray) -> np.ndarray:
        """``(W, k*k)``: the pixels of every convolution window of a ``(H, W)`` image."""
        return self.im2col_of(image, self.kernel, self.stride)

    @staticmethod
    def im2col_of(image: np.ndarray, kernel: int, stride: int) -> np.ndarray:
        """``(W, k*k)`` windows of a ``(H, W)`` image, kernel positions row-major."""
        height, width = image.shape
        rows = (height - kernel) // stride + 1
        cols = (width - kernel) // stride + 1
        out = np.empty((rows * cols, kernel * kernel), dtype=np.float64)
        for r in range(rows):
            for c in range(cols):
                patch = image[r * stride : r * stride + kernel, c * stride : c * stride + kernel]
                out[r * cols + c] = patch.reshape(-1)
        return out

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Plaintext logits of a batch ``(N, 1, H, W)`` (the reference for the HE result)."""
        out = np.empty(len(inputs), dtype=np.float64)
        for i, x in enumerate(inputs):
            cols = self.im2col(np.asarray(x, dtype=np.float64)[0])
            conv = self.conv_weight @ cols.T + self.conv_bias[:, None]  # (C, W)
            y = (conv * conv).reshape(-1)
            z = self.fc1_weight @ y + self.fc1_bias
            out[i] = float(self.fc2_weight @ (z * z) + self.fc2_bias)
        return out

    def logit_bound(self, input_range: tuple[float, float]) -> float:
        """An upper bound of ``|logit|`` over every input within *input_range* (intervals)."""
        lo_in, hi_in = input_range
        w, b = self.conv_weight, self.conv_bias
        conv_hi = np.maximum(w, 0) @ np.full(w.shape[1], hi_in) + np.minimum(w, 0) @ np.full(
            w.shape[1], lo_in
        )
        conv_lo = np.maximum(w, 0) @ np.full(w.shape[1], lo_in) + np.minimum(w, 0) @ np.full(
            w.shape[1], hi_in
        )
        conv_hi, conv_lo = conv_hi + b, conv_lo + b
        sq_hi = np.maximum(conv_hi**2, conv_lo**2)
        sq_lo = np.where((conv_lo <= 0) & (conv_hi >= 0), 0.0, np.minimum(conv_hi**2, conv_lo**2))
        y_hi = np.repeat(sq_hi, self.windows)
        y_lo = np.repeat(sq_lo, self.windows)
        w1 = self.fc1_weight
        z_hi = np.maximum(w1, 0) @ y_hi + np.minimum(w1, 0) @ y_lo + self.fc1_bias
        z_lo = np.maximum(w1, 0) @ y_lo + np.minimum(w1, 0) @ y_hi + self.fc1_bias
        zz_hi = np.maximum(z_hi**2, z_lo**2)
        zz_lo = np.where((z_lo <= 0) & (z_hi >= 0), 0.0, np.minimum(z_hi**2, z_lo**2))
        w2 = self.fc2_weight
        out_hi = np.maximum(w2, 0) @ zz_hi + np.minimum(w2, 0) @ zz_lo + self.fc2_bias
        out_lo = np.maximum(w2, 0) @ zz_lo + np.minimum(w2, 0) @ zz_hi + self.fc2_bias
        return float(max(abs(out_hi), abs(out_lo)))


@dataclass(frozen=True)
class CKKSParameters:
    """CKKS parameters of one model (TenSEAL / SEAL)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    logit_bound: float
    """The guaranteed bound of ``|logit|`` the headroom was sized for."""

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def headroom(self) -> float:
        """Largest magnitude the decrypted value may have (last prime over the scale)."""
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CKKSParameters:
        return cls(
            poly_modulus_degree=int(data["poly_modulus_degree"]),
            coeff_mod_bit_sizes=tuple(int(b) for b in data["coeff_mod_bit_sizes"]),
            scale_bits=int(data["scale_bits"]),
            logit_bound=float(data["logit_bound"]),
        )

    def digest(self) -> str:
        """A short fingerprint: the node keeps one key per task and parameter set."""
        blob = json.dumps(
            [self.poly_modulus_degree, list(self.coeff_mod_bit_sizes), self.scale_bits]
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class HELayout:
    """Where every value sits in the CKKS slots (derived, never sent).

    Input: ``copies`` ciphertexts. Output ``g = c*W + w`` of the convolution owns the slots
    ``g + P*t`` (``P`` = ``C*W`` rounded up to a power of two, ``t < T = slots / P``); copy
    ``i`` holds, at slot ``g + P*t``, the pixel at kernel position ``i*T + t`` of window ``w``.
    One plaintext product per copy, a sum of the copies and ``log2(T)`` rotations give every
    convolution output, replicated with period ``P`` (four rotations instead of six per
    channel). The hidden layer is a diagonal (Halevi-Shoup) product with baby-step
    giant-step rotations over that period. The last linear layer is folded into the last
    square: the hidden layer produces ``z = sqrt|v| * h`` and ``sign(v) * z`` side by side,
    one rotation aligns them, one ciphertext product and ``log2(H)`` rotations sum
    ``v_j h_j²``, so the logit ends up in every slot.
    """

    slots: int
    channels: int
    windows: int
    kernel_elems: int
    hidden: int

    @property
    def period(self) -> int:
        return _pow2(self.channels * self.windows)

    @property
    def groups(self) -> int:
        return self.slots // self.period

    @property
    def copies(self) -> int:
        return math.ceil(self.kernel_elems / self.groups)

    @property
    def hidden_pad(self) -> int:
        return _pow2(self.hidden)

    @property
    def rows(self) -> int:
        """Rows of the hidden-layer matrix as evaluated (``z`` and ``sign * z``)."""
        return 2 * self.hidden_pad

    @property
    def baby(self) -> int:
        return 1 << math.ceil(math.log2(self.rows) / 2)

    @property
    def giant(self) -> int:
        return self.rows // self.baby

    def problems(self) -> list[str]:
        out = []
        if self.period > self.slots:
            outputs = self.channels * self.windows
            out.append(f"{outputs} convolution outputs exceed {self.slots} slots")
        elif self.rows > self.period:
            out.append(
                f"hidden width {self.hidden} is too large for {self.channels * self.windows} inputs"
            )
        return out

    def conv_steps(self) -> list[int]:
        return [self.slots >> (i + 1) for i in range(int(math.log2(self.groups)))]

    def fold_steps(self) -> list[int]:
        return [self.period >> (i + 1) for i in range(int(math.log2(self.period // self.rows)))]

    def sum_steps(self) -> list[int]:
        return [self.hidden_pad >> (i + 1) for i in range(int(math.log2(self.hidden_pad)))]

    def rotation_steps(self) -> list[int]:
        """Every rotation the evaluator performs (the Galois keys the node must provide)."""
        steps = set(self.conv_steps())
        steps.update(range(1, self.baby))
        steps.update(k * self.baby for k in range(1, self.giant))
        steps.update(self.fold_steps())
        steps.add(self.hidden_pad)
        steps.update(self.sum_steps())
        return sorted(s for s in steps if 0 < s < self.slots)

    def _pack(self, per_kernel_element: Callable[[int], np.ndarray]) -> list[np.ndarray]:
        """The *copies* slot vectors of a replicated im2col layout: group *t* of copy *i*
        holds, over the period's slots, the values ``per_kernel_element(k)`` gives for kernel
        element ``k = i * groups + t`` (zero in the padding slots)."""
        p, t_count = self.period, self.groups
        valid_g = np.arange(p) < self.channels * self.windows
        out = []
        for i in range(self.copies):
            vec = np.zeros(self.slots)
            for t in range(t_count):
                k = i * t_count + t
                if k >= self.kernel_elems:
                    break
                vec[t * p : (t + 1) * p] = np.where(valid_g, per_kernel_element(k), 0.0)
            out.append(vec)
        return out

    def _slot_index(self, of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        g = np.arange(self.period)
        return np.where(g < self.channels * self.windows, of(g), 0)

    def encode_input(self, cols: np.ndarray) -> list[np.ndarray]:
        """The *copies* slot vectors of one image's im2col matrix ``(W, k*k)``."""
        w_of_g = self._slot_index(lambda g: g % self.windows)
        return self._pack(lambda k: cols[w_of_g, k])

    def conv_plaintexts(self, circuit: HECircuit) -> list[np.ndarray]:
        """Per copy: the kernel weight each slot's pixel is multiplied with."""
        c_of_g = self._slot_index(lambda g: g // self.windows)
        return self._pack(lambda k: circuit.conv_weight[c_of_g, k])

    def conv_bias(self, circuit: HECircuit) -> np.ndarray:
        g = np.arange(self.period)
        valid = g < self.channels * self.windows
        period = np.where(valid, circuit.conv_bias[np.where(valid, g // self.windows, 0)], 0.0)
        return np.tile(period, self.groups)

    def hidden_matrix(self, circuit: HECircuit) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, period)`` matrix and bias of the hidden layer with the last layer folded."""
        h, hp, n = self.hidden, self.hidden_pad, self.period
        root = np.sqrt(np.abs(circuit.fc2_weight))
        sign = np.sign(circuit.fc2_weight)
        scaled = circuit.fc1_weight * root[:, None]
        matrix = np.zeros((self.rows, n))
        matrix[:h, : scaled.shape[1]] = scaled
        matrix[hp : hp + h, : scaled.shape[1]] = scaled * sign[:, None]
        bias = np.zeros(self.rows)
        bias[:h] = circuit.fc1_bias * root
        bias[hp : hp + h] = circuit.fc1_bias * root * sign
        return matrix, bias

    def diagonals(self, circuit: HECircuit) -> dict[int, np.ndarray]:
        """Baby-step giant-step diagonals, pre-rotated, as slot vectors (all-zero ones left out).

        ``D_d[j] = M[j mod rows, (j + d) mod P]`` for ``d < rows``; the one used with giant
        step ``k`` is rotated right by ``k * baby``.
        """
        matrix, _ = self.hidden_matrix(circuit)
        n, m = self.period, self.rows
        j = np.arange(n)
        out: dict[int, np.ndarray] = {}
        for d in range(m):
            diag = matrix[j % m, (j + d) % n]
            shift = (d // self.baby) * self.baby
            vec = np.roll(np.tile(diag, self.groups), shift)
            if np.any(vec):
                out[d] = vec
        return out

    def hidden_bias(self, circuit: HECircuit) -> np.ndarray:
        _, bias = self.hidden_matrix(circuit)
        return np.tile(bias, self.slots // self.rows)


def layout_for(circuit: HECircuit, params: CKKSParameters) -> HELayout:
    return HELayout(
        slots=params.slots,
        channels=circuit.channels,
        windows=circuit.windows,
        kernel_elems=circuit.kernel**2,
        hidden=circuit.hidden,
    )


def choose_parameters(circuit: HECircuit, input_range: tuple[float, float]) -> CKKSParameters:
    """The CKKS parameters for *circuit*: the smallest ring that fits, the largest scale.

    The last prime keeps ``ceil(log2(bound)) + 3`` bits above the scale, where ``bound`` is
    the guaranteed :meth:`HECircuit.logit_bound` (CKKS decodes ``v`` correctly while
    ``|v| * scale < q0 / 2``); the special prime matches it; the ``DEPTH`` rescaling primes
    have the scale's size. The scale gets every bit left in the 128-bit-security budget, up
    to ``MAX_SCALE_BITS``.

    Raises
    ------
    HECircuitError
        If no supported ring fits the model (too wide, or a bound too large to decode).
    """
    bound = max(circuit.logit_bound(input_range), 1.0)
    head = math.ceil(math.log2(bound)) + 3
    for degree, budget in MAX_MODULUS_BITS.items():
        layout = HELayout(
            degree // 2, circuit.channels, circuit.windows, circuit.kernel**2, circuit.hidden
        )
        if layout.problems():
            continue
        scale = min(MAX_SCALE_BITS, (budget - 2 * head) // (DEPTH + 2), MAX_PRIME_BITS - head)
        if scale < MIN_SCALE_BITS:
            continue
        bits = (scale + head, *([scale] * DEPTH), scale + head)
        return CKKSParameters(degree, bits, scale, bound)
    raise HECircuitError(
        f"no CKKS ring fits this model (logit bound {bound:.3g}, "
        f"{circuit.channels * circuit.windows} convolution outputs); shrink the model or bound "
        "its weights"
    )


# --------------------------------------------------------------------------------------------
# Reading a torch model


_IGNORED = {"Flatten", "Identity", "Unflatten"}


def he_circuit(plugin: TaskPlugin, model: nn.Module) -> HECircuit:
    """Read *model* into an :class:`HECircuit`; refuse layers the HE evaluator cannot run.

    Raises
    ------
    HECircuitError
        Naming every unsupported layer, a wrong layer order, or a ``forward`` that does not
        compute ``conv -> x² -> linear -> x² -> linear``.
    """
    import torch
    from torch import nn

    layers = [
        (name, module)
        for name, module in model.named_children()
        if type(module).__name__ not in _IGNORED
    ]
    kinds = []
    problems = []
    for name, module in layers:
        if isinstance(module, nn.Conv2d):
            kinds.append("conv")
        elif isinstance(module, nn.Linear):
            kinds.append("linear")
        elif type(module).__name__ == "Square" and not list(module.parameters()):
            kinds.append("square")
        else:
            problems.append(f"layer {name!r} ({type(module).__name__}) cannot run under CKKS")
    expected = ["conv", "square", "linear", "square", "linear"]
    if not problems and kinds != expected:
        problems.append(
            f"layers {kinds} are not conv -> square -> linear -> square -> linear"
        )
    if problems:
        raise HECircuitError("; ".join(problems))
    conv = layers[0][1]
    fc1 = layers[2][1]
    fc2 = layers[4][1]
    assert isinstance(conv, nn.Conv2d) and isinstance(fc1, nn.Linear)
    assert isinstance(fc2, nn.Linear)
    channels_in = plugin.input_shape[0]
    k = conv.kernel_size
    st = conv.stride
    if (
        conv.in_channels != 1
        or channels_in != 1
        or k[0] != k[1]
        or st[0] != st[1]
        or conv.padding not in ((0, 0), "valid")
        or conv.dilation != (1, 1)
        or conv.groups != 1
    ):
        problems.append(
            "the convolution must be single-channel, square, unpadded and undilated"
        )
    if fc2.out_features != 1:
        problems.append("the last linear layer must have one output (a binary logit)")
    if problems:
        raise HECircuitError("; ".join(problems))

    def arr(t: torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
        if t is None:
            return np.zeros(shape)
        return t.detach().cpu().double().numpy().reshape(shape)

    channels = conv.out_channels
    circuit = HECircuit(
        input_shape=plugin.input_shape,
        kernel=int(k[0]),
        stride=int(st[0]),
        conv_weight=arr(conv.weight, (channels, int(k[0]) ** 2)),
        conv_bias=arr(conv.bias, (channels,)),
        fc1_weight=arr(fc1.weight, (fc1.out_features, fc1.in_features)),
        fc1_bias=arr(fc1.bias, (fc1.out_features,)),
        fc2_weight=arr(fc2.weight, (fc2.in_features,)),
        fc2_bias=float(arr(fc2.bias, (1,))[0]),
    )
    if circuit.channels * circuit.windows != fc1.in_features:
        raise HECircuitError(
            f"the hidden layer takes {fc1.in_features} inputs, the convolution gives "
            f"{circuit.channels * circuit.windows}"
        )
    # The forward must be the circuit (a custom forward could do anything).
    lo, hi = plugin.he_encoding.input_range
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand((3, *plugin.input_shape), generator=gen, dtype=torch.float64)
    probe = lo + (hi - lo) * probe
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected_out = model.double()(probe).reshape(-1).numpy()
    finally:
        model.float()
        model.train(was_training)
    got = circuit.logits(probe.numpy())
    if not np.allclose(got, expected_out, rtol=1e-6, atol=1e-6):
        raise HECircuitError(
            "the model's forward does not compute conv -> x² -> linear -> x² -> linear"
        )
    return circuit
