"""`flockwatch demo`: every service on one bus behind the HTTP gateway; texts in, decisions out."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from flockwatch.client import AsyncClient, FlockwatchError
from flockwatch.common.datasets import hold_out, read_table
from flockwatch.common.kafka_dev import free_port
from rich.console import Console
from rich.table import Table

HELD_OUT_FRAC = 0.25  # `make models` trains with --test-frac 0.25: the demo sends texts from that held-out share


def run_demo(models: Path, data: Path, n: int, bus_url: str, console: Console) -> None:
    """Serve the stack on a free port, send `n` held-out texts over HTTP, print what comes back.

    `bus_url` "kafka" starts a dev Kafka broker (Tansu) for the demo's length and runs over it."""
    if bus_url == "kafka":
        from flockwatch.common.kafka_dev import TansuBroker

        with TansuBroker() as broker:
            console.print(f"started a dev Kafka broker (Tansu, memory only) on {broker.bootstrap}")
            os.environ.update(broker.env)
            run_demo(models, data, n, broker.url, console)
        return
    os.environ["FLOCKWATCH_MODEL_DIR"] = str(models)
    os.environ["FLOCKWATCH_BUS_URL"] = bus_url
    from flockwatch.cli.runtime import ALL, build
    from flockwatch.gateway.app import create_app
    from flockwatch.gateway.settings import GatewaySettings

    test = hold_out(read_table(data, "text", "label"), HELD_OUT_FRAC, "test")[1]
    texts, truth = test.texts[:n], test.labels[:n]
    settings = GatewaySettings()
    bus, services = build(ALL, settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, bus, services), host="127.0.0.1", port=port, log_level="warning", loop="asyncio"
        )
    )

    async def main() -> list[dict[str, Any]]:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        console.print(
            f"[bold]Flockwatch[/bold] on {bus_url}: gateway http://127.0.0.1:{port}, services "
            f"{', '.join(s.name for s in services)}; model bundle {models}"
        )
        async with AsyncClient(f"http://127.0.0.1:{port}", timeout=30) as client:  # flockwatch.client
            results = await asyncio.gather(*(_predict(client, t) for t in texts))
            try:
                await client.predict("   ")
            except FlockwatchError as refused:
                console.print(f"an empty text is refused: {refused.status} {refused.detail}")
        server.should_exit = True
        await task
        return results

    results = asyncio.run(main())
    _show(console, texts, truth, results)


async def _predict(client: AsyncClient, text: str) -> dict[str, Any]:
    start = time.perf_counter()
    body: dict[str, Any] = (await client.predict(text)).model_dump()
    body["round_trip_ms"] = (time.perf_counter() - start) * 1000
    return body


def _show(console: Console, texts: list[str], truth: list[str], results: list[dict[str, Any]]) -> None:
    table = Table(title="decisions (test split texts, sent concurrently over HTTP)")
    for col in ("text", "truth", "decision", "conf.", "set", "path", "voters"):
        table.add_column(col, overflow="fold" if col == "text" else "ellipsis")
    for text, label, r in zip(texts, truth, results, strict=True):
        decision = "ABSTAIN" if r["abstain"] else str(r["prediction"])
        style = "yellow" if r["abstain"] else "green" if r["prediction"] == label else "red"
        voters = ", ".join(
            f"{k}:{'–' if v['abstain'] else max(v['probabilities'], key=v['probabilities'].get)}"
            for k, v in r["voter_outputs"].items()
        )
        table.add_row(
            text[:70],
            label,
            f"[{style}]{decision}[/{style}]",
            f"{r['confidence']:.2f}",
            ",".join(r["prediction_set"]),
            str(r["path"]),
            voters,
        )
    console.print(table)
    answered = [(r, y) for r, y in zip(results, truth, strict=True) if not r["abstain"]]
    correct = sum(r["prediction"] == y for r, y in answered)
    rt = np.array([r["round_trip_ms"] for r in results], dtype=float)
    console.print(
        f"answered {len(answered)}/{len(results)}; correct {correct}/{len(answered)}; "
        f"HTTP round trip p50 {np.percentile(rt, 50):.1f} ms, p95 {np.percentile(rt, 95):.1f} ms "
        f"({len(results)} concurrent requests)"
    )
