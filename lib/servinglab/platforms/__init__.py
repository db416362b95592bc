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
    if study.platform.kind == "kubernetes":
        from .kubernetes import KubernetesPlatform

        return KubernetesPlatform(study)
    raise PlatformError(f"{study.source_file}: platform.kind: {study.platform.kind} is not a platform")


__all__ = ["Deployment", "Endpoint", "Platform", "get_platform"]
