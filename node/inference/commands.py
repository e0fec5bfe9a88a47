"""CLI of encrypted inference: ``fednode inference-server`` (and its ``token`` commands) for
the model owner, ``fednode infer`` for a node's administrator or data scientist."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from node.cli_common import ConfigOpt, JsonOpt, console, err
from node.errors import ExitCode, NodeError

server_app = typer.Typer(
    help="The model owner's encrypted-inference service (--model ARTIFACT) and its node tokens.",
    invoke_without_command=True,
)
token_app = typer.Typer(
    help="Per-node tokens of the service (stored hashed).", no_args_is_help=True
)
server_app.add_typer(token_app, name="token")

StateOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="the service's state: token hashes and registered public contexts",
    ),
]
DEFAULT_STATE = Path("fednode-inference")


@server_app.callback()
def run_server(
    context: typer.Context,
    model: Annotated[
        Path | None, typer.Option("--model", help="model artifact (.pt) to serve")
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8443,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key")] = None,
    task: Annotated[
        str | None, typer.Option(help="task reference (default: the artifact's task)")
    ] = None,
    state_dir: StateOpt = DEFAULT_STATE,
    max_body_mb: Annotated[int, typer.Option(help="largest evaluation request")] = 64,
    rate: Annotated[float, typer.Option(help="evaluation requests per node and minute")] = 600.0,
) -> None:
    """Serve MODEL: evaluate the task's network on nodes' ciphertexts (never sees a value)."""
    import logging

    if context.invoked_subcommand is not None:
        return
    if model is None:
        err.print("give --model ARTIFACT to serve, or a command (token issue|list|revoke)")
        raise typer.Exit(int(ExitCode.USAGE))

    from node.inference.service import Limits, ServiceError, load_served_model, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise ServiceError("give both --tls-cert and --tls-key, or neither")
    served = load_served_model(model, task)
    p = served.params
    console.print(
        f"model {served.model_id} (task {served.plugin.name} {served.plugin.version}): "
        f"CKKS N={p.poly_modulus_degree}, primes {list(p.coeff_mod_bit_sizes)}, "
        f"scale 2^{p.scale_bits}, logit bound {p.logit_bound:.3g} "
        f"(decoding headroom {p.headroom:.3g})",
        highlight=False,
    )
    limits = Limits(max_evaluate_bytes=max_body_mb * 1024 * 1024, rate_per_minute=rate)

    def announce(url: str) -> None:
        console.print(f"listening on {url}", highlight=False, soft_wrap=True)

    serve(
        served,
        state_dir,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        limits=limits,
        announce=announce,
    )


@token_app.command("issue")
def token_issue(
    node: Annotated[str, typer.Argument(help="the node's name (lower-case, digits, - and _)")],
    state_dir: StateOpt = DEFAULT_STATE,
) -> None:
    """Issue (or replace) NODE's token; it is printed once and stored only hashed."""
    from node.inference.service import TokenStore

    token = TokenStore(state_dir).issue(node)
    err.print(f"token for node {node} (give it to the node's administrator; not shown again):")
    console.print(token, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(state_dir: StateOpt = DEFAULT_STATE, as_json: JsonOpt = False) -> None:
    """The nodes that hold a token."""
    from node.inference.service import TokenStore

    nodes = TokenStore(state_dir).nodes()
    if as_json:
        console.print_json(json.dumps(nodes))
        return
    table = Table("node", "issued")
    for name, issued in sorted(nodes.items()):
        table.add_row(name, issued)
    console.print(table)


@token_app.command("revoke")
def token_revoke(node: str, state_dir: StateOpt = DEFAULT_STATE) -> None:
    """Revoke NODE's token (takes effect on the running service at once)."""
    from node.inference.service import TokenStore

    if not TokenStore(state_dir).revoke(node):
        err.print(f"node {node} has no token")
        raise typer.Exit(int(ExitCode.FAILURE))
    console.print(f"token of node {node} revoked")


class InferCommandError(NodeError):
    """``fednode infer`` could not run."""


def _dicom_files(paths: list[Path]) -> list[Path]:
    from node.deid.commands import iter_files

    return list(iter_files(paths))


def infer(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    task: Annotated[str, typer.Option("--task", help="the enabled task to run")],
    server: Annotated[
        str | None, typer.Option("--server", help="service URL (default: [inference] server)")
    ] = None,
    plaintext: Annotated[
        Path | None,
        typer.Option("--plaintext", help="also run this model artifact unencrypted and compare"),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run studies through the encrypted path once: de-identify in memory, encrypt, evaluate,
    decrypt; print probability, class, per-step timings and bytes."""
    from pydicom import dcmread

    from node.config import load_settings
    from node.deid.engine import Deidentifier
    from node.inference.client import EncryptedPredictor, ServiceClient
    from node.inference.keystore import KeyStore
    from node.pipeline.infer import read_token
    from node.runtime import open_context
    from node.tasks import get_task

    settings = load_settings(config)
    ctx = open_context(settings)
    plugin = get_task(settings, task)
    url = server or settings.inference.server
    if not url:
        raise InferCommandError("no service: give --server URL or set [inference] server")
    engine = Deidentifier(settings.deid, ctx.keys.site)
    studies: dict[str, list[Any]] = {}
    skipped = 0
    for path in _dicom_files(paths):
        try:
            result = engine.deidentify_file(path.read_bytes())
        except (OSError, NodeError) as exc:
            err.print(f"skipped {path}: {exc}")
            skipped += 1
            continue
        studies.setdefault(result.study_key, []).append(dcmread(BytesIO(result.data)))
    if not studies:
        raise InferCommandError("no DICOM instance could be read and de-identified")
    inputs: list[tuple[str, Any]] = []
    for key, datasets in studies.items():
        accepted = [ds for ds in datasets if plugin.accepts(ds)]
        if not accepted:
            err.print(f"study {key[:16]}…: no instance the task {task} accepts")
            continue
        t0 = time.perf_counter()
        try:
            array = plugin.preprocess(accepted)
        except Exception as exc:
            err.print(f"study {key[:16]}…: preprocessing failed: {exc}")
            continue
        inputs.append((key, (array, time.perf_counter() - t0)))
    if not inputs:
        raise InferCommandError("no study could be preprocessed for the task")
    client = ServiceClient(
        url,
        read_token(settings),
        timeout=settings.inference.timeout_seconds,
        verify=str(settings.inference.ca_file) if settings.inference.ca_file else True,
    )
    keys = KeyStore(ctx.db, ctx.keys.he, timedelta(days=settings.inference.key_rotation_days))
    predictor = EncryptedPredictor(client, keys)
    reference = None
    if plaintext is not None:
        from node.tasks.training import load_artifact
        from plugins.base import check_plugin
        from plugins.he import he_circuit

        model, _ = load_artifact(plaintext, plugin)
        check_plugin(plugin, model=model)
        reference = he_circuit(plugin, model)
    rows = []
    for key, (array, pre_seconds) in inputs:
        (pred,) = predictor.predict(plugin, [array])
        row: dict[str, Any] = {
            "study": key,
            "probability": pred.probability,
            "class": pred.label,
            "model_id": pred.model_id,
            "model_version": pred.model_version,
            "key_id": pred.key_id,
            "timings": {"preprocess": pre_seconds, **pred.timings},
            "bytes_sent": pred.bytes_sent,
            "bytes_received": pred.bytes_received,
            "registration_bytes": pred.registration_bytes,
        }
        if reference is not None:
            from node.inference.client import sigmoid

            p_plain = sigmoid(float(reference.logits(array[None])[0]))
            row["plaintext_probability"] = p_plain
            row["difference"] = abs(p_plain - pred.probability)
        rows.append(row)
    client.close()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("study", "probability", "class", "timings (s)", "sent / received")
    if reference is not None:
        table.add_column("plaintext")
        table.add_column("difference")
    for row in rows:
        t = row["timings"]
        steps = " ".join(f"{k} {v:.3f}" for k, v in t.items() if v)
        cells = [
            row["study"][:20] + "…",
            f"{row['probability']:.6f}",
            row["class"],
            steps,
            f"{row['bytes_sent'] / 1e6:.2f} MB / {row['bytes_received'] / 1e3:.0f} kB",
        ]
        if reference is not None:
            cells += [f"{row['plaintext_probability']:.6f}", f"{row['difference']:.2e}"]
        table.add_row(*cells)
    console.print(table)
    if rows and rows[0]["registration_bytes"]:
        console.print(
            f"public context registered ({rows[0]['registration_bytes'] / 1e6:.1f} MB, once per "
            f"key period); key {rows[0]['key_id']}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="inference-server")
    app.command("infer")(infer)
