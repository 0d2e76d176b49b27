"""Whether a bundle's arbiter certified its risk target: read from `arbiter.json`, shown by /health and metrics.

A bundle whose target could not be certified abstains on every text. That is a valid, honest outcome,
but never a silent one: training prints it loudly, the arbiter logs it and sets a gauge, the gateway's
/health reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flockwatch.common.artifacts import ArtifactError, load_json

ANSWERS_NOTHING = 1.0  # an answer threshold above every probability


def certification(answer_at: float, target: float, risk: dict[str, Any]) -> dict[str, Any]:
    """The record /health shows: certified or not, the target, and the coverage seen on calibration."""
    certified = answer_at <= ANSWERS_NOTHING
    out: dict[str, Any] = {"certified": certified, "risk_target": target}
    if "coverage" in risk:
        out["calibration_coverage"] = risk["coverage"]
    if not certified:
        out["warning"] = (
            f"the {target:.1%} error target was not certified on the calibration data: "
            "this bundle abstains on every text"
        )
    return out


def bundle_certification(model_dir: Path) -> dict[str, Any]:
    """`certification` of the bundle in `model_dir` (its verified arbiter.json); an error record if unreadable."""
    try:
        data = load_json(model_dir, "arbiter.json")
        risk = data.get("calibration_report", {}).get("risk", {})
        return certification(float(data["answer_at"]), float(data["config"]["risk"]["target"]), risk)
    except (ArtifactError, OSError, KeyError, TypeError, ValueError) as exc:
        return {"certified": None, "error": f"cannot read the bundle's arbiter.json: {exc}"}
