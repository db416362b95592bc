"""What a user writes per layer, counted from the manifests the study renders to, and how much of them
changes from one model to another. Pure: the run's params in, counts out; no cluster.

A study on the local platform renders nothing itself, so it is rendered as it would be on a cluster: the
kubernetes platform's defaults, and weights on a claim named after the model. The counts say so.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..config import Model, Study
from ..errors import ServinglabError
from ..layers import HASH_LABEL, render_layer, to_yaml

CLAIM = "models"  # the claim a local study's weights are assumed on when it is rendered for a cluster


@dataclass(frozen=True)
class Authored:
    """The objects of one layer as the user would apply them."""

    kinds: list[str]
    lines: int  # YAML lines, document separators included
    fields: int  # leaf values (a scalar, or an empty mapping or list), the spec-hash label left out
    assumed: str | None  # what was assumed to render a study that is not a cluster study

    @property
    def objects(self) -> int:
        return len(self.kinds)


@dataclass(frozen=True)
class Distance:
    """How much of a layer's manifests changes when the model changes (everything else the same)."""

    model: str  # the compared model's key in compare_models
    served_name: str
    changed_fields: int  # values that differ, plus fields present on one side only
    added_or_removed: int  # of those, fields present on one side only (a change of shape)
    total_fields: int  # fields of the study's own model's manifests
    diff_lines: int  # lines added or removed in a line diff of the two YAML texts
    paths: list[str]  # the changed fields' paths, in manifest order


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.") or "model"


def _for_cluster_model(model: dict[str, Any]) -> dict[str, Any]:
    if model["source"]["kind"] == "uri":
        return model
    return model | {"source": {"kind": "uri", "uri": f"pvc://{CLAIM}/{_slug(model['name'])}"}}


def cluster_study(params: dict[str, Any]) -> tuple[Study, str | None]:
    """The run's study, made renderable: unchanged for a cluster study; a local one gets the kubernetes
    platform's defaults and a claim for its weights. Returns the study and what was assumed (None: nothing).
    """
    if params.get("platform", {}).get("kind") == "kubernetes" and params["model"]["source"]["kind"] == "uri":
        return Study.model_validate(params), None
    data = dict(params)
    data["platform"] = {"kind": "kubernetes"}
    data["model"] = _for_cluster_model(params["model"])
    data["compare_models"] = {k: _for_cluster_model(v) for k, v in (params.get("compare_models") or {}).items()}
    assumed = (f"rendered as on a cluster: this run's platform is {params.get('platform', {}).get('kind')}, so the "
               f"kubernetes platform's defaults and weights on the claim '{CLAIM}' stand in")  # fmt: skip
    return Study.model_validate(data), assumed


def _without_hash(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_hash(v) for k, v in obj.items() if k != HASH_LABEL}
    if isinstance(obj, list):
        return [_without_hash(v) for v in obj]
    return obj


def count_fields(obj: Any) -> int:
    """Leaf values of a manifest: scalars, and empty mappings or lists (``emptyDir: {}`` is written too)."""
    if isinstance(obj, dict):
        return sum(count_fields(v) for v in obj.values()) if obj else 1
    if isinstance(obj, list):
        return sum(count_fields(v) for v in obj) if obj else 1
    return 1


def _render(study: Study, layer: str) -> list[dict[str, Any]]:
    try:
        return _without_hash(render_layer(study, layer))
    except ServinglabError as exc:
        raise ServinglabError(f"layers.{layer} does not render: {exc}") from None


def authored(study: Study, layer: str, assumed: str | None = None) -> Authored:
    """What the user writes for ``layer``: its objects, YAML lines and fields."""
    objects = _render(study, layer)
    return Authored([o["kind"] for o in objects], len(to_yaml(objects).splitlines()),
                    sum(count_fields(o) for o in objects), assumed)  # fmt: skip


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _changes(a: Any, b: Any, path: str, out: list[tuple[str, int, int]]) -> None:
    """Append (path, fields changed, of those added or removed) for every difference between ``a`` and ``b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append((sub, count_fields(a[key]), count_fields(a[key])))
            elif key not in a:
                out.append((sub, count_fields(b[key]), count_fields(b[key])))
            else:
                _changes(a[key], b[key], sub, out)
    elif isinstance(a, list) and isinstance(b, list) and _named(a + b):
        # Containers, env, volumes, ports: matched by name, as Kubernetes merges them.
        left, right = {i["name"]: i for i in a}, {i["name"]: i for i in b}
        _changes(left, right, path, out)
    elif isinstance(a, list) and isinstance(b, list) and all(not isinstance(i, (dict, list)) for i in a + b):
        # Arguments: an inserted flag shifts the ones after it, which are not changed by that.
        matcher = difflib.SequenceMatcher(a=[repr(i) for i in a], b=[repr(i) for i in b], autojunk=False)
        edits = [(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]
        if edits:
            out.append((path, sum(max(n, m) for n, m in edits), sum(abs(n - m) for n, m in edits)))
    elif isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            sub = f"{path}[{index}]"
            if index >= len(b):
                out.append((sub, count_fields(a[index]), count_fields(a[index])))
            elif index >= len(a):
                out.append((sub, count_fields(b[index]), count_fields(b[index])))
            else:
                _changes(a[index], b[index], sub, out)
    elif a != b:
        shape = isinstance(a, (dict, list)) or isinstance(b, (dict, list))
        changed = max(count_fields(a), count_fields(b)) if shape else 1
        out.append((path, changed, abs(count_fields(a) - count_fields(b))))


def _object_key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def distance(study: Study, layer: str, name: str, model: Model) -> Distance:
    """Render ``layer`` for the study's model and for ``model``; count what differs."""
    other = study.model_copy(deep=True)
    other.model = model
    mine, theirs = _render(study, layer), _render(other, layer)
    found: list[tuple[str, int, int]] = []
    _changes({_object_key(o): o for o in mine}, {_object_key(o): o for o in theirs}, "", found)
    diff = difflib.unified_diff(to_yaml(mine).splitlines(), to_yaml(theirs).splitlines(), lineterm="", n=0)
    diff_lines = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return Distance(
        model=name, served_name=model.served_name, changed_fields=sum(n for _, n, _ in found),
        added_or_removed=sum(shape for _, _, shape in found), total_fields=sum(count_fields(o) for o in mine),
        diff_lines=diff_lines, paths=[p for p, _, _ in found],
    )  # fmt: skip


def distances(study: Study, layer: str) -> list[Distance]:
    """The layer's distance to every model of ``compare_models``, in the study's order."""
    return [distance(study, layer, name, model) for name, model in study.compare_models.items()]


def kind_counts(names: list[str]) -> str:
    """``["Service/a", "Pod/b", "Service/c"]`` (or kinds alone) → ``"Pod, Service ×2"``."""
    counts = Counter(n.split("/", 1)[0] for n in names)
    return ", ".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in sorted(counts.items()))
