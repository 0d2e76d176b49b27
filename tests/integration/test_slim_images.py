"""The slim images (deploy/Dockerfile.slim) of the services that load a model bundle: their requirements cover
what each service imports while it loads and verifies a real bundle, and none of it is torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_deploy_static import assert_slim_image_covers, imported_distributions


@pytest.mark.parametrize("service", ["regex_voter", "classical_voter", "arbiter"])
def test_slim_image_covers_what_its_service_imports_while_loading_a_bundle(service: str, sms_bundle: Path) -> None:
    assert_slim_image_covers(service, imported_distributions(service, sms_bundle))
