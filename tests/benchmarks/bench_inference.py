"""Benchmark: encrypted inference per image, fednode against the tutorial-style TenSEAL baseline.

Run, from the repository root (one command):

    python tests/benchmarks/bench_inference.py [--images 12] [--batch 8]

It trains the chest task's model briefly on generated studies (``tests/support/inference``),
starts ``fednode inference-server`` on loopback with default settings, and runs a held-out
generated set through both paths, image by image and interleaved (so machine load hits both
alike):

- **fednode**: the node's real client (``EncryptedPredictor``) over HTTP: per-model CKKS
  parameters, replicated im2col input (4 ciphertexts), baby-step giant-step hidden layer, the
  output layer folded into the last square; the logit is averaged over all slots on decryption.
- **baseline**: the same network written the way TenSEAL's encrypted-MNIST tutorial does it,
  in process (no wire): ``im2col_encoding``, ``conv2d_im2col`` per channel, ``pack_vectors``,
  ``square``, ``mm`` for each dense layer; N=8192, primes [31, 26 x 6, 31], scale 2^26, all
  power-of-two Galois keys.

Reported per image (median): preprocess, encrypt, server evaluation, decrypt, total (wall and
CPU), bytes sent and received; the one-off context registration; images/s with ``--batch``
studies in one request; the largest probability error against the plaintext model. The
machine is shared: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def baseline_setup(circuit):  # type: ignore[no-untyped-def]
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31]
    )
    ctx.global_scale = 2**26
    ctx.generate_galois_keys()
    k = circuit.kernel
    kernels = [w.reshape(k, k).tolist() for w in circuit.conv_weight]
    return ctx, kernels


def baseline_image(ctx, kernels, circuit, image):  # type: ignore[no-untyped-def]
    """One image the tutorial's way; returns (logit, timings, bytes sent, bytes received)."""
    import tenseal as ts

    t0, c0 = time.perf_counter(), time.process_time()
    enc_x, windows = ts.im2col_encoding(
        ctx, image.tolist(), circuit.kernel, circuit.kernel, circuit.stride
    )
    sent = len(enc_x.serialize())
    t1, c1 = time.perf_counter(), time.process_time()
    channels = [
        enc_x.conv2d_im2col(kernel, windows) + float(b)
        for kernel, b in zip(kernels, circuit.conv_bias, strict=True)
    ]
    enc = ts.CKKSVector.pack_vectors(channels)
    enc.square_()
    enc = enc.mm(circuit.fc1_weight.T.tolist()) + circuit.fc1_bias.tolist()
    enc.square_()
    enc = enc.mm(circuit.fc2_weight.reshape(-1, 1).tolist()) + float(circuit.fc2_bias)
    received = len(enc.serialize())
    t2, c2 = time.perf_counter(), time.process_time()
    logit = float(enc.decrypt()[0])
    t3, c3 = time.perf_counter(), time.process_time()
    timings = {
        "encrypt": (t1 - t0, c1 - c0),
        "evaluate": (t2 - t1, c2 - c1),
        "decrypt": (t3 - t2, c3 - c2),
        "total": (t3 - t0, c3 - c0),
    }
    return logit, timings, sent, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=12, help="held-out images")
    parser.add_argument("--batch", type=int, default=8, help="studies per request (batch row)")
    args = parser.parse_args()

    from node.inference.client import EncryptedPredictor, ServiceClient, sigmoid
    from node.inference.keystore import KeyStore
    from node.inference.service import TokenStore
    from node.keys import NodeKeys
    from node.tasks.training import load_artifact
    from plugins.base import resolve_task
    from plugins.he import he_circuit
    from storage.db import Database
    from tests.support.inference import RunningService, train_artifact

    plugin = resolve_task("chest_xray")
    work = Path(tempfile.mkdtemp(prefix="fednode-bench-he-"))
    print("training the model on generated studies ...", flush=True)
    artifact = train_artifact(work / "models", plugin)
    model, _ = load_artifact(artifact, plugin)
    circuit = he_circuit(plugin, model)
    print(f"generating {args.images} held-out studies ...", flush=True)
    studies = list(plugin.synthetic_studies(args.images, seed=4242, image_size=96))
    pre_times = []
    inputs = []
    for study in studies:
        t0 = time.perf_counter()
        inputs.append(plugin.preprocess(list(study.datasets)))
        pre_times.append(time.perf_counter() - t0)
    x = np.stack(inputs)
    plain = np.array([sigmoid(v) for v in circuit.logits(x)])

    state = work / "service"
    token = TokenStore(state).issue("bench")
    db = Database(f"sqlite:///{work / 'node.db'}")
    db.upgrade()
    keys = NodeKeys.from_master(b"\x05" * 32)
    ctx, kernels = baseline_setup(circuit)
    with RunningService(artifact, state) as service:
        client = ServiceClient(service.url, token)
        predictor = EncryptedPredictor(client, KeyStore(db, keys.he, timedelta(days=30)))
        info = client.model_info()
        # The one-off registration (key generation + upload), measured on its own.
        r0 = time.perf_counter()
        (first,) = predictor.predict(plugin, [x[0]])
        registration = (time.perf_counter() - r0, first.registration_bytes)
        ours: list[dict[str, float]] = []
        base: list[dict[str, float]] = []
        ours_err, base_err = [], []
        for i, image in enumerate(x):
            logit, t, sent, received = baseline_image(ctx, kernels, circuit, image[0])
            base.append(
                {**{k: v[0] for k, v in t.items()}, **{k + "_cpu": v[1] for k, v in t.items()},
                 "sent": sent, "received": received}
            )
            base_err.append(abs(sigmoid(logit) - plain[i]))
            c0, w0 = time.process_time(), time.perf_counter()
            (pred,) = predictor.predict(plugin, [image])
            node_cpu = time.process_time() - c0
            wall = time.perf_counter() - w0
            tm = pred.timings
            ours.append(
                {
                    "encrypt": tm["encode"] + tm["encrypt"],
                    "evaluate": tm["evaluate"],
                    "server_cpu": tm["evaluate_cpu"],
                    "service": tm["service"],
                    "decrypt": tm["decrypt"],
                    "total": wall,
                    "node_cpu": node_cpu,
                    "sent": pred.bytes_sent,
                    "received": pred.bytes_received,
                }
            )
            ours_err.append(abs(pred.probability - plain[i]))
            print(
                f"image {i + 1}/{len(x)}: baseline {base[-1]['total']:.2f} s, "
                f"fednode {wall:.2f} s",
                flush=True,
            )
        # Several studies waiting: one request.
        batch = list(x[: args.batch])
        b0 = time.perf_counter()
        batch_preds = predictor.predict(plugin, batch)
        batch_seconds = time.perf_counter() - b0
        ours_err += [abs(p.probability - plain[i]) for i, p in enumerate(batch_preds)]
        client.close()
    db.dispose()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    pre = statistics.median(pre_times)
    print()
    print(f"model {info.model_id}: fednode CKKS N={info.params.poly_modulus_degree}, primes "
          f"{list(info.params.coeff_mod_bit_sizes)}, scale 2^{info.params.scale_bits}, "
          f"{info.layout.copies} input ciphertexts, {len(info.rotations)} rotation keys; "
          f"{len(x)} images, median per image; preprocess {pre * 1000:.1f} ms (both)")
    print()
    print("| path | encrypt | server evaluation | decrypt | total wall | total CPU | sent | "
          "received | max prob. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| baseline (tutorial TenSEAL, in process) | {med(base, 'encrypt'):.3f} s | "
        f"{med(base, 'evaluate'):.3f} s (CPU {med(base, 'evaluate_cpu'):.3f} s) | "
        f"{med(base, 'decrypt'):.3f} s | "
        f"{med(base, 'total'):.3f} s | {med(base, 'total_cpu'):.3f} s | "
        f"{med(base, 'sent') / 1e6:.2f} MB | {med(base, 'received') / 1e3:.0f} kB | "
        f"{max(base_err):.1e} |"
    )
    print(
        f"| fednode (HTTP service on loopback) | {med(ours, 'encrypt'):.3f} s | "
        f"{med(ours, 'evaluate'):.3f} s (CPU {med(ours, 'server_cpu'):.3f} s; round trip "
        f"{med(ours, 'service'):.3f} s) | "
        f"{med(ours, 'decrypt'):.3f} s | {med(ours, 'total'):.3f} s | "
        f"{med(ours, 'node_cpu') + med(ours, 'server_cpu'):.3f} s (node "
        f"{med(ours, 'node_cpu'):.3f} + service {med(ours, 'server_cpu'):.3f}) | "
        f"{med(ours, 'sent') / 1e6:.2f} MB | {med(ours, 'received') / 1e3:.0f} kB | "
        f"{max(ours_err):.1e} |"
    )
    speed = med(base, "total") / med(ours, "total")
    print()
    print(f"per image: fednode {speed:.1f}x faster than the baseline (wall, total); server "
          f"evaluation {med(base, 'evaluate') / med(ours, 'evaluate'):.1f}x")
    print(f"context registration (once per key period): {registration[1] / 1e6:.1f} MB, "
          f"{registration[0]:.1f} s including key generation and the first image")
    print(f"batch of {len(batch)} studies in one request: {len(batch) / batch_seconds:.2f} "
          f"images/s (single requests: {1 / med(ours, 'total'):.2f} images/s)")
    ok = speed >= 4 and max(ours_err) <= 1e-3
    print(f"target (>= 4x faster AND error <= 1e-3): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
