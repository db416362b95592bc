"""Layer renderers: the study's one model spec → the Kubernetes objects of each serving layer.

``render_layer`` and ``render_study`` are pure functions (no cluster); ``to_yaml`` writes the objects as
multi-document YAML for review. Every object carries ``app.kubernetes.io/managed-by: servinglab`` and
the study, layer and spec-hash labels; the run id, when given, goes into an annotation only.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..config import Study
from . import kserve, llmd, rawvllm
from .common import HASH_LABEL, LAYER_LABEL, MANAGED_BY, RUN_ANNOTATION, STUDY_LABEL, Canary, stamp

RENDERERS = {"raw-vllm": rawvllm.render, "kserve": kserve.render, "llm-d": llmd.render}

__all__ = [
    "HASH_LABEL", "LAYER_LABEL", "MANAGED_BY", "RUN_ANNOTATION", "STUDY_LABEL", "Canary",
    "render_layer", "render_study", "to_yaml",
]  # fmt: skip


def render_layer(study: Study, layer_name: str, run_id: str | None = None, canary: Canary | None = None) -> list[dict[str, Any]]:
    """The objects of one layer, in the order they are applied."""
    layer = study.layers[layer_name]
    return stamp(RENDERERS[layer.kind](study, layer_name, canary), run_id)


def render_study(study: Study, run_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
    return {name: render_layer(study, name, run_id) for name in study.layers}


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order rendered, long strings unwrapped, no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000, explicit_start=True)
