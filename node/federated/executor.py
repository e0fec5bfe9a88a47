"""fednode's ClientApp executor: runs a run's ClientApp only if its bundle is approved.

Flower's only restriction on what a SuperNode runs is ``--trusted-entities`` (signatures of
Flower Hub apps, checked online); it has no allow-list of bundle hashes. So the node starts
its SuperNode with ``--isolation process`` (the SuperNode then launches nothing itself) and
runs this executor next to it, in place of ``flower-superexec`` + ``flwr-clientapp``:

1. :func:`serve` polls the SuperNode's Runtime API (loopback) for ClientApp tasks
   (``AcquireTask``); for each it forks one process running :func:`run_task` with the task's
   token (the executor imports Flower, torch and the node's ClientApp once, so a task process
   starts in milliseconds instead of seconds; SecAgg+ takes five tasks per round);
2. :func:`run_task` pulls the task input (message, context, run, FAB), computes the SHA-256
   of the FAB bytes itself, and checks it against the node's approvals file *before* the
   bundle is unpacked or any of its code imported. A bundle that is not approved (or whose
   bytes do not match the hash the SuperLink announced) gets an error reply ("app bundle not
   approved on this node"), the task is marked failed, and nothing of it runs;
3. an approved bundle is installed under the node's FLWR_HOME and its ClientApp is loaded and
   called as ``flwr-clientapp`` would; runtime dependency installation is never done.

Error replies carry only the exception type, never its message (which could name a study).

What this guarantees: the node executes ClientApp code only from bundles whose exact bytes an
admin approved (by file or hash) on this node; a changed bundle, even one byte, has another
hash and is refused; a SuperLink cannot make the node run code it did not approve. What it
does not guarantee: that an approved bundle is benign (approval is a human decision about
those bytes; fednode's reference bundle contains no code and points at the ClientApp
installed with fednode, ``node.federated.client:app``); that the *installed* fednode and
Python environment are what the admin thinks (that is the host's integrity); anything about
the ServerApp (it runs at the coordinator); and it does not stop someone with local access
starting ``flower-superexec`` against the Runtime API themselves (the Runtime API listens on
loopback only, and the node's approval check is in this executor, not inside the SuperNode).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from node.federated.env import quiet_flower

quiet_flower()

logger = logging.getLogger(__name__)

NOT_APPROVED = "fednode: app bundle not approved on this node"
POLL_SECONDS = 0.5


def _client(address: str, token: str | None = None, component: str = "SuperExec"):  # type: ignore[no-untyped-def]
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def preload() -> None:
    """Import what a task needs (Flower, torch, the node's ClientApp) once, before forking."""
    import flwr.cli.install
    import flwr.clientapp.utils
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import torch

    import node.federated.client  # noqa: F401
    from node.tasks.training import TrainOptions, evaluate, fit_round
    from plugins.base import resolve_task

    # One intra-op thread: the models are small, the host is a hospital server doing other
    # work, and forked children must not inherit a running OpenMP pool.
    torch.set_num_threads(1)
    # Warm torch's lazily initialised training path (the first optimiser step costs seconds)
    # on random inputs, so each forked task starts warm.
    try:
        plugin = resolve_task("chest_xray")
        model = plugin.build_model()
        x = torch.rand((4, *plugin.input_shape)) * 2 - 1
        y = torch.tensor([0.0, 1.0, 0.0, 1.0])
        fit_round(plugin, model, x, y, TrainOptions(), epochs=1, learning_rate=1e-3, seed=0)
        evaluate(plugin, model, x, y)
    except Exception as exc:  # a warm-up failure only costs time
        logger.warning("warm-up skipped: %s", type(exc).__name__)


def _fork_task(address: str, token: str, approvals: Path) -> int:
    """Run one task in a forked child (a fresh process per task, without paying the imports
    again); return the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = run_task(address, token, approvals)
        except BaseException:
            logger.exception("task process failed")
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def serve(address: str, approvals: Path, stop: threading.Event | None = None) -> None:
    """Acquire ClientApp tasks from the SuperNode at *address*; run each in its own process."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    stop = stop or threading.Event()
    preload()
    client = _client(address)
    children: set[int] = set()
    logger.info("fednode executor: polling the SuperNode Runtime API at %s", address)
    try:
        while not stop.is_set():
            for pid in list(children):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
            try:
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                )
            except Exception as exc:  # the SuperNode restarting: wait and retry
                logger.warning("Runtime API unavailable (%s); retrying", type(exc).__name__)
                stop.wait(2.0)
                continue
            if res.HasField("task") and res.token:
                task = res.task
                logger.info(
                    "task %d of run %d: bundle %s", task.task_id, task.run_id, task.fab_hash[:12]
                )
                children.add(_fork_task(address, res.token, approvals))
            else:
                stop.wait(POLL_SECONDS)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        client.close()


INSTALLED_MARK = ".fednode-fab-sha256"


def _install(content: bytes, digest: str, project_dir: Path) -> None:
    """Unpack an approved bundle under FLWR_HOME once (Flower names the folder by a hash
    prefix; the full hash is kept beside it, so another bundle sharing the prefix is
    installed afresh)."""
    from flwr.cli.install import install_from_fab

    mark = project_dir / INSTALLED_MARK
    if mark.is_file() and mark.read_text().strip() == digest:
        return
    if project_dir.exists():
        import shutil

        shutil.rmtree(project_dir)
    install_from_fab(content, skip_prompt=True)
    mark.write_text(digest + "\n")


def run_task(address: str, token: str, approvals: Path) -> int:
    """Run one ClientApp task if its bundle is approved; return the process exit code."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_dir
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from node.federated.enrollment import is_approved

    client = _client(address, token, component="flwr-clientapp")
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    message = None
    reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest != fab.hash_str or not is_approved(approvals, digest):
            logger.error(
                "run %d: bundle %s is not approved on this node; refused", run.run_id, digest[:12]
            )
            reply = Message(
                Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=NOT_APPROVED),
                reply_to=message,
            )
            details = NOT_APPROVED
        else:
            _install(fab.content, digest, get_project_dir(run.fab_id, run.fab_version, digest))
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = load(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:
        logger.error("ClientApp raised %s", type(exc).__name__, exc_info=exc)
        if message is not None:
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"ClientApp raised {type(exc).__name__}",
                ),
                reply_to=message,
            )
        details = f"ClientApp raised {type(exc).__name__}"
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as exc:
                logger.error("cannot push the reply: %s", type(exc).__name__)
                code = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m node.federated.executor serve|task ...`` (started by the supervisor)."""
    parser = argparse.ArgumentParser(prog="fednode-executor")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "task"):
        p = sub.add_parser(name)
        p.add_argument("--runtime-api-address", required=True)
        p.add_argument("--approvals", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cmd == "task":
        token = os.environ.pop("FEDNODE_TASK_TOKEN", "")
        return run_task(args.runtime_api_address, token, args.approvals)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    serve(args.runtime_api_address, args.approvals, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
