"""The inference service's rate limit and token lifecycle, in process (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from node.inference.service import Limits, ServedModel, TokenStore, create_app
from plugins.chest_xray.task import ChestXrayTask
from plugins.he import choose_parameters, he_circuit

T = TypeVar("T")


def _with_client(
    state: Path, limits: Limits, body: Callable[[httpx.AsyncClient], Awaitable[T]]
) -> T:
    task = ChestXrayTask()
    torch.manual_seed(0)
    circuit = he_circuit(task, task.build_model())
    model = ServedModel(task, circuit, choose_parameters(circuit, (-1.0, 1.0)), "m-1", "v1")
    app = create_app(model, state, limits)

    async def run() -> T:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return await body(client)

    return asyncio.run(run())


def test_evaluations_are_rate_limited_per_node(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    a, b = store.issue("node-a"), store.issue("node-b")

    async def body(client: httpx.AsyncClient) -> tuple[list[httpx.Response], httpx.Response]:
        auth = {"Authorization": f"Bearer {a}"}
        first = [await client.post("/v1/evaluate", content=b"x", headers=auth) for _ in range(4)]
        other = await client.post(
            "/v1/evaluate", content=b"x", headers={"Authorization": f"Bearer {b}"}
        )
        return first, other

    first, other = _with_client(tmp_path, Limits(rate_per_minute=1.0, burst=3), body)
    assert [r.status_code for r in first] == [400, 400, 400, 429]
    assert int(first[-1].headers["Retry-After"]) >= 1
    assert other.status_code == 400  # another node has its own bucket


def test_tokens_are_stored_hashed_and_revocation_is_immediate(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token = store.issue("node-a")
    stored = (tmp_path / "tokens.json").read_text()
    assert token not in stored and token.split(".")[2] not in stored
    assert json.loads(stored)["tokens"]["node-a"]["sha256"]
    assert (tmp_path / "tokens.json").stat().st_mode & 0o077 == 0
    auth = {"Authorization": f"Bearer {token}"}

    async def body(client: httpx.AsyncClient) -> list[Any]:
        info = await client.get("/v1/model", headers=auth)
        store.revoke("node-a")
        after = await client.get("/v1/model", headers=auth)
        health = await client.get("/v1/health")
        return [info, after, health]

    info, after, health = _with_client(tmp_path, Limits(), body)
    assert info.status_code == 200
    assert "weight" not in info.text and info.json()["model_id"] == "m-1"
    assert after.status_code == 401 and health.status_code == 200
