"""The dev Kafka broker from the command line: `flockwatch kafka`, and the demo over Kafka with one flag."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from flockwatch.common import topics
from flockwatch.common.kafka_config import PARTITIONS

pytestmark = pytest.mark.connected
FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))


def wait_for_line(log: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise TimeoutError(log.read_text())


async def partitions_per_topic(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(await admin.list_topics())
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described}


def test_flockwatch_kafka_runs_a_broker_with_every_topic_until_terminated(tmp_path: Path) -> None:
    log = tmp_path / "kafka.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([FLOCKWATCH, "kafka"], stdout=out, stderr=subprocess.STDOUT)
    try:
        line = wait_for_line(log, "export FLOCKWATCH_BUS_URL=kafka://", proc)
        bootstrap = line.split("kafka://", 1)[1]
        assert asyncio.run(partitions_per_topic(bootstrap)) == {t: PARTITIONS for t in topics.ALL}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(OSError):  # the broker went with it
        asyncio.run(asyncio.open_connection(*bootstrap.split(":")))


def test_the_demo_runs_over_kafka_with_one_flag(sms_bundle: Path, data_files: dict[str, Path]) -> None:
    args = ["--models", str(sms_bundle), "--data", str(data_files["sms"]), "--n", "8", "--bus", "kafka"]
    done = subprocess.run(
        [FLOCKWATCH, "demo", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "started a dev Kafka broker (Tansu" in done.stdout
    assert "kafka://127.0.0.1:" in done.stdout  # the services ran on it
    assert "answered" in done.stdout and "/8;" in done.stdout
