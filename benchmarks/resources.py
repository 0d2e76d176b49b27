"""Resources and cost: peak RSS of each service process, the CPU LLM backend's speed, and the cost per prediction.

    python benchmarks/resources.py --models models/sms/current --out benchmarks/results/resources.json

Memory: every service runs as its own process over Redis (DB 1, flushed before and after): the gateway, the
regex, classical and ws voters, the arbiter, and the embedding voter when the bundle has one (as deployed: in
cascade mode). RSS (psutil, with children) is sampled every 50 ms: peak while starting, RSS idle after start,
peak while `--texts` distinct SMS texts (within the gateway's length limit) go through `POST /predict/batch`
(`--batch` per request, one request at a time), and the final RSS. The same run gives the services' CPU
seconds per text (the cheap path's cost).
LLM tier: `benchmarks/llm_cpu.py` in a child process (its RSS sampled too). Cost: CPU-seconds per text from
`benchmarks/results/throughput.json` when it exists (its closed-loop batch phase over Redis), else from this
run, plus the LLM's share at the cascade's measured call rate, in dollars at the prices given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from flockwatch.common.artifacts import read_manifest
from flockwatch.common.datasets import read_table, split
from flockwatch.common.kafka_dev import free_port
from flockwatch.gateway.settings import GatewaySettings
from latency import launch, stop, wait_ready

REDIS = "redis://127.0.0.1:6379/1"
HERE = Path(__file__).parent
MB = 1024 * 1024


class RssSampler(threading.Thread):
    """Samples each named process's RSS (with its children) every `interval` s; peaks kept per phase."""

    def __init__(self, procs: dict[str, int], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.interval, self.phase, self.samples = interval, "start", 0
        self.peaks: dict[str, dict[str, float]] = {}
        self.last: dict[str, float] = {}
        self.done = threading.Event()

    def rss(self, proc: psutil.Process) -> float:
        try:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / MB
        except psutil.NoSuchProcess:
            return 0.0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            peaks = self.peaks.setdefault(self.phase, {})
            for name, proc in self.procs.items():
                self.last[name] = mb = self.rss(proc)
                peaks[name] = max(peaks.get(name, 0.0), mb)
            self.samples += 1

    def cpu_s(self) -> dict[str, float]:
        """User + system CPU seconds so far, per process (children included)."""
        out = {}
        for name, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                out[name] = 0.0
        return out


def push(port: int, texts: list[str], batch: int) -> dict[str, Any]:
    """`POST /predict/batch`, one request at a time; decided and pending texts counted."""
    decided = pending = 0
    start = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in range(0, len(texts), batch):
            items = [{"text": t, "text_id": f"res-{i + j}"} for j, t in enumerate(texts[i : i + batch])]
            answer = client.post("/predict/batch", json={"texts": items})
            answer.raise_for_status()
            decided += len(answer.json()["decisions"])
            pending += len(answer.json()["pending"])
    return {"texts_decided": decided, "texts_pending": pending, "wall_s": round(time.perf_counter() - start, 2)}


def wait_health(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("gateway not healthy")


def memory(models: Path, texts: list[str], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Each service its own process over Redis: RSS while starting, idle, under load and after; CPU per text."""
    workers = [["regex_voter"], ["classical_voter"], ["ws_voter"], ["arbiter"]]
    if "embedding.json" in read_manifest(models, verify=False).files:
        workers.append(["embedding_voter"])
    port = free_port()
    env = {**os.environ, "FLOCKWATCH_BUS_URL": REDIS, "FLOCKWATCH_MODEL_DIR": str(models.resolve())}
    env["FLOCKWATCH_LOG_LEVEL"] = "WARNING"
    store = redis.Redis.from_url(REDIS)
    store.flushdb()
    services = [*workers, ["gateway", "--port", str(port)]]
    procs = launch(services, env, logs)
    sampler = RssSampler({args_[0]: p.pid for args_, p in zip(services, procs, strict=True)})
    sampler.start()
    try:
        t0 = time.perf_counter()
        wait_ready(logs, [f"{i}-{w[0]}.log" for i, w in enumerate(workers)])
        wait_health(port)
        ready_s = time.perf_counter() - t0
        sampler.phase = "idle"
        time.sleep(args.idle_s)
        idle = dict(sampler.last)
        cpu0, sampler.phase = sampler.cpu_s(), "load"
        load = push(port, texts, args.batch)
        cpu1, sampler.phase = sampler.cpu_s(), "after"
        time.sleep(2)
        final = dict(sampler.last)
    finally:
        sampler.done.set()
        sampler.join()
        stop(procs)
        store.flushdb()
    cpu = {name: round(cpu1[name] - cpu0[name], 3) for name in cpu0}
    rows = {
        name: {
            "peak_start_mb": round(sampler.peaks["start"][name], 1),
            "idle_mb": round(idle[name], 1),
            "peak_load_mb": round(sampler.peaks["load"][name], 1),
            "final_mb": round(final[name], 1),
            "peak_mb": round(max(p.get(name, 0.0) for p in sampler.peaks.values()), 1),
            "cpu_s_load": cpu[name],
        }
        for name in sampler.procs
    }
    return {
        "bundle": str(models),
        "bus": REDIS,
        "ready_s": round(ready_s, 1),
        "samples": sampler.samples,
        "load": {**load, "batch": args.batch, "texts_sent": len(texts)},
        "services": rows,
        "total_peak_mb": round(sum(r["peak_mb"] for r in rows.values()), 1),
        "cpu_s_per_text": round(sum(cpu.values()) / max(1, load["texts_decided"]), 6),
    }


def llm(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/llm_cpu.py in a child process, its RSS sampled."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "flockwatch-bench" / "llm_cpu.json"
    cmd = [sys.executable, str(HERE / "llm_cpu.py"), "--models", str(models), "--out", str(out), *args.llm_args]
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    sampler = RssSampler({"llm_cpu": proc.pid})
    sampler.start()
    proc.wait()
    sampler.done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed: {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = round(max(p.get("llm_cpu", 0.0) for p in sampler.peaks.values()), 1)
    return result


def cheap_path_cpu(own: dict[str, Any] | None, throughput: Path) -> dict[str, Any]:
    """CPU-seconds per text: the throughput benchmark's closed-loop batch phase if present, else this run's."""
    if throughput.exists():
        phase = json.loads(throughput.read_text())["redis"]["closed_loop_batch"]
        by_process: dict[str, float] = phase["machine_load"]["cpu_s_by_process"]
        services = {k: v for k, v in by_process.items() if "bench" not in k and "loadgen" not in k}
        return {
            "source": f"{throughput} redis.closed_loop_batch (services only: {sorted(services)})",
            "cpu_s_per_text": sum(services.values()) / phase["texts_decided"],
        }
    if own is None:
        raise SystemExit(f"{throughput} is missing and the memory run was skipped: no CPU per text")
    return {"source": "this run's load phase (services' CPU / texts decided)", "cpu_s_per_text": own["cpu_s_per_text"]}


def stamp() -> dict[str, Any]:
    return {"when": time.strftime("%F %T"), "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def llm_call_ms(results: dict[str, Any]) -> float:
    """CPU-ms of one cascade call: a text alone (batch 1), with the adapter or its stand-in, bf16 as configured."""
    llm = results["llm_cpu"]
    rows = [r for r in llm["prefill"] if r["batch"] == 1 and r["variant"] != "base"]
    return float(next(r for r in rows if r["bf16"] == llm["bf16_configured"])["cpu_ms_per_text"])


def cost(cheap: dict[str, Any], llm_cpu_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    """Dollars per prediction: the cheap path on every text, plus the LLM on the cascade's share of texts."""
    per_cpu_s = args.vcpu_hour / 3600
    cheap_usd = cheap["cpu_s_per_text"] * per_cpu_s
    llm_cpu_usd = args.llm_call_rate * llm_cpu_ms / 1000 * per_cpu_s
    gpu_call_usd = args.gpu_hour / 3600 / args.gpu_texts_per_s
    return {
        "prices": {
            "vcpu_hour_usd": args.vcpu_hour,
            "gpu_hour_usd": args.gpu_hour,
            "gpu_texts_per_s_assumed": args.gpu_texts_per_s,
            "note": "on-demand list-price order of magnitude, not a quote; the GPU rate is assumed, not measured",
        },
        "cheap_path": cheap,
        "llm_call_rate": args.llm_call_rate,
        "llm_call_rate_source": "flockwatch eval --mode cascade, SMS test split (README: reach LLM 0.09 %)",
        "llm_cpu_ms_per_call": llm_cpu_ms,
        "usd_per_text_cheap_path": cheap_usd,
        "usd_per_text_llm_share_cpu": llm_cpu_usd,
        "usd_per_text_total_cpu": cheap_usd + llm_cpu_usd,
        "usd_per_llm_call_cpu": llm_cpu_ms / 1000 * per_cpu_s,
        "usd_per_llm_call_gpu_vllm": gpu_call_usd,
        "usd_per_text_total_with_gpu_llm": cheap_usd + args.llm_call_rate * gpu_call_usd,
        "traffic_texts_per_s_assumed": args.traffic,
        "usd_per_text_dedicated_gpu_at_traffic": args.gpu_hour / 3600 / args.traffic,
        "gpu_note": "vLLM not measured (no GPU lent); a dedicated GPU costs its hourly price whatever the call rate",
        "seeds_target_usd_per_prediction": 0.01,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models/sms/current"))
    parser.add_argument("--data", type=Path, default=Path("data/sms.csv"))
    parser.add_argument("--texts", type=int, default=2000, help="distinct texts pushed (test, then calibration)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep the skipped parts' results from --out (cost redone)")
    parser.add_argument("--llm-args", nargs=argparse.REMAINDER, default=[], help="passed to llm_cpu.py (last)")
    parser.add_argument("--llm-call-rate", type=float, default=0.0009)
    parser.add_argument("--vcpu-hour", type=float, default=0.04)
    parser.add_argument("--gpu-hour", type=float, default=2.50)
    parser.add_argument("--gpu-texts-per-s", type=float, default=50.0)
    parser.add_argument("--traffic", type=float, default=100.0, help="texts/s a dedicated GPU is spread over")
    parser.add_argument("--throughput", type=Path, default=HERE / "results" / "throughput.json")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "resources.json")
    args = parser.parse_args()
    parts = split(read_table(args.data, "text", "label"))
    limit = GatewaySettings().gateway_max_text_chars  # a few texts in the file are longer: the gateway says 413
    texts = [t for t in [*parts["test"].texts, *parts["calibration"].texts] if len(t) <= limit][: args.texts]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "flockwatch-bench"
    logs.mkdir(exist_ok=True)
    reuse = args.reuse and args.out.exists()
    results: dict[str, Any] = json.loads(args.out.read_text()) if reuse else {}
    if not args.skip_memory:
        results["memory"] = memory(args.models, texts, args, logs) | stamp()
        print("memory", json.dumps(results["memory"]), flush=True)
    if not args.skip_llm:
        results["llm_cpu"] = llm(args.models, args) | stamp()
    if "llm_cpu" in results:
        results["cost"] = cost(cheap_path_cpu(results.get("memory"), args.throughput), llm_call_ms(results), args)
    results["vllm_gpu"] = "not measured: no GPU device was lent to this session"
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "when": time.strftime("%F %T"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results.get("cost", {}), indent=1))


if __name__ == "__main__":
    main()
