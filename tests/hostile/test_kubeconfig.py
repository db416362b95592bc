"""A kubeconfig that is not one: a clear line naming the file, exit code 2, and none of its contents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "sl-secret-token-4f1c"

BROKEN = {
    "not_yaml": f"apiVersion: v1\nusers:\n- name: u\n  user: {{token: {TOKEN}\nclusters: [ {{\n",
    "wrong_shape": f"apiVersion: v1\nclusters: 5\ncontexts: x\ncurrent-context: a\nusers: [{{name: u, user: {{token: {TOKEN}}}}}]\n",
    "binary": None,
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_kubeconfig_is_one_clear_line(case, tmp_path):
    path = tmp_path / "kubeconfig"
    if BROKEN[case] is None:
        path.write_bytes(b"\xff\xfe\x00garbage" + TOKEN.encode() + b"\x00\x81")
    else:
        path.write_text(BROKEN[case])
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": str(path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "servinglab.cli", "teardown", str(ROOT / "params" / "cluster-example.yaml")],
                          capture_output=True, text=True, env=env | {"PYTHONPATH": str(ROOT / "lib")}, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert str(path) in done.stderr and "kubeconfig" in done.stderr
    assert TOKEN not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
