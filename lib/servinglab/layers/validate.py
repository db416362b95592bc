"""Validation of rendered objects before anything is applied.

Built-in kinds are checked against the Kubernetes JSON schemas of the cluster's version with
``kubernetes-validate`` in strict mode (unknown fields rejected). KServe kinds are checked against their
CRD's ``openAPIV3Schema``: the types, enums and required fields through ``jsonschema``, and, since CRD
schemas do not forbid unknown fields (the API server would silently prune them), every field the schema
does not list is rejected here, except under ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Iterator

import jsonschema
import kubernetes_validate
import yaml

from ..errors import ParamsError

CRD_FILES = (
    "serving.kserve.io_inferenceservices.yaml.gz",
    "serving.kserve.io_llminferenceservices.yaml.gz",
    "serving.kserve.io_servingruntimes.yaml.gz",
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

CrdSchemas = dict[tuple[str, str], dict[str, Any]]  # (apiVersion, kind) → openAPIV3Schema


class ManifestError(ParamsError):
    """Rendered objects that the cluster's schemas reject; nothing was applied."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the rendered objects; nothing was applied:\n{lines}")


@dataclass(frozen=True)
class Problem:
    kind: str
    name: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} {self.path or '.'}: {self.reason}"


def schemas_from_crds(documents: Iterable[dict[str, Any]]) -> CrdSchemas:
    """The openAPIV3Schema of every served version of the given CustomResourceDefinitions."""
    out: CrdSchemas = {}
    for crd in documents:
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True) and "schema" in version:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


@lru_cache(maxsize=1)
def bundled_crds() -> tuple[dict[str, Any], ...]:
    """The KServe CRDs shipped with servinglab (see layers/crds/NOTICE), parsed once; do not mutate."""
    folder = resources.files("servinglab.layers") / "crds"
    documents: list[dict[str, Any]] = []
    for name in CRD_FILES:
        documents += [d for d in yaml.load_all(gzip.decompress((folder / name).read_bytes()), Loader=yaml.CSafeLoader) if d]
    return tuple(documents)


@lru_cache(maxsize=1)
def bundled_crd_schemas() -> CrdSchemas:
    """The bundled CRDs' schemas, for validation without a cluster."""
    return schemas_from_crds(bundled_crds())


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def unknown_fields(value: Any, schema: dict[str, Any], path: tuple = ()) -> Iterator[tuple[str, str]]:
    """(path, field) for every field of ``value`` that ``schema`` does not list."""
    if not isinstance(schema, dict):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from unknown_fields(item, properties[key], (*path, key))
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, (*path, key))
            elif extra is True or preserve:
                continue
            else:
                yield _path(path), key
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], (*path, index))


def _metadata_problems(obj: dict[str, Any]) -> Iterator[tuple[str, str]]:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not DNS_LABEL.match(name) or len(name) > 63:
        yield ".metadata.name", f"'{name}' is not a DNS label (lowercase letters, digits, '-', at most 63)"
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            yield f".metadata.labels.{key}", f"'{value}' is not a valid label value"


def validate_object(obj: dict[str, Any], kubernetes_version: str, crds: CrdSchemas) -> list[Problem]:
    kind = obj.get("kind", "?")
    name = (obj.get("metadata") or {}).get("name", "?")
    problems = [Problem(kind, name, path, reason) for path, reason in _metadata_problems(obj)]
    key = (obj.get("apiVersion", ""), kind)
    if key in crds:
        schema = crds[key]
        body = {k: v for k, v in obj.items() if k != "metadata"}
        for path, field in unknown_fields(body, schema):
            problems.append(Problem(kind, name, path, f"unknown field '{field}' (the CRD's schema does not list it)"))
        validator = jsonschema.Draft7Validator({k: v for k, v in schema.items() if k != "properties"} | {
            "properties": {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}})  # fmt: skip
        for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
            problems.append(Problem(kind, name, _path(error.absolute_path), error.message))
        return problems
    if key[0].startswith("serving.kserve.io/"):
        return problems + [Problem(kind, name, "", f"no CRD schema for {key[0]} {kind} (is that version installed?)")]
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        problems.append(Problem(kind, name, _path(error.absolute_path), error.message))
    except kubernetes_validate.SchemaNotFoundError:
        problems.append(Problem(kind, name, "", f"no schema for {key[0]} {kind} in Kubernetes {kubernetes_version}"))
    return problems


def validate_objects(objects: Iterable[dict[str, Any]], kubernetes_version: str, crds: CrdSchemas | None = None) -> None:
    """Raise ManifestError listing every problem (path and reason) of every object; return if all pass."""
    crds = bundled_crd_schemas() if crds is None else crds
    problems = [p for obj in objects for p in validate_object(obj, kubernetes_version, crds)]
    if problems:
        raise ManifestError(problems)
