"""The feedback service: corrections in, review queue, label hygiene, rule telemetry, clean training rows."""
