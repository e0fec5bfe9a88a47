"""Benchmark: federated vs local-only vs centralised training of the chest task on three
synthetic sites, and a gradient-inversion attack on one site's update.

Run, from the repository root (one command; SciPy comes with the ``bench`` extra,
``pip install -e ".[bench]"``):

    python tests/benchmarks/bench_federated.py [--studies 100] [--rounds 40] [--seeds 5]

Part 1 (utility). Three sites (different seeds and prevalences, as in the tests) of
``--studies`` labelled studies each, stored and read back through the node's storage; a
shared held-out set of 300 studies that no site has. Every row is trained once per seed
(``--seeds``: initial weights and shuffling; the sites and the held-out set stay the same),
and the table gives the mean AUC over the seeds with its range: one seed's AUC moves by
+-0.02 on this set, as much as the target. Rows, all measured on the shared set:

- local-only, per site: ``fit_round`` for ``rounds x local_epochs`` epochs on the site's own
  training part;
- federated: the reference ServerApp workflow (FedAvg + SecAgg+ + client-side clipping) over
  the in-process grid, ``--rounds`` rounds of ``--local-epochs`` epochs, without DP (plain
  FedAvg, and FedAvgM with server momentum 0.5) and with central DP noise (node-level DP,
  epsilon at delta = 1e-5 from the RDP accountant);
- centralised: the same epochs on the union of the three training parts.

Every row trains at ``--learning-rate`` (2e-3: at 5e-3, centralised training stalled at a
training AUC of 0.84-0.94 for two seeds in five).

Wall time per round is the federated run's time divided by its rounds (in-process: training
plus SecAgg+'s cryptography; a deployment adds the network and Flower's polling).

Part 2 (privacy). A DLG/iDLG-style gradient inversion (Zhu et al. 2019; Geiping et al. 2020:
cosine gradient matching with a total-variation prior) against the update of one site on a
batch of two images after one local SGD step -- the attacker's best case: it knows the global
model, the labels and the learning rate, and sees the site's individual update (no SecAgg+).
Rows: the raw update, the update clipped to norm C, and clipped + Gaussian noise of
``sigma * C`` per coordinate (the node's local DP). Reconstruction quality against the real
inputs: SSIM and PSNR (on [0, 1]). The side-by-side image goes to
``docs/federation/gradient_inversion.png``.

The machine is shared: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.federated.env import quiet_flower  # noqa: E402

quiet_flower()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.client import ClientApp  # noqa: E402
from torch import nn  # noqa: E402

from node.federated import client as fed_client  # noqa: E402
from node.federated.client import fixed_client_fn  # noqa: E402
from node.federated.inprocess import InProcessGrid  # noqa: E402
from node.federated.params import set_weights  # noqa: E402
from node.federated.server import RunSettings, run_federation  # noqa: E402
from node.tasks.training import (  # noqa: E402
    LabelledData,
    TrainOptions,
    evaluate,
    fit_round,
    load_labelled,
)
from plugins.base import TaskPlugin, resolve_task  # noqa: E402
from tests.support.federation import make_site, shared_holdout  # noqa: E402


def _train(
    plugin: TaskPlugin, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    model = plugin.build_model()
    fit_round(plugin, model, x, y, TrainOptions(), epochs=epochs, learning_rate=lr, seed=seed)
    return model


def _federated(
    plugin: TaskPlugin, datas: list[LabelledData], settings: RunSettings
) -> tuple[nn.Module, float, float | None]:
    nodes = {
        10 + i: (ClientApp(client_fn=fixed_client_fn(plugin, d), mods=fed_client.MODS[::2]), {})
        for i, d in enumerate(datas)
    }
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    started = time.perf_counter()
    summary = run_federation(InProcessGrid(nodes), ctx, settings, save=False)
    seconds = time.perf_counter() - started
    assert summary.completed_rounds == settings.num_rounds, summary.rounds
    model = plugin.build_model()
    set_weights(model, summary.parameters)  # type: ignore[arg-type]
    return model, seconds / settings.num_rounds, summary.epsilon


@dataclass
class Row:
    """One model of the utility table, trained once per seed (initial weights, shuffling)."""

    name: str
    auc: list[float] = field(default_factory=list)
    mcc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    def cells(self) -> tuple[str, str, str]:
        auc = f"{statistics.mean(self.auc):.3f}"
        if len(self.auc) > 1:
            auc += f" ({min(self.auc):.3f}-{max(self.auc):.3f})"
        return auc, f"{statistics.mean(self.mcc):.3f}", self.note


def utility(args: argparse.Namespace) -> list[Row]:
    """Every row once per seed in ``range(args.seeds)``; the table gives the mean AUC (range)."""
    plugin = resolve_task("chest_xray")
    root = Path(tempfile.mkdtemp(prefix="fednode-bench-fed-"))
    datas = []
    for i in range(3):
        ctx, _ = make_site(root / f"site{i}", plugin, i, args.studies)
        datas.append(load_labelled(ctx.db, ctx.blobs, plugin, holdout=0.25, seed=0))
    hx, hy = shared_holdout(plugin, 300)
    epochs = args.rounds * args.local_epochs
    lr = args.learning_rate
    xs = torch.cat([d.train[0] for d in datas])
    ys = torch.cat([d.train[1] for d in datas])
    rows: dict[str, Row] = {}

    def measure(key: str, name: str, model: nn.Module, seconds: float, note: str = "") -> None:
        m = evaluate(plugin, model, hx, hy)[1]
        row = rows.setdefault(key, Row(name))
        row.auc.append(m.auc)
        row.mcc.append(m.mcc)
        row.seconds.append(seconds)
        row.note = note or f"{statistics.median(row.seconds):.1f} s"
        print(f"  {name:48} AUC {m.auc:.3f} MCC {m.mcc:.3f} {seconds:.1f} s {note}", flush=True)

    federated = [
        ("fed", "federated FedAvg, SecAgg+ + clipping (C=10), no DP", {}),
        ("fedm", "federated FedAvgM (momentum 0.5), SecAgg+ + clipping, no DP",
         {"server_momentum": 0.5}),
        ("dp1", "federated + central DP (z=0.5, C=2)",
         {"noise_multiplier": 0.5, "clipping_norm": 2.0}),
        ("dp2", "federated + central DP (z=1.0, C=2)",
         {"noise_multiplier": 1.0, "clipping_norm": 2.0}),
    ]
    for seed in range(args.seeds):
        print(f"seed {seed}:", flush=True)
        for i, d in enumerate(datas):
            t = time.perf_counter()
            x, y = d.train
            model = _train(plugin, x, y, epochs, lr, seed)
            measure(f"local{i}", f"local-only, site {i + 1} ({len(y)} studies)", model,
                    time.perf_counter() - t)
        for key, name, extra in federated:
            settings = RunSettings(num_rounds=args.rounds, min_nodes=3,
                                   local_epochs=args.local_epochs, learning_rate=lr, seed=seed,
                                   **extra)  # type: ignore[arg-type]
            model, per_round, eps = _federated(plugin, datas, settings)
            note = f"{per_round:.2f} s/round (in process)"
            if eps is not None:
                note += f", eps = {eps:.1f} at delta = 1e-5 (node-level)"
            measure(key, name, model, per_round * settings.num_rounds, note)
        t = time.perf_counter()
        model = _train(plugin, xs, ys, epochs, lr, seed)
        measure("central", f"centralised on the union ({len(ys)} studies)", model,
                time.perf_counter() - t)
    central = statistics.mean(rows["central"].auc)
    for key in ("fed", "fedm"):
        gap = central - statistics.mean(rows[key].auc)
        verdict = "met" if gap <= 0.02 else "NOT met"
        print(f"{rows[key].name}: {gap:.3f} AUC below centralised (mean of {args.seeds} "
              f"seeds; target <= 0.02: {verdict})")
    return list(rows.values())


# --- gradient inversion -----------------------------------------------------------------------


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two images in [0, 1]: 11x11 Gaussian window, sigma 1.5."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = 0.01**2, 0.03**2
    f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    saa = f(a * a) - mu_a**2
    sbb = f(b * b) - mu_b**2
    sab = f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool
) -> list[torch.Tensor]:
    loss = nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y)
    return list(torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph))


def invert(
    model: nn.Module,
    target: list[torch.Tensor],
    y: torch.Tensor,
    shape: tuple[int, ...],
    steps: int,
    seed: int,
) -> torch.Tensor:
    """Reconstruct the batch from a gradient: cosine matching + total variation."""
    torch.manual_seed(seed)
    z = torch.zeros(shape).normal_(0, 0.5).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    norms = [t.norm() + 1e-12 for t in target]
    for _ in range(steps):
        x = torch.tanh(z)
        grads = _gradients(model, x, y, create_graph=True)
        cos = sum(
            1 - (g * t).sum() / (g.norm() * n + 1e-12)
            for g, t, n in zip(grads, target, norms, strict=True)
        )
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
            x[..., :, 1:] - x[..., :, :-1]
        ).abs().mean()
        loss = cos + 0.02 * tv
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.tanh(z).detach()


class LeakyMLP(nn.Module):
    """A model *without* the reference model's compressing convolution: a dense first layer
    on the raw pixels, the architecture DLG/iDLG papers attack."""

    def __init__(self, pixels: int, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        out: torch.Tensor = self.fc2(h * h)
        return out


def _analytic(update: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """iDLG-style closed form for a dense first layer and a batch of one: each row of the
    weight gradient is the input times that row's bias gradient (least squares over rows)."""
    dw, db = update[0], update[1]
    x = (db[:, None] * dw).sum(0) / (db**2).sum().clamp_min(1e-20)
    return x.reshape(shape).clamp(-1, 1)


def _defended(
    update: list[torch.Tensor], clip: float, sigma: float, seed: int
) -> list[torch.Tensor]:
    norm = float(torch.sqrt(sum((u**2).sum() for u in update)))
    out = [u * min(1.0, clip / norm) for u in update]
    if sigma > 0:
        rng = torch.Generator().manual_seed(seed)
        out = [u + torch.randn(u.shape, generator=rng) * sigma * clip for u in out]
    return out


def attack(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    plugin = resolve_task("chest_xray")
    batch = list(plugin.synthetic_studies(8, seed=4242, image_size=128))
    xs = torch.stack([torch.from_numpy(plugin.preprocess(list(s.datasets))) for s in batch])
    ys = torch.tensor([float(plugin.class_index(s.label)) for s in batch])
    idx = [int(torch.nonzero(ys == 0)[0]), int(torch.nonzero(ys == 1)[0])]
    originals = ((xs[idx].numpy()[:, 0] + 1) / 2).clip(0, 1)
    lr = 0.01
    cases = [
        ("raw update", 0.0, 0.0),
        (f"clipped (C = {args.clip_fraction:g} x norm)", args.clip_fraction, 0.0),
        (f"clipped + local DP (sigma = {args.sigma:g})", args.clip_fraction, args.sigma),
    ]
    rows: list[tuple[str, float, float]] = []
    figure: list[tuple[str, np.ndarray]] = []
    for model_name in ("dense-first-layer model", "reference chest model"):
        for case, fraction, sigma in cases:
            t = time.perf_counter()
            images = []
            for k, i in enumerate(idx):  # each image's own update (a batch of one)
                x, y = xs[i : i + 1], ys[i : i + 1]
                torch.manual_seed(1)
                model = (
                    LeakyMLP(int(np.prod(plugin.input_shape)))
                    if model_name.startswith("dense")
                    else plugin.build_model()
                )
                update = [-lr * g for g in _gradients(model, x, y, create_graph=False)]
                if fraction > 0:
                    norm = float(torch.sqrt(sum((u**2).sum() for u in update)))
                    update = _defended(update, fraction * norm, sigma, seed=7 + k)
                target = [-u / lr for u in update]
                if model_name.startswith("dense"):
                    rec = _analytic(target, tuple(x.shape))
                else:
                    rec = invert(model, target, y, tuple(x.shape), args.steps, seed=3)
                images.append(((rec.numpy()[0, 0] + 1) / 2).clip(0, 1))
            ssim = float(np.mean([_ssim(o, r) for o, r in zip(originals, images, strict=True)]))
            psnr = float(np.mean([_psnr(o, r) for o, r in zip(originals, images, strict=True)]))
            name = f"{model_name}: {case}"
            rows.append((name, ssim, psnr))
            figure.append((name, np.stack(images)))
            print(
                f"  {name:64} SSIM {ssim:.3f} PSNR {psnr:5.1f} dB "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    _save_figure(
        originals,
        [f[1] for f in figure],
        [f[0] for f in figure],
        ROOT / "docs" / "federation" / "gradient_inversion.png",
    )
    return rows


def _save_figure(
    originals: np.ndarray, recons: list[np.ndarray], names: list[str], path: Path
) -> None:
    from PIL import Image, ImageDraw

    scale, pad, label_w = 2, 6, 300
    cell = originals.shape[-1] * scale
    rows = [("real inputs", originals), *zip(names, recons, strict=True)]
    width = label_w + len(originals) * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        top = pad + r * (cell + pad)
        draw.multiline_text((pad, top + cell // 2 - 12), name.replace(": ", ":\n"), fill=0)
        for c, img in enumerate(images):
            tile = Image.fromarray((img * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (cell + pad), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"  figure: {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100, help="labelled studies per site")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="every row's")
    parser.add_argument("--seeds", type=int, default=5,
                        help="train every utility row once per seed (0..N-1)")
    parser.add_argument("--steps", type=int, default=600, help="attack iterations")
    parser.add_argument("--clip-fraction", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=1.0, help="local DP noise multiplier")
    parser.add_argument("--skip-utility", action="store_true")
    parser.add_argument("--skip-attack", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_utility:
        print("utility (shared held-out set of 300 studies):")
        rows = utility(args)
        print(f"\n| model | AUC, mean of {args.seeds} seeds (range) | MCC (mean) | time |")
        print("|---|---|---|---|")
        for row in rows:
            auc, mcc, note = row.cells()
            print(f"| {row.name} | {auc} | {mcc} | {note} |")
    if args.skip_attack:
        return
    print("\ngradient inversion on one site's update:")
    attack_rows = attack(args)
    print("\n| update seen by the attacker | SSIM | PSNR (dB) |\n|---|---|---|")
    for name, ssim, psnr in attack_rows:
        print(f"| {name} | {ssim:.3f} | {psnr:.1f} |")


if __name__ == "__main__":
    main()
