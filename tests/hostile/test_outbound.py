"""Outbound connections to the servers under test are what the study says, never what the environment says.

A proxy planted in ``HTTP_PROXY`` would see the bearer key and add its hop to every latency; a key sent over
plain http:// to another machine can be read on the way; a certificate left unchecked by default lets anyone
in the middle answer; a key file with a line break would put the key into the HTTP client's error message;
and a digest of the key folded into the recorded spec hash lets a guess be tested offline.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from streaming_endpoint import StreamingEndpoint

from servinglab.config import load_study
from servinglab.errors import ParamsError, PlatformError
from servinglab.experiments.smoke import run_smoke
from servinglab.measure.bench import read_api_key
from servinglab.measure.loadgen import StageSpec, Target, run_stage
from servinglab.measure.workload import RequestSpec
from servinglab.platforms.base import Endpoint, endpoint_options

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
KEY = "sk-planted-outbound-key-3141"


# --- real servers: a counting proxy, a small OpenAI-style server ----------------------------------------


class CountingProxy:
    """A forwarding HTTP proxy on loopback that counts the requests it relays (one per connection)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.authorizations: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, url, version = request_line.split(" ")
            self.requests.append(f"{method} {url}")
            headers = [h for h in header_lines if not h.lower().startswith(("connection:", "proxy-connection:"))]
            self.authorizations += [h for h in headers if h.lower().startswith("authorization:")]
            length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
            while len(body) < length:
                body += client.recv(65536)
            target = url.split("://", 1)[1]
            host, _, path = target.partition("/")
            address, _, port = host.rpartition(":")
            with socket.create_connection((address, int(port))) as upstream:
                forwarded = "\r\n".join([f"{method} /{path} {version}", *headers, "Connection: close", "", ""])
                upstream.sendall(forwarded.encode("latin-1") + body)
                while data := upstream.recv(65536):
                    client.sendall(data)

    def close(self) -> None:
        self._listener.close()


class OpenAIServer(ThreadingHTTPServer):
    """``GET /v1/models`` and a non-streaming ``POST /v1/chat/completions``, as vLLM answers them, on loopback
    (or over TLS with ``certificate``); requests without the key are refused (401)."""

    def __init__(self, key: str | None = KEY, certificate: tuple[Path, Path] | None = None) -> None:
        self.key, self.seen = key, []
        super().__init__(("127.0.0.1", 0), _OpenAIHandler)
        scheme = "http"
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _OpenAIHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _allowed(self) -> bool:
        self.server.seen.append(self.path)
        key = self.server.key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._answer(401, {"error": "unauthorized"})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802
        if self._allowed():
            self._answer(200, {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._allowed():
            self._answer(200, {
                "id": "c", "object": "chat.completion", "created": 0, "model": "m", "system_fingerprint": "vllm-0.1.0",
                "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            })  # fmt: skip


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (as llm-d's workload serves KServe's own)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "servinglab-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


@pytest.fixture
def proxy(monkeypatch):
    """A counting proxy, named by every proxy variable of the environment (NO_PROXY unset)."""
    running = CountingProxy()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, running.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield running
    running.close()


@pytest.fixture
def server():
    running = OpenAIServer()
    yield running
    running.close()


@pytest.fixture
def streaming():
    with StreamingEndpoint() as running:
        yield running


def write_study(folder: Path, extra: dict | None = None, **top) -> Path:
    """A small local study in ``folder/params`` with a config-only model directory."""
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "config.json").write_text("{}")
    data = {
        "study": "outbound",
        "platform": {"kind": "local"},
        "model": {"name": "m", "served_name": "m", "source": {"kind": "local", "path": str(folder / "model")}},
        "layers": {"raw": {"kind": "raw-vllm"}},
        "paths": {"runs_dir": str(folder / "runs"), "reports_dir": str(folder / "reports"),
                  "cache_dir": str(folder / "cache")},  # fmt: skip
        **top,
    }
    data.update(extra or {})
    (folder / "params").mkdir(exist_ok=True)
    path = folder / "params" / "outbound.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    return load_study(write_study(tmp_path))


def new_run(folder: Path) -> Path:
    from servinglab import records

    return records.create_run(folder / "runs", "outbound", {"study": "outbound"})


def specs(n: int = 4) -> list[RequestSpec]:
    return [RequestSpec("ok request", 2, 4) for _ in range(n)]


# --- proxies: only the study's ---------------------------------------------------------------------


def test_smoke_ignores_the_proxy_of_the_environment(proxy, server, study, tmp_path):
    rows = run_smoke(study, Endpoint("raw", f"{server.url}/v1", "m", KEY), new_run(tmp_path / "run"))
    assert proxy.requests == [] and proxy.authorizations == []
    assert all(r["passed"] for r in rows), rows
    assert "/v1/chat/completions" in server.seen


def test_the_load_generator_ignores_the_proxy_of_the_environment(proxy, streaming):
    records: list[dict] = []
    outcome = run_stage(Target(f"{streaming.url}/v1", "m", api_key=KEY), specs(), StageSpec(max_concurrency=2),
                        records.append)  # fmt: skip
    assert outcome.completed == 4 and proxy.requests == []


def test_a_proxy_the_study_names_is_used(server, streaming, tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    named = CountingProxy()
    try:
        study = load_study(write_study(tmp_path, client={"proxy": named.url}))
        endpoint = Endpoint("raw", f"{server.url}/v1", "m", KEY, **endpoint_options(study, "raw"))
        rows = run_smoke(study, endpoint, new_run(tmp_path / "run"))
        assert all(r["passed"] for r in rows), rows
        assert f"GET {server.url}/v1/models" in named.requests and "through proxy" in rows[0]["via"]
        outcome = run_stage(Target(f"{streaming.url}/v1", "m", proxy=named.url), specs(2),
                            StageSpec(max_concurrency=1), [].append)  # fmt: skip
        assert outcome.completed == 2
        assert sum(r.startswith(f"POST {streaming.url}/v1/chat/completions") for r in named.requests) == 2
    finally:
        named.close()


def test_a_proxy_must_be_an_http_url(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with pytest.raises(ParamsError, match=r"client\.proxy"):
        load_study(write_study(tmp_path, client={"proxy": "socks5://127.0.0.1:1080"}))


# --- the key never crosses the network in clear text unless the study says so ----------------------------


@pytest.mark.parametrize("url", ["http://10.1.2.3:8080/v1", "http://gateway.example.com/v1",
                                 "http://qwen.servinglab.example.com/v1"])  # fmt: skip
def test_a_key_over_plain_http_to_another_machine_is_refused(url):
    with pytest.raises(PlatformError, match=r"client\.allow_plain_http_key") as refused:
        Endpoint("gw", url, "m", KEY)
    assert KEY not in str(refused.value)
    # The same address without a key, over https, or allowed by name, is fine.
    Endpoint("gw", url, "m", None)
    Endpoint("gw", url.replace("http://", "https://"), "m", KEY)
    Endpoint("gw", url, "m", KEY, plain_http_key_allowed=True)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"])
def test_a_key_over_loopback_is_fine(url):
    assert Endpoint("raw", url, "m", KEY).api_key == KEY


def test_a_gateway_over_http_with_a_key_is_refused_unless_the_study_names_the_layer(cluster, tmp_path, monkeypatch):
    from kube_controller import Controller

    from servinglab.platforms import get_platform

    monkeypatch.setenv("SERVINGLAB_TEST_KEY", KEY)
    example = Path(__file__).resolve().parents[2] / "params" / "cluster-example.yaml"
    base = ["platform.ready_timeout_s=20", "platform.endpoint=gateway", "auth.api_key_env=SERVINGLAB_TEST_KEY"]
    platform = get_platform(load_study(example, base))
    with Controller(cluster.kube, "servinglab", step_s=0.02):
        platform.ensure("kserve-standard", str(tmp_path))
    with pytest.raises(PlatformError, match=r"kserve-standard: refusing to send the API key over plain http://") as no:
        platform.endpoint("kserve-standard")
    assert KEY not in str(no.value)
    allowed = get_platform(load_study(example, [*base, "client.allow_plain_http_key=[kserve-standard]"]))
    endpoint = allowed.endpoint("kserve-standard")
    assert endpoint.base_url.startswith("http://qwen-cluster-kserve-standard.") and endpoint.api_key == KEY


def test_a_local_server_on_another_address_with_a_key_is_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    monkeypatch.setenv("SERVINGLAB_TEST_KEY", KEY)
    path = write_study(tmp_path, platform={"kind": "local", "host": "192.0.2.10"},
                       auth={"api_key_env": "SERVINGLAB_TEST_KEY"})  # fmt: skip
    with pytest.raises(ParamsError, match=r"platform\.host \(layer raw\): refusing to send the API key"):
        load_study(path)
    load_study(path, ["client.allow_plain_http_key=[raw]"])



def test_bench_refuses_a_key_over_plain_http_to_another_machine(monkeypatch, capsys):
    from servinglab import cli

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    argv = ["bench", "--base-url", "http://192.0.2.7:8000", "--model", "m", "--input-len", "4", "--output-len", "4",
            "--num-prompts", "1", "--seed", "0", "--out", "unused.json"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to send the API key over plain http:// to 192.0.2.7:8000" in err and "--allow-plain-http-key" in err
    assert KEY not in err

# --- TLS: checked unless the study names the layer -------------------------------------------------------


def test_tls_is_checked_by_default_and_off_only_by_name(tmp_path, monkeypatch, proxy):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    certificate = self_signed(tmp_path)
    tls_server = OpenAIServer(certificate=certificate)
    try:
        url = f"{tls_server.url}/v1"
        default = load_study(write_study(tmp_path))
        assert default.tls_verify("raw") is True and Endpoint("raw", url, "m").verify_tls is True
        rows = run_smoke(default, Endpoint("raw", url, "m", KEY, **endpoint_options(default, "raw")),
                         new_run(tmp_path / "a"))
        assert not any(r["passed"] for r in rows) and tls_server.seen == []  # a self-signed server is not trusted
        assert "certificate checked against the system's CAs" in rows[0]["via"]

        with_ca = load_study(write_study(tmp_path, client={"ca_file": str(certificate[0])}))
        rows = run_smoke(with_ca, Endpoint("raw", url, "m", KEY, **endpoint_options(with_ca, "raw")),
                         new_run(tmp_path / "b"))
        assert all(r["passed"] for r in rows), rows
        assert f"certificate checked against {certificate[0]}" in rows[0]["via"]

        unchecked = load_study(write_study(tmp_path, client={"tls_verify": {"raw": False}}))
        rows = run_smoke(unchecked, Endpoint("raw", url, "m", KEY, **endpoint_options(unchecked, "raw")),
                         new_run(tmp_path / "c"))
        assert all(r["passed"] for r in rows) and "certificate not checked (client.tls_verify)" in rows[0]["via"]
        assert proxy.requests == []
    finally:
        tls_server.close()


def test_tls_settings_name_layers_of_the_study(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with pytest.raises(ParamsError, match=r"client\.tls_verify: unknown layer 'rwa'"):
        load_study(write_study(tmp_path, client={"tls_verify": {"rwa": False}}))
    with pytest.raises(ParamsError, match=r"client\.ca_file: .*missing\.pem: file not found"):
        load_study(write_study(tmp_path, client={"ca_file": "missing.pem"}))


def test_llm_d_over_a_port_forward_checks_its_certificate_unless_the_study_turns_it_off(cluster, tmp_path):
    from kube_controller import Controller

    from servinglab.platforms import get_platform

    example = Path(__file__).resolve().parents[2] / "params" / "cluster-example.yaml"
    data = yaml.safe_load(example.read_text())
    data.pop("client")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "no-client.yaml").write_text(yaml.safe_dump(data))
    platform = get_platform(load_study(tmp_path / "params" / "no-client.yaml", ["platform.ready_timeout_s=20"]))
    with Controller(cluster.kube, "servinglab", step_s=0.02):
        platform.ensure("llm-d", str(tmp_path))
    assert platform.endpoint("llm-d").verify_tls is True
    assert all(t.verify_tls is True for t in platform.metrics_targets("llm-d"))
    example_platform = get_platform(load_study(example, ["platform.ready_timeout_s=20"]))
    endpoint = example_platform.endpoint("llm-d")
    assert endpoint.verify_tls is False and "certificate not checked (client.tls_verify)" in endpoint.via


# --- the key file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,problem", [
    (f"{KEY}\nsecond-line\n".encode(), "must be one line; found 2 lines"),
    (f"{KEY}\r\n{KEY}".encode(), "must be one line; found 2 lines"),
    (b"\n  \n", "the API key is empty"),
    (f"{KEY}\x1b[2J".encode(), "not printable"),
    (KEY.encode() + b"\xff\xfe", "not UTF-8 text"),
])  # fmt: skip
def test_a_key_file_that_is_not_one_printable_line_is_refused_without_the_key(tmp_path, monkeypatch, content,
                                                                                problem):  # fmt: skip
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    key_file = tmp_path / "key.txt"
    key_file.write_bytes(content)
    with pytest.raises(ParamsError, match=problem) as refused:
        load_study(write_study(tmp_path, auth={"api_key_file": str(key_file)}))
    message = str(refused.value)
    assert "auth.api_key_file" in message and str(key_file) in message and KEY not in message
    assert "\n" not in message
    with pytest.raises(ParamsError, match=problem) as from_bench:
        read_api_key(file=str(key_file))
    assert KEY not in str(from_bench.value)


def test_a_key_file_is_stripped(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    (tmp_path / "key.txt").write_text(f"  {KEY}\n")
    study = load_study(write_study(tmp_path, auth={"api_key_file": str(tmp_path / "key.txt")}))
    assert study.api_key() == KEY
    # Changed after the check: read again when needed, and refused again, without the key.
    (tmp_path / "key.txt").write_text(f"{KEY}\n{KEY}\n")
    with pytest.raises(ParamsError, match="one line") as refused:
        study.api_key()
    assert KEY not in str(refused.value)


def test_a_key_variable_with_a_line_break_is_refused_without_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    monkeypatch.setenv("SERVINGLAB_TEST_KEY", f"{KEY}\nX-Injected: 1")
    with pytest.raises(ParamsError, match="SERVINGLAB_TEST_KEY: the API key must be one line") as refused:
        load_study(write_study(tmp_path, auth={"api_key_env": "SERVINGLAB_TEST_KEY"}))
    assert KEY not in str(refused.value)


def test_the_cli_refuses_a_multi_line_key_file_with_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    from servinglab import cli

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    (tmp_path / "key.txt").write_text(f"{KEY}\nmore\n")
    path = write_study(tmp_path, auth={"api_key_file": str(tmp_path / "key.txt")})
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert KEY not in err and len(err.strip().splitlines()) == 1 and "auth.api_key_file" in err


# --- the spec hash holds nothing derived from the key --------------------------------------------------


def test_the_spec_hash_does_not_depend_on_the_key(tmp_path, monkeypatch):
    from servinglab.platforms.local import LocalPlatform

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    path = write_study(tmp_path, auth={"api_key_env": "SERVINGLAB_TEST_KEY"})
    hashes = []
    for key in (KEY, "another-key"):
        monkeypatch.setenv("SERVINGLAB_TEST_KEY", key)
        hashes.append(LocalPlatform(load_study(path)).spec_hash("raw"))
    # The hash is recorded beside all its other inputs: a part derived from the key would be an oracle for it.
    assert hashes[0] == hashes[1]
    # Whether a key is set still tells two servers apart.
    monkeypatch.delenv("SERVINGLAB_TEST_KEY")
    keyless = LocalPlatform(load_study(write_study(tmp_path)))
    assert keyless.spec_hash("raw") != hashes[0]


# --- the report says how the clients connected ----------------------------------------------------------


def test_the_report_says_which_proxy_and_certificate_check_the_clients_used(tmp_path, monkeypatch):
    from servinglab import records
    from servinglab.report import client_connections
    from servinglab.report.rundata import load_run

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    study = load_study(write_study(tmp_path, client={"proxy": "http://proxy.example:3128",
                                                     "tls_verify": {"raw": False}}))  # fmt: skip
    run_dir = records.create_run(tmp_path / "runs", "outbound", {"params": study.resolved()})
    line = client_connections(load_run(run_dir))
    assert "through proxy http://proxy.example:3128" in line and "not checked for raw (client.tls_verify)" in line
    default = load_study(write_study(tmp_path))
    line = client_connections(load_run(records.create_run(tmp_path / "runs", "outbound",
                                                          {"params": default.resolved()})))  # fmt: skip
    assert line.startswith("no proxy") and "checked against the system's CAs" in line and "not checked" not in line
