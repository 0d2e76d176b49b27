"""Latency of POST /predict: in-process, embedded (memory bus), and one process per service over Redis and
over Kafka (a Tansu broker started for the run; join state in Redis, as in docker-compose).

Usage: python benchmarks/latency.py --models models/sms/current --out benchmarks/results/latency.json
Requests are sent one at a time (low load); texts come from the SMS test split. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from flockwatch.arbiter.app import load_policy
from flockwatch.common.datasets import read_table, split
from flockwatch.common.events import TextSubmitted
from flockwatch.common.kafka_dev import TansuBroker, free_port
from flockwatch.common.voting import to_vote
from flockwatch.trainer.evaluate import load_cores

FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))
REDIS = "redis://127.0.0.1:6379/6"


def summary(ms: list[float]) -> dict[str, float]:
    a = np.array(ms)
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def in_process(models: Path, texts: list[str]) -> list[float]:
    """The same voters and arbiter called directly, one text at a time."""
    cores, policy = load_cores(models), load_policy(models)
    out = []
    for i, text in enumerate(texts):
        start = time.perf_counter()
        msg = TextSubmitted(message_id=f"b{i}", text_id=f"b{i}", text=text)
        votes = [
            to_vote(msg, voter, core.version, column[0], 0.0)
            for core in cores
            for voter, column in core.predict([text]).items()
        ]
        policy.decide(votes, msg.text_id, 0.0)
        out.append((time.perf_counter() - start) * 1000)
    return out


def over_http(port: int, texts: list[str]) -> list[float]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for _ in range(300):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for text in texts[:20]:  # warm-up
            client.post("/predict", json={"text": text}).raise_for_status()
        out = []
        for text in texts:
            start = time.perf_counter()
            client.post("/predict", json={"text": text}).raise_for_status()
            out.append((time.perf_counter() - start) * 1000)
    return out


def launch(services: list[list[str]], env: dict[str, str], logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, args in enumerate(services):
        with (logs / f"{i}-{args[0]}.log").open("w") as out:
            procs.append(
                subprocess.Popen(
                    [FLOCKWATCH, "serve", *args],
                    env={**env, "FLOCKWATCH_INSTANCE_ID": f"b{i}"},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def wait_ready(logs: Path, names: list[str], timeout: float = 120) -> None:
    """Until every worker (not the gateway) printed `ready`: its consumers have their partitions."""
    deadline = time.monotonic() + timeout
    for name in names:
        while "ready" not in (logs / name).read_text().splitlines():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready:\n{(logs / name).read_text()[-2000:]}")
            time.sleep(0.1)


def over_processes(env: dict[str, str], logs: Path, texts: list[str]) -> dict[str, float]:
    """The bundle's first-stage voters (regex, classical, ws), arbiter and gateway, one process each, on `env`'s bus."""
    redis.Redis.from_url(REDIS).flushdb()
    port = free_port()
    services = [["regex_voter"], ["classical_voter"], ["ws_voter"], ["arbiter"], ["gateway", "--port", str(port)]]
    procs = launch(services, env, logs)
    try:
        wait_ready(logs, [f"{i}-{args[0]}.log" for i, args in enumerate(services[:-1])])
        return summary(over_http(port, texts))
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            print(f"warning: {p.args} did not stop on SIGTERM within 15 s; killed", file=sys.stderr)
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models/sms/current"))
    parser.add_argument("--data", type=Path, default=Path("data/sms.csv"))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args()
    texts = split(read_table(args.data, "text", "label"))["test"].texts[: args.n]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "flockwatch-bench"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "FLOCKWATCH_MODEL_DIR": str(args.models.resolve())}
    results: dict[str, object] = {"in_process": summary(in_process(args.models, texts))}

    port = free_port()
    procs = launch([["--port", str(port)]], {**env, "FLOCKWATCH_BUS_URL": "memory://"}, logs)
    try:
        results["embedded_http"] = summary(over_http(port, texts))
    finally:
        stop(procs)

    results["redis_http"] = over_processes({**env, "FLOCKWATCH_BUS_URL": REDIS}, logs, texts)
    with TansuBroker(log_dir=logs) as broker:
        results["kafka_tansu_http"] = over_processes({**env, **broker.env, "FLOCKWATCH_STATE_URL": REDIS}, logs, texts)

    base = results["in_process"]["p50_ms"], results["in_process"]["p95_ms"]  # type: ignore[index]
    for key in ("embedded_http", "redis_http", "kafka_tansu_http"):
        r = results[key]
        r["ratio_p50_vs_in_process"] = r["p50_ms"] / base[0]  # type: ignore[index]
        r["ratio_p95_vs_in_process"] = r["p95_ms"] / base[1]  # type: ignore[index]
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "when": time.strftime("%F %T")}
    results["method"] = "sequential POST /predict (one in flight), SMS test-split texts, after 20 warm-up requests"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
