"""What a user writes per layer, counted from the manifests the run recorded, and how much of them changes
from one model to another. Nothing is rendered here: the counts are of ``manifests/`` in the run directory,
which the deploy step wrote (what was applied, or on a platform that is not a cluster, what a cluster would
be given, with what was assumed to render it).
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import records
from ..layers.common import without_bookkeeping
from ..records import to_yaml
from .rundata import RunData


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


def count_fields(obj: Any) -> int:
    """Leaf values of a manifest: scalars, and empty mappings or lists (``emptyDir: {}`` is written too)."""
    if isinstance(obj, dict):
        return sum(count_fields(v) for v in obj.values()) if obj else 1
    if isinstance(obj, list):
        return sum(count_fields(v) for v in obj) if obj else 1
    return 1


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


def authored(objects: list[dict[str, Any]], assumed: str | None = None) -> Authored:
    """What the user writes: the objects, YAML lines and fields, servinglab's own bookkeeping left out."""
    mine = without_bookkeeping(objects)
    return Authored([o["kind"] for o in mine], len(to_yaml(mine).splitlines()), sum(count_fields(o) for o in mine), assumed)


def distance(name: str, served_name: str, ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> Distance:
    """How the objects rendered for another model (``theirs``) differ from the study's own (``ours``)."""
    mine, other = without_bookkeeping(ours), without_bookkeeping(theirs)
    found: list[tuple[str, int, int]] = []
    _changes({_object_key(o): o for o in mine}, {_object_key(o): o for o in other}, "", found)
    diff = difflib.unified_diff(to_yaml(mine).splitlines(), to_yaml(other).splitlines(), lineterm="", n=0)
    diff_lines = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
    return Distance(
        model=name, served_name=served_name, changed_fields=sum(n for _, n, _ in found),
        added_or_removed=sum(shape for _, _, shape in found), total_fields=sum(count_fields(o) for o in mine),
        diff_lines=diff_lines, paths=[p for p, _, _ in found],
    )  # fmt: skip


@dataclass(frozen=True)
class LayerManifests:
    """What the run recorded of one layer's manifests: its objects counted, or why they are not there."""

    layer: str
    authored: Authored | None
    error: str | None  # why they could not be rendered when the run recorded them
    distances: list[Distance]
    distance_errors: list[str]


def recorded(run: RunData) -> dict[str, LayerManifests] | None:
    """Per layer, the manifests the run recorded (None: this run recorded none, an older run)."""
    index = records.read_manifest_index(run.run_dir)
    if index is None:
        return None
    compared = run.params.get("compare_models") or {}
    out: dict[str, LayerManifests] = {}
    for layer in run.layers:
        own = index.get(f"{layer}.yaml")
        if own is None:
            out[layer] = LayerManifests(layer, None, "not recorded in this run (the layer was not deployed)", [], [])
            continue
        if own.get("error"):
            out[layer] = LayerManifests(layer, None, own["error"], [], [])
            continue
        ours = records.read_manifest(records.manifest_path(run.run_dir, layer))
        distances, errors = [], []
        for model, spec in compared.items():
            entry = index.get(f"compare/{model}/{layer}.yaml")
            if entry is None or entry.get("error"):
                errors.append(f"{model}: {entry.get('error') if entry else 'not recorded in this run'}")
                continue
            theirs = records.read_manifest(records.manifest_path(run.run_dir, layer, model))
            distances.append(distance(model, spec.get("served_name", model), ours, theirs))
        out[layer] = LayerManifests(layer, authored(ours, own.get("assumed")), None, distances, errors)
    return out


def assumed_text(found: dict[str, LayerManifests]) -> str | None:
    """What was assumed to render the run's manifests (the same for every layer of a run), or None."""
    return next((m.authored.assumed for m in found.values() if m.authored and m.authored.assumed), None)


def kind_counts(names: list[str]) -> str:
    """``["Service/a", "Pod/b", "Service/c"]`` (or kinds alone) → ``"Pod, Service ×2"``."""
    counts = Counter(n.split("/", 1)[0] for n in names)
    return ", ".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in sorted(counts.items()))
