"""A study's layers as Kubernetes objects: ``render_layer`` and ``render_study`` ask each layer's kind for its
objects and stamp them with servinglab's labels; ``to_yaml`` (the run directory's form) writes them as
``kubectl apply -f`` reads them.

Pure functions, no cluster. Every object carries ``app.kubernetes.io/managed-by: servinglab`` and the
study, layer and spec-hash labels; the run id, when given, goes into an annotation only.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import Model, Study
from . import get
from ..records import to_yaml
from .common import Canary, stamp
from .network import network_policy

# The claim a study's weights are assumed on when a study that is not a cluster study is rendered as one.
ASSUMED_CLAIM = "models"


def render_layer(study: Study, layer_name: str, run_id: str | None = None, canary: Canary | None = None) -> list[dict[str, Any]]:
    """The objects of one layer, in the order they are applied."""
    layer = study.layers[layer_name]
    objects = get(layer.kind).render(study, layer_name, canary)
    # The policy first: the layer's pods are never up without it.
    policy = network_policy(study, layer_name)
    return stamp([policy, *objects] if policy else objects, run_id)


def render_study(study: Study, run_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
    return {name: render_layer(study, name, run_id) for name in study.layers}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.") or "model"


def _for_cluster_model(model: dict[str, Any]) -> dict[str, Any]:
    if model["source"]["kind"] == "uri":
        return model
    return model | {"source": {"kind": "uri", "uri": f"pvc://{ASSUMED_CLAIM}/{_slug(model['name'])}"}}


def as_cluster_study(study: Study) -> tuple[Study, str | None]:
    """The study made renderable for a cluster: unchanged for a cluster study; another gets the kubernetes
    platform's defaults and a claim for its weights. Returns the study and what was assumed (None: nothing).
    """
    if study.platform.kind == "kubernetes" and study.model.source.kind == "uri":
        return study, None
    data = study.resolved()
    data["platform"] = {"kind": "kubernetes"}
    data["model"] = _for_cluster_model(data["model"])
    data["compare_models"] = {k: _for_cluster_model(v) for k, v in (data.get("compare_models") or {}).items()}
    assumed = (f"rendered as on a cluster: this run's platform is {study.platform.kind}, so the kubernetes "
               f"platform's defaults and weights on the claim '{ASSUMED_CLAIM}' stand in")  # fmt: skip
    return Study.model_validate(data), assumed


def with_model(study: Study, model: Model) -> Study:
    """The same study serving another model (a ``compare_models`` entry), everything else the same."""
    other = study.model_copy(deep=True)
    other.model = model
    return other


__all__ = ["as_cluster_study", "render_layer", "render_study", "to_yaml", "with_model"]
