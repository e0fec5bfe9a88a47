"""CKKS with TenSEAL: the node's keys and encryption, the model owner's evaluator.

The node holds a :class:`SecretContext` (TenSEAL context with the secret key; persisted only
sealed, see :mod:`node.inference.keystore`). From it the node makes the *public bundle* it
registers with the service once per key period: the TenSEAL context without the secret key
(relinearisation keys only) and SEAL Galois keys for exactly the rotations the model's layout
uses (:meth:`plugins.he.HELayout.rotation_steps`). Each image travels as
``layout.copies`` ciphertexts; the service returns one ciphertext whose every slot holds the
logit. Decrypted values never go back to the service.

The evaluator (:class:`Evaluator`) works on SEAL objects directly (``tenseal.sealapi``):
plaintext weights are encoded once per registered context, at the level and scale they are
used at, and the hidden layer is a baby-step giant-step diagonal product (see
:class:`plugins.he.HELayout`).

SEAL objects serialise through files only in TenSEAL's bindings: ciphertexts and Galois keys
(never the secret key, which is serialised in memory by TenSEAL) pass through a private
temporary directory.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from node.errors import NodeError
from plugins.he import CKKSParameters, HECircuit, HELayout, layout_for


class CKKSError(NodeError):
    """A CKKS object could not be created, read or evaluated."""


def _ts() -> Any:
    import tenseal

    return tenseal


def _seal() -> Any:
    import tenseal.sealapi as sealapi

    return sealapi


@cache
def _tmpdir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    return Path(tempfile.mkdtemp(prefix="fednode-ckks-", dir=base))


def _save(obj: Any) -> bytes:
    fd, name = tempfile.mkstemp(dir=_tmpdir())
    os.close(fd)
    try:
        obj.save(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def _load(obj: Any, seal_context: Any, data: bytes) -> Any:
    fd, name = tempfile.mkstemp(dir=_tmpdir())
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        obj.load(seal_context, name)
    except Exception as exc:
        raise CKKSError(f"not a valid CKKS object for these parameters: {exc}") from exc
    finally:
        os.unlink(name)
    return obj


def galois_element(step: int, degree: int) -> int:
    """SEAL's Galois element of a left rotation by *step* slots (``3**step mod 2N``)."""
    half = degree // 2
    if not 0 < abs(step) < half:
        raise ValueError(f"rotation step {step} out of range")
    power = step if step > 0 else half + step
    return pow(3, power, 2 * degree)


# --------------------------------------------------------------------------------------------
# Node side


class SecretContext:
    """The node's CKKS context with its secret key (never leaves the node in clear)."""

    def __init__(self, context: Any, params: CKKSParameters) -> None:
        if not context.is_private():
            raise CKKSError("a secret context needs the secret key")
        self.context = context
        self.params = params
        seal = _seal()
        sc = context.data.seal_context()
        self._sc = sc
        self._secret = context.data.secret_key()
        self._encoder = seal.CKKSEncoder(sc)
        self._encryptor = seal.Encryptor(sc, self._secret)
        self._decryptor = seal.Decryptor(sc, self._secret)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, params: CKKSParameters) -> SecretContext:
        """A fresh key for *params*."""
        ts = _ts()
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            )
        except Exception as exc:
            raise CKKSError(f"cannot create a CKKS context: {exc}") from exc
        ctx.global_scale = 2.0**params.scale_bits
        return cls(ctx, params)

    def serialize_secret(self) -> bytes:
        """The context with its secret key (seal it before storing it anywhere)."""
        data: bytes = self.context.serialize(
            save_public_key=False,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return data

    @classmethod
    def from_secret(cls, data: bytes, params: CKKSParameters) -> SecretContext:
        ts = _ts()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:
            raise CKKSError(f"the stored CKKS key cannot be read: {type(exc).__name__}") from exc
        ctx.global_scale = 2.0**params.scale_bits
        return cls(ctx, params)

    def public_bundle(self, steps: Sequence[int]) -> tuple[bytes, bytes]:
        """``(context without secret key, Galois keys for *steps*)`` for the service."""
        seal = _seal()
        # A copy made by deserialising the secret form: TenSEAL's ``copy()`` of a context
        # loaded from that form (the key store's, after a restart) dies in a segfault.
        ctx = _ts().context_from(self.serialize_secret())
        ctx.generate_relin_keys()
        public: bytes = ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=True,
        )
        degree = self.params.poly_modulus_degree
        keygen = seal.KeyGenerator(self._sc, self._secret)
        galois = keygen.create_galois_keys([galois_element(s, degree) for s in steps])
        return public, _save(galois)

    def encrypt_vectors(self, vectors: Sequence[np.ndarray]) -> list[bytes]:
        """Encrypt slot vectors (symmetric encryption under the secret key)."""
        seal = _seal()
        scale = 2.0**self.params.scale_bits
        out = []
        with self._lock:
            for vec in vectors:
                pt = seal.Plaintext()
                self._encoder.encode(np.asarray(vec, dtype=np.float64).tolist(), scale, pt)
                ct = seal.Ciphertext()
                self._encryptor.encrypt_symmetric(pt, ct)
                out.append(_save(ct))
        return out

    def decrypt_vector(self, data: bytes) -> np.ndarray:
        seal = _seal()
        ct = _load(seal.Ciphertext(), self._sc, data)
        with self._lock:
            pt = seal.Plaintext()
            try:
                self._decryptor.decrypt(ct, pt)
            except Exception as exc:
                raise CKKSError(f"the result cannot be decrypted: {exc}") from exc
            return np.asarray(self._encoder.decode_double(pt), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Service side


class PublicContext:
    """A node's registered public context: TenSEAL context (no secret key) + Galois keys."""

    def __init__(self, public: bytes, galois: bytes) -> None:
        ts = _ts()
        try:
            ctx = ts.context_from(public)
        except Exception as exc:
            raise CKKSError(f"not a TenSEAL context: {type(exc).__name__}") from exc
        if ctx.is_private() or ctx.data.has_secret_key():
            raise SecretKeyRefused()
        if not ctx.data.has_relin_keys():
            raise CKKSError("the context has no relinearisation keys")
        self.context = ctx
        self.seal_context = ctx.data.seal_context()
        self.relin = ctx.data.relin_keys()
        self.galois = _load(_seal().GaloisKeys(), self.seal_context, galois)

    def parameters(self) -> tuple[int, tuple[int, ...]]:
        """``(poly_modulus_degree, coefficient modulus bit sizes)`` of the context."""
        data = self.seal_context.key_context_data()
        parms = data.parms()
        degree = int(parms.poly_modulus_degree())
        bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
        return degree, bits


class SecretKeyRefused(CKKSError):
    """The context carries a secret key: a node must never send it; it is refused."""


class Evaluator:
    """Evaluates one model's circuit on the ciphertexts of one registered context."""

    def __init__(self, circuit: HECircuit, params: CKKSParameters, ctx: PublicContext) -> None:
        seal = _seal()
        degree, bits = ctx.parameters()
        if degree != params.poly_modulus_degree or bits != params.coeff_mod_bit_sizes:
            raise CKKSError(
                f"the context's parameters (N={degree}, {list(bits)}) are not the model's "
                f"(N={params.poly_modulus_degree}, {list(params.coeff_mod_bit_sizes)})"
            )
        self.circuit = circuit
        self.params = params
        self.layout: HELayout = layout_for(circuit, params)
        self.ctx = ctx
        sc = ctx.seal_context
        self._ev = seal.Evaluator(sc)
        self._enc = seal.CKKSEncoder(sc)
        data = sc.first_context_data()
        self._levels = []
        while data is not None:
            self._levels.append(data)
            data = data.next_context_data()
        self._lock = threading.Lock()
        lay = self.layout
        self._conv = [self._mult_pt(v, 0) for v in lay.conv_plaintexts(circuit)]
        self._diag = {d: self._mult_pt(v, 2) for d, v in lay.diagonals(circuit).items()}
        self._conv_bias = lay.conv_bias(circuit)
        self._hidden_bias = lay.hidden_bias(circuit)

    def _prime(self, level: int) -> float:
        """The prime dropped by the rescaling after a product at *level*."""
        parms = self._levels[level].parms()
        return float(parms.coeff_modulus()[-1].value())

    def _mult_pt(self, values: np.ndarray, level: int) -> Any:
        seal = _seal()
        pt = seal.Plaintext()
        self._enc.encode(
            np.asarray(values).tolist(),
            self._levels[level].parms_id(),
            self._prime(level),
            pt,
        )
        return pt

    def _add_values(self, ct: Any, values: np.ndarray | float) -> None:
        seal = _seal()
        pt = seal.Plaintext()
        if isinstance(values, float):
            self._enc.encode(values, ct.parms_id(), ct.scale, pt)
        else:
            self._enc.encode(np.asarray(values).tolist(), ct.parms_id(), ct.scale, pt)
        self._ev.add_plain_inplace(ct, pt)

    def _rot(self, ct: Any, step: int) -> Any:
        seal = _seal()
        out = seal.Ciphertext()
        self._ev.rotate_vector(ct, step, self.ctx.galois, out)
        return out

    def _rotate_sum(self, ct: Any, steps: Sequence[int]) -> None:
        for step in steps:
            self._ev.add_inplace(ct, self._rot(ct, step))

    def load_ciphertext(self, data: bytes) -> Any:
        ct = _load(_seal().Ciphertext(), self.ctx.seal_context, data)
        if ct.parms_id() != self._levels[0].parms_id() or ct.size() != 2:
            raise CKKSError("an input ciphertext is not a fresh ciphertext of this context")
        return ct

    def evaluate(self, inputs: Sequence[bytes]) -> bytes:
        """The encrypted logit (in every slot) of one image given as its input ciphertexts."""
        lay = self.layout
        if len(inputs) != lay.copies:
            raise CKKSError(f"an image is {lay.copies} ciphertexts, not {len(inputs)}")
        cts = [self.load_ciphertext(b) for b in inputs]
        seal = _seal()
        ev = self._ev
        with self._lock:
            # Convolution: one product per copy, their sum, rotate-and-sum over the groups.
            acc = None
            for ct, pt in zip(cts, self._conv, strict=True):
                ev.multiply_plain_inplace(ct, pt)
                if acc is None:
                    acc = ct
                else:
                    ev.add_inplace(acc, ct)
            assert acc is not None
            ev.rescale_to_next_inplace(acc)
            self._rotate_sum(acc, lay.conv_steps())
            self._add_values(acc, self._conv_bias)
            ev.square_inplace(acc)
            ev.relinearize_inplace(acc, self.ctx.relin)
            ev.rescale_to_next_inplace(acc)
            # Hidden layer: baby-step giant-step diagonal product.
            baby = [acc] + [self._rot(acc, step) for step in range(1, lay.baby)]
            total = None
            for k in range(lay.giant):
                part = None
                for j in range(lay.baby):
                    pt = self._diag.get(k * lay.baby + j)
                    if pt is None:
                        continue
                    prod = seal.Ciphertext()
                    ev.multiply_plain(baby[j], pt, prod)
                    if part is None:
                        part = prod
                    else:
                        ev.add_inplace(part, prod)
                if part is None:
                    continue
                if k:
                    ev.rotate_vector_inplace(part, k * lay.baby, self.ctx.galois)
                if total is None:
                    total = part
                else:
                    ev.add_inplace(total, part)
            if total is None:
                raise CKKSError("the model's hidden layer is all zero")
            ev.rescale_to_next_inplace(total)
            self._rotate_sum(total, lay.fold_steps())
            self._add_values(total, self._hidden_bias)
            # Last square with the output layer folded in: sum_j sign_j z_j * z_j.
            other = self._rot(total, lay.hidden_pad)
            ev.multiply_inplace(total, other)
            ev.relinearize_inplace(total, self.ctx.relin)
            ev.rescale_to_next_inplace(total)
            self._rotate_sum(total, lay.sum_steps())
            self._add_values(total, float(self.circuit.fc2_bias))
        return _save(total)
