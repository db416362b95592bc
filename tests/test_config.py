"""The study schema: merge order, and a clear error for every kind of bad input."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import PARAMS, REPO, engine_processes, run_cli

from servinglab.config import OVERRIDES_ENV, load_study
from servinglab.errors import ParamsError


@pytest.fixture()
def no_env_overrides(monkeypatch):
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)


def write(path, data):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def minimal(**extra):
    study = {
        "study": "t",
        "platform": {"kind": "local"},
        "model": {"name": "m", "served_name": "m", "source": {"kind": "built"}},
        "layers": {"raw": {"kind": "raw-vllm"}},
    }
    study.update(extra)
    return study


@pytest.mark.parametrize("name", ["local.yaml", "ci.yaml", "cluster-example.yaml"])
def test_shipped_studies_validate(name, no_env_overrides):
    study = load_study(PARAMS / name)
    assert study.study
    assert study.project_dir == REPO
    assert list(study.layers)


def test_schema_defaults_fill_what_the_file_leaves_out(tmp_path, no_env_overrides):
    study = load_study(write(tmp_path / "s.yaml", minimal()))
    assert study.platform.ready_timeout_s == 900.0
    assert study.layers["raw"].replicas == 1
    assert study.workloads.smoke.max_tokens == 16
    assert study.run.teardown == "always"
    assert study.model.source.shape == "tiny"


def test_merge_order_defaults_file_override_file_then_set(tmp_path, monkeypatch):
    path = write(tmp_path / "s.yaml", minimal(workloads={"smoke": {"max_tokens": 10, "prompt": "file"}}))
    over = write(tmp_path / "o.yaml", {"workloads": {"smoke": {"max_tokens": 20}}})
    monkeypatch.setenv(OVERRIDES_ENV, str(over))
    study = load_study(path, ["workloads.smoke.timeout_s=7"])
    assert study.workloads.smoke.max_tokens == 20  # override file beats the study file
    assert study.workloads.smoke.prompt == "file"  # what the override leaves alone stays
    assert study.workloads.smoke.timeout_s == 7  # --set applies last
    study = load_study(path, ["workloads.smoke.max_tokens=30"])
    assert study.workloads.smoke.max_tokens == 30  # --set beats the override file
    assert study.sources == [str(path.resolve()), str(over.resolve()), "--set workloads.smoke.max_tokens=30"]


def test_set_values_are_yaml(tmp_path, no_env_overrides):
    study = load_study(
        write(tmp_path / "s.yaml", minimal()),
        ["model.engine_args.enforce_eager=true", "model.engine_args.max-model-len=512", "slos.ttft_ms_p95=1.5"],
    )
    assert study.model.engine_args == {"enforce-eager": True, "max-model-len": 512}
    assert study.slos.ttft_ms_p95 == 1.5


def test_a_new_kind_replaces_the_mapping_below_it(tmp_path, no_env_overrides):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    path = write(tmp_path / "s.yaml", minimal())
    study = load_study(path, ["model.source.kind=local", f"model.source.path={tmp_path / 'm'}"])
    assert study.model.source.kind == "local"  # shape and seed of the built source are gone
    study = load_study(path, ["model.source.seed=5"])
    assert (study.model.source.kind, study.model.source.seed) == ("built", 5)  # same kind: merged


def test_layers_of_the_same_kind_sit_side_by_side(tmp_path, no_env_overrides):
    layers = {"std": {"kind": "kserve", "mode": "Standard"}, "kn": {"kind": "kserve", "mode": "Knative"}}
    study = load_study(write(tmp_path / "s.yaml", minimal(layers=layers)))
    assert [l.mode for l in study.layers.values()] == ["Standard", "Knative"]


BAD_INPUTS = [
    # (what the file says, --set items, fragments the one message must contain)
    (minimal(), ["layers.raw.replicsa=2"], ["layers.raw.replicsa", "unknown key", "did you mean 'replicas'"]),
    ({**minimal(), "platfrom": {"kind": "local"}}, [], ["platfrom", "did you mean 'platform'"]),
    (minimal(), ["layers.raw.replicas=many"], ["layers.raw.replicas", "valid integer", "'many'"]),
    (minimal(), ["platform.ready_timeout_s=-5"], ["platform.ready_timeout_s", "greater than 0"]),
    (minimal(), ["layers.x.kind=kserv"], ["layers.x.kind", "unknown layer kind kserv", "raw-vllm, kserve, llm-d"]),
    (minimal(), ["layers.x.mode=Standard"], ["layers.x.kind", "required key is missing"]),
    (minimal(), ["layers.raw.kind=kserve", "layers.raw.min_replicas=3"], ["min_replicas (3) exceeds max_replicas (1)"]),
    (minimal(), ["model.engine_args.port=8000"], ["model.engine_args", "'port' is set by the platform"]),
    (minimal(), ["model.source.kind=uri", "model.source.uri=pvc://m/x"], ["needs platform: kubernetes"]),
    (minimal(), ["model.source.kind=uri", "model.source.uri=s3://m/x"], ["model.source.uri", "pvc|hf|oci"]),
    (minimal(), ["study=Not_A_Name"], ["study:", "should match pattern"]),
    (minimal(layers={}), [], ["layers", "at least 1 item"]),
    ({k: v for k, v in minimal().items() if k != "model"}, [], ["model: required key is missing"]),
]


@pytest.mark.parametrize("data, sets, fragments", BAD_INPUTS)
def test_bad_input_names_file_key_and_problem(tmp_path, no_env_overrides, data, sets, fragments):
    path = write(tmp_path / "s.yaml", data)
    with pytest.raises(ParamsError) as caught:
        load_study(path, sets)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    # The origin is the last source that set the offending key: the --set item, else the file.
    origin = f"--set {sets[-1]}: " if sets else f"{path.resolve()}: "
    assert origin in message, message


def test_error_names_the_override_file_that_brought_the_key(tmp_path, monkeypatch):
    path = write(tmp_path / "s.yaml", minimal())
    over = write(tmp_path / "shrink.yaml", {"workloads": {"smoke": {"max_tokenz": 4}}})
    monkeypatch.setenv(OVERRIDES_ENV, str(over))
    with pytest.raises(ParamsError, match=r"shrink\.yaml: workloads\.smoke\.max_tokenz: unknown key"):
        load_study(path)


def test_missing_study_file(tmp_path, no_env_overrides):
    with pytest.raises(ParamsError, match=r"nope\.yaml: study file not found"):
        load_study(tmp_path / "nope.yaml")


def test_missing_override_file(tmp_path, monkeypatch):
    monkeypatch.setenv(OVERRIDES_ENV, str(tmp_path / "gone.yaml"))
    with pytest.raises(ParamsError, match=r"gone\.yaml: override file \(from SERVINGLAB_OVERRIDES\) not found"):
        load_study(write(tmp_path / "s.yaml", minimal()))


def test_invalid_yaml_names_line(tmp_path, no_env_overrides):
    path = write(tmp_path / "s.yaml", "study: t\nlayers:\n  raw: [kind: raw-vllm\n")
    with pytest.raises(ParamsError, match=r"s\.yaml: invalid YAML at line \d+, column \d+"):
        load_study(path)


def test_top_level_must_be_a_mapping(tmp_path, no_env_overrides):
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_study(write(tmp_path / "s.yaml", "- a\n- b\n"))


@pytest.mark.parametrize("item", ["noequals", "=3", "a..b=1"])
def test_malformed_set_items(tmp_path, no_env_overrides, item):
    with pytest.raises(ParamsError, match=f"--set {item}"):
        load_study(write(tmp_path / "s.yaml", minimal()), [item])


def test_missing_model_directory(tmp_path, no_env_overrides):
    data = minimal(model={"name": "m", "served_name": "m", "source": {"kind": "local", "path": "models/none"}})
    with pytest.raises(ParamsError, match=r"model\.source\.path: .*models/none: directory not found"):
        load_study(write(tmp_path / "s.yaml", data))


def test_relative_paths_resolve_against_the_project_folder(tmp_path, no_env_overrides):
    (tmp_path / "params").mkdir()
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    data = minimal(model={"name": "m", "served_name": "m", "source": {"kind": "local", "path": "models/m"}})
    study = load_study(write(tmp_path / "params" / "s.yaml", data))
    assert study.resolve_path(study.model.source.path) == tmp_path / "models" / "m"
    assert study.runs_dir == tmp_path / "runs"


def test_api_key_variable_must_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    monkeypatch.delenv("SL_TEST_KEY", raising=False)
    path = write(tmp_path / "s.yaml", minimal(auth={"api_key_env": "SL_TEST_KEY"}))
    with pytest.raises(ParamsError, match="auth.api_key_env: environment variable SL_TEST_KEY is not set"):
        load_study(path)
    monkeypatch.setenv("SL_TEST_KEY", "sk-x")
    study = load_study(path)
    assert study.api_key() == "sk-x"
    assert "sk-x" not in str(study.resolved())


def test_unknown_layer_name_is_rejected(tmp_path, no_env_overrides):
    study = load_study(write(tmp_path / "s.yaml", minimal()))
    with pytest.raises(ParamsError, match=r"unknown layer 'rwa'; the study defines raw"):
        study.select_layers(["rwa"])


def test_cli_rejects_a_misspelt_key_at_once_and_starts_nothing(tmp_path):
    """`servinglab run` on a misspelt key: exit 2, one message with file and key, nothing created."""
    study = yaml.safe_load((PARAMS / "ci.yaml").read_text())
    study["workloads"]["smoke"]["max_tokns"] = 4
    study["paths"] = {"runs_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}
    path = write(tmp_path / "typo.yaml", study)
    before = {p.pid for p in engine_processes()}
    t0 = time.monotonic()
    # The bound only turns a hang into a failure; the run is expected to end within a few seconds.
    done = run_cli("run", str(path), env_overrides=None, extra_env={OVERRIDES_ENV: ""}, timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 2, done.stderr
    assert f"{path}: workloads.smoke.max_tokns: unknown key (did you mean 'max_tokens'?)" in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert {p.pid for p in engine_processes()} <= before
    print(f"rejected in {elapsed:.2f} s")


def test_cli_check_prints_the_merged_study(tmp_path):
    done = run_cli("check", str(PARAMS / "local.yaml"), "--set", "workloads.smoke.max_tokens=3", timeout=60)
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)
    assert merged["workloads"]["smoke"]["max_tokens"] == 3
    assert merged["study"] == "ci"  # the session's override file merges params/ci.yaml in
    assert "--set workloads.smoke.max_tokens=3" in done.stdout.splitlines()[0]
