"""What the platform offers before anything is deployed: hardware, engine, which layers it can host."""

from __future__ import annotations

import os
from typing import Any

from .. import layers, modelbuild, records
from ..config import Study
from ..platforms import Platform


def layer_support(study: Study, platform: Platform, cluster: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per layer of the study: can this platform host it (and if not, why), and what its kind relies
    on on a cluster (the CRDs and the control-plane namespaces the report's Control and Prereqs rows read);
    ``cluster`` is the platform's inventory of the cluster, when it has one."""
    checks = cluster or {}
    rows = []
    for name, layer in study.layers.items():
        kind = layers.of(layer)
        reason = platform.unsupported_reason(name)
        requires = {"crds": {crd: kind.crds.get(crd, crd) for crd in kind.required_crds(layer)},
                    "control_plane_namespaces": kind.control_plane_namespaces(layer, checks),
                    "controllers": [c for c in checks.get("controllers", []) if c["name"] in kind.controllers],
                    "facts": (checks.get("kind_facts") or {}).get(kind.name, {}),
                    "has_gateway": kind.has_gateway}  # fmt: skip
        rows.append({"layer": name, "kind": layer.kind, "hostable": reason is None, "reason": reason,
                     "requires": requires})  # fmt: skip
    return rows


def model_facts(study: Study, platform: Platform) -> dict[str, Any]:
    """Facts of the model directory the platform will serve (built now if it is the project's model)."""
    if study.model.source.kind == "uri":
        return {"source": study.model.source.uri, "note": "read by the cluster, not by this machine"}
    directory, extra_args = platform.model_dir()
    facts = modelbuild.model_dir_facts(directory).to_dict()
    facts["load_format"] = "dummy" if "dummy" in extra_args else "weights"
    facts["source_kind"] = study.model.source.kind
    return facts


def run_preflight(study: Study, platform: Platform, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Gather the platform's facts, record them in the run directory, and return them.

    Parameters
    ----------
    study : Study
        The loaded study.
    platform : Platform
        The study's platform (``servinglab.platforms.get_platform(study)``).
    run_dir : path
        Where ``data/preflight.jsonl`` and run.json's ``platform``/``hardware``/``engine`` go.
    """
    facts = platform.facts()
    support = layer_support(study, platform, facts.get("cluster"))
    model = model_facts(study, platform)
    record = {"at": records.utc_now(), "facts": facts, "layers": support, "model": model}
    records.append(run_dir, records.PREFLIGHT, [record])
    records.update_context(
        run_dir,
        platform={"name": facts["platform"], "accelerator": facts.get("accelerator")},
        hardware=facts.get("hardware", {}),
        engine=facts.get("engine", {}),
        model={"served_name": study.model.served_name, "name": study.model.name} | model,
    )
    return record


def facts_frame(found: dict[str, Any]):
    """Hardware and engine facts of a preflight record, one row per fact."""
    import pandas as pd

    facts = found["facts"]
    return pd.Series(facts.get("hardware", {}) | facts.get("engine", {}), name="value").to_frame()


def layers_frame(found: dict[str, Any]):
    """Which layers the platform can host, and why not."""
    import pandas as pd

    return pd.DataFrame(found["layers"])


def model_frame(found: dict[str, Any]):
    """Facts of the model directory."""
    import pandas as pd

    return pd.Series(found["model"], name="value").to_frame()
