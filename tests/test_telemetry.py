"""Server and GPU telemetry in the report, and what the run context says about the GPUs.

The GPU facts are parsed from the output of a real ``nvidia-smi`` (an H200 node, driver 580.159.04) and from
the node labels NVIDIA's GPU feature discovery writes; the report's section reads the stage records only.
"""

from __future__ import annotations

import os
import stat
from html.parser import HTMLParser
from pathlib import Path

from synthetic import closed_stage
from test_report import make_run

from servinglab import records, report
from servinglab.platforms.gpus import local_gpu_facts, node_gpu_facts, parse_nvidia_smi
from servinglab.report.rundata import load_run
from servinglab.report.telemetry import telemetry_section

SMI = Path(__file__).parent / "fixtures" / "nvidia-smi"
H200 = {"products": ["NVIDIA H200"], "count": 1, "memory_mib": 143771, "driver": "580.159.04", "cuda": "13.0",
        "source": "nvidia-smi"}  # fmt: skip


def test_nvidia_smi_output_of_a_real_h200_parses():
    assert parse_nvidia_smi((SMI / "query.csv").read_text(), (SMI / "nvidia-smi.txt").read_text()) == H200


def test_nvidia_smi_text_that_does_not_parse_is_left_out():
    assert parse_nvidia_smi("") == {}
    assert parse_nvidia_smi("No devices were found\n") == {}
    odd = parse_nvidia_smi("NVIDIA H200, 580.1 $(reboot), 143771\nNVIDIA H200, 580.159.04, 143771\n", "no header")
    assert odd["count"] == 2 and odd["driver"] == "580.159.04" and odd["cuda"] is None


def test_this_machine_s_gpus_come_from_nvidia_smi_on_the_path(tmp_path, monkeypatch):
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    # Answers as the real tool does: the query's CSV with --query-gpu, the status table without arguments.
    tool.write_text(f'#!/bin/sh\nif [ -n "$1" ]; then cat {SMI / "query.csv"}; else cat {SMI / "nvidia-smi.txt"}; fi\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    assert local_gpu_facts() == H200
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert local_gpu_facts() == {}


def test_node_labels_name_product_driver_and_cuda_per_gpu():
    def node(name, **labels):
        return {"metadata": {"name": name, "labels": labels}}

    nodes = [
        node("a", **{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
                     "nvidia.com/cuda.driver.major": "550", "nvidia.com/cuda.driver.minor": "54",
                     "nvidia.com/cuda.driver.rev": "15", "nvidia.com/cuda.runtime.major": "12",
                     "nvidia.com/cuda.runtime.minor": "4"}),
        node("cpu-only", **{"nvidia.com/gpu.product": "ignored: not a GPU node here"}),
    ]  # fmt: skip
    facts = node_gpu_facts(nodes, {"a": 8})
    assert facts == {"products": ["NVIDIA-H100-80GB-HBM3"], "count": 8, "memory_mib": 81559, "driver": "550.54.15",
                     "cuda": "12.4", "source": "node labels"}  # fmt: skip
    assert node_gpu_facts([node("a")], {"a": 1}) == {}


def _telemetry_stage(c, rate_mean_kv, waiting, verdict="valid", gpu=True):
    stage, rows = closed_stage("raw", c, 10.0 * c, 500.0 * c, tokens=16)
    stage["validity"] = {**stage["validity"], "verdict": verdict}
    stage["server"] |= {"pods": 2, "mean_kv_cache_usage": rate_mean_kv, "max_kv_cache_usage": rate_mean_kv * 1.5,
                        "mean_running": float(c), "max_running": float(c), "mean_waiting": waiting,
                        "max_waiting": waiting * 2, "mean_queue_ms": 0.5 * c, "p99_queue_ms_le": 25.0,
                        "prefix_cache_hit_rate": 0.75}  # fmt: skip
    if gpu:
        stage["gpu"] = {"mean_gpu_utilization_pct": 20.0 * c, "max_gpu_utilization_pct": 25.0 * c,
                        "mean_gpu_memory_used_mib": 120000.0, "max_gpu_memory_used_mib": 121000.0}  # fmt: skip
    return stage, rows


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.text = set(), []

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k == "id")

    def handle_data(self, data):
        self.text.append(data)


def test_the_report_shows_each_layer_s_telemetry_and_the_gpu_line(tmp_path):
    run_dir = make_run(tmp_path, "complete")
    records.update_context(run_dir, hardware={"cpu_model": "Test CPU", "gpu": H200})
    for stage, rows in (_telemetry_stage(2, 0.1, 0.0), _telemetry_stage(8, 0.4, 3.0, verdict="client-limited")):
        records.append(run_dir, records.LATENCY_STAGES, [stage], provenance="synthetic")
    run = load_run(run_dir)

    [raw] = telemetry_section(run)
    assert raw.layer == "raw" and raw.pods == 2 and raw.gpu_queries == ["gpu_memory_used_mib", "gpu_utilization_pct"]
    assert "prefix-cache hit %" in raw.columns and "preemptions" not in raw.columns  # only what some stage holds
    by_stage = {r.stage: r for r in raw.rows}
    c8 = dict(zip(raw.columns[1:], by_stage["c=8"].cells))
    assert c8["KV cache mean %"] == "40.0" and c8["waiting max"] == "6" and c8["queue p99 ms"] == "≤ 25"
    assert c8["gpu_utilization_pct mean / max"] == "160.0 / 200.0" and c8["prefix-cache hit %"] == "75.0"
    assert not by_stage["c=8"].valid and by_stage["c=2"].valid
    # The synthetic run's earlier stages recorded no gauges: their cells say so, not zero.
    assert dict(zip(raw.columns[1:], by_stage["c=1"].cells))["KV cache mean %"] == "–"

    page = _Text()
    page.feed(report.render_html(run_dir))
    text = " ".join(page.text)
    assert {"telemetry", "fig-telemetry-raw"} <= page.ids
    assert "fig-telemetry-raw-axes_4" in page.ids  # KV cache, requests, queue time and the GPU's utilisation
    assert "1 × NVIDIA H200 (143771 MiB) · driver 580.159.04 · CUDA 13.0 (from nvidia-smi)" in text
    assert "Server telemetry against load: raw" in text
    assert "No GPU telemetry in this run" not in text  # the GPU queries' values are shown


def test_a_run_without_gpus_or_gauges_says_so(tmp_path):
    run_dir = make_run(tmp_path, "partial")
    page = _Text()
    page.feed(report.render_html(run_dir))
    text = " ".join(page.text)
    assert "No stage of this run recorded the server's metrics." in text
    assert "driver" not in text
