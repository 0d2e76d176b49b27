"""How the services log: text lines for a terminal, or JSON lines for a log pipeline (`FLOCKWATCH_LOG_FORMAT`),
every record carrying the trace and span ids of the work it is about (the text's trace when tracing is on),
so a log line leads to its trace in Jaeger and back."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s"


class TraceIds(logging.Filter):
    """Adds `trace_id` and `span_id` (hex; empty outside a span) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        record.span_id = format(context.span_id, "016x") if context.is_valid else ""
        return True


def configure(level: str, fmt: str = "text") -> None:
    """The root logger at `level`, to stderr, as text or JSON lines (replacing any earlier set-up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceIds())
    if fmt == "json":
        names = {"asctime": "ts", "levelname": "level", "name": "logger"}
        handler.setFormatter(JsonFormatter(FIELDS, rename_fields=names, json_ensure_ascii=False))
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
