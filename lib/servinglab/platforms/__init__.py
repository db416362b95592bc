"""Platforms: where a study's layers are deployed (``local`` processes or a ``kubernetes`` cluster)."""

from __future__ import annotations

from ..config import Study
from ..errors import PlatformError
from .base import Deployment, Endpoint, Platform


def get_platform(study: Study) -> Platform:
    """The platform object for a study's ``platform.kind``."""
    if study.platform.kind == "local":
        from .local import LocalPlatform

        return LocalPlatform(study)
    raise PlatformError(
        f"{study.source_file}: platform.kind: {study.platform.kind}: deploying to a cluster is not "
        "available in this version of servinglab; the local platform is (params/local.yaml)"
    )


__all__ = ["Deployment", "Endpoint", "Platform", "get_platform"]
