"""The default "python" template on real VMs: pip in a virtual environment first on PATH,
CA certificates, curl, git and bash; ``pip install`` from a package index over the NAT.

This host has no route to PyPI, so the package index is the test's own: a wheel written
here, served as a PEP 503 "simple" index by an HTTP server on the host's loopback, which
the guest reaches as 10.0.2.2 through an allow list naming exactly that port."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest

from novasandbox import Sandbox
from novasandbox.network import GATEWAY
from novasandbox.snapshots import delete_snapshot

from .helpers import HostServer

VENV = "/opt/venv"
root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="egress policies are nftables rules on the VMM's uid (root)"
)
PIP_TIMEOUT = 300.0
"""pip imports a lot of Python: under TCG a first run in a fresh VM takes seconds."""


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(name: str, version: str, source: str) -> tuple[str, bytes]:
    """A pure-Python wheel of one module ``name`` (PEP 427), written by hand; the
    project's name is the module's with dashes."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
            "Summary: a test package of NovaSandbox\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: novasandbox-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


class SimpleIndex(HostServer):
    """A PEP 503 simple repository on the host's 127.0.0.1, served from a thread."""

    def __init__(self, wheels: dict[str, tuple[str, bytes]]) -> None:
        """``wheels``: project name -> (wheel file name, wheel bytes)."""
        routes: dict[str, tuple[str, bytes]] = {}
        links = []
        for project, (filename, data) in wheels.items():
            digest = hashlib.sha256(data).hexdigest()
            routes[f"/simple/{project}/"] = (
                "text/html",
                f'<!DOCTYPE html><html><body><a href="/files/{filename}#sha256={digest}">'
                f"{filename}</a></body></html>".encode(),
            )
            routes[f"/files/{filename}"] = ("application/octet-stream", data)
            links.append(f'<a href="/simple/{project}/">{project}</a>')
        routes["/simple/"] = ("text/html", f"<html><body>{''.join(links)}</body></html>".encode())
        super().__init__(routes.get)

    @property
    def pip_args(self) -> list[str]:
        """pip's options for this index (plain HTTP: pip wants the host named trusted)."""
        return [
            "--index-url",
            f"http://{GATEWAY}:{self.port}/simple/",
            "--trusted-host",
            str(GATEWAY),
        ]


@pytest.fixture
def index() -> Iterator[SimpleIndex]:
    server = SimpleIndex(
        {
            "nstpl-hello": make_wheel("nstpl_hello", "1.0", 'GREETING = "hello from a wheel"\n'),
            "nstpl-other": make_wheel("nstpl_other", "2.0", "ANSWER = 42\n"),
        }
    )
    yield server
    server.close()


def run_ok(sb: Sandbox, cmd: str | list[str], **kwargs: Any) -> str:
    r = sb.commands.run(cmd, **kwargs)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


# ---------------------------------------------------------------------------- contents


def test_python_pip_and_their_scripts_are_the_venvs(sb: Sandbox) -> None:
    out = run_ok(sb, ["python3", "-m", "pip", "--version"], timeout=PIP_TIMEOUT)
    assert f"from {VENV}/lib/python3.11/site-packages/pip " in out
    found = run_ok(sb, "for n in python python3 pip pip3; do command -v $n; done").split()
    assert found == [f"{VENV}/bin/{n}" for n in ("python", "python3", "pip", "pip3")]
    prefix = run_ok(sb, ["python", "-c", "import sys; print(sys.prefix, sys.base_prefix)"])
    assert prefix.split() == [VENV, "/usr"]
    env = run_ok(sb, 'printf "%s\\n" "$PATH" "$VIRTUAL_ENV"').splitlines()
    assert env[0].split(":")[0] == f"{VENV}/bin"
    assert "/usr/bin" in env[0].split(":")
    assert env[1] == VENV
    # the sandbox's env still applies, on top of the template's
    assert run_ok(sb, 'echo "$SANDBOX_LEVEL"') == "yes\n"
    # a login shell (which resets PATH in /etc/profile) gets the template's env too
    assert run_ok(sb, ["bash", "-lc", 'echo "$PATH"']).split(":")[0] == f"{VENV}/bin"


def test_a_calls_path_replaces_the_templates(sb: Sandbox) -> None:
    out = run_ok(sb, "command -v python3; echo $VIRTUAL_ENV", env={"PATH": "/usr/bin:/bin"})
    assert out == f"/usr/bin/python3\n{VENV}\n"


def test_tools(sb: Sandbox) -> None:
    assert run_ok(sb, ["git", "--version"]).startswith("git version 2.")
    assert run_ok(sb, ["bash", "--version"]).startswith("GNU bash, version 5.")
    assert run_ok(sb, ["curl", "--version"]).startswith("curl 7.")


def test_ca_certificates(sb: Sandbox) -> None:
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert int(run_ok(sb, f"grep -c 'BEGIN CERTIFICATE' {bundle}")) > 100
    count = run_ok(
        sb, ["python3", "-c", "import ssl; print(len(ssl.create_default_context().get_ca_certs()))"]
    )
    assert int(count) > 100


def test_the_agent_runs_on_the_system_python_without_the_venv(sb: Sandbox) -> None:
    """PID 1 and the agent it forks: Debian's python3 with -S, none of the template's env."""
    probe = (
        "import os\n"
        "for p in sorted(os.listdir('/proc')):\n"
        "    if p.isdigit():\n"
        "        try:\n"
        "            cmd = open(f'/proc/{p}/cmdline','rb').read().split(b'\\0')\n"
        "            env = open(f'/proc/{p}/environ','rb').read()\n"
        "            exe = os.readlink(f'/proc/{p}/exe')\n"
        "        except OSError:\n"
        "            continue\n"
        "        if b'/opt/novasandbox/init' in cmd:\n"
        "            print(p, exe, cmd[1].decode(), b'VIRTUAL_ENV' in env, b'/opt/venv' in env)\n"
    )
    lines = run_ok(sb, ["python3", "-c", probe], user="root").splitlines()  # root's /proc
    assert len(lines) >= 2, lines  # PID 1 and the agent
    assert lines[0].split()[0] == "1"
    for line in lines:
        _pid, exe, flag, has_venv_var, has_venv_path = line.split()
        assert (exe, flag, has_venv_var, has_venv_path) == (
            "/usr/bin/python3.11",
            "-S",
            "False",
            "False",
        )


def test_cli_run_finds_pip(state_root: Any) -> None:
    """The issue's own words: ``novasandbox run -- python3 -m pip ...`` (the real CLI)."""
    done = subprocess.run(
        [sys.executable, "-m", "novasandbox.cli", "run", "--timeout", str(PIP_TIMEOUT), "--",
         "python3", "-m", "pip", "--version"],
        capture_output=True, text=True, timeout=PIP_TIMEOUT + 60, env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"from {VENV}/lib/python3.11/site-packages/pip " in done.stdout


# ---------------------------------------------------------------------------- pip install


@root_only
def test_pip_install_over_nat_then_import_in_a_later_command(
    factory: Any, index: SimpleIndex
) -> None:
    sb = factory.create(network="nat", allow=[f"127.0.0.1:{index.port}"])
    pip = ["python3", "-m", "pip", "install", "--no-cache-dir", *index.pip_args]
    r = sb.commands.run([*pip, "nstpl-hello"], timeout=PIP_TIMEOUT, user="root")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "Successfully installed nstpl-hello-1.0" in r.stdout
    assert "externally-managed" not in r.stderr
    assert "/files/nstpl_hello-1.0-py3-none-any.whl" in index.requests
    out = run_ok(sb, ["python3", "-c", "import nstpl_hello as m; print(m.GREETING, m.__file__)"])
    assert (
        out == f"hello from a wheel {VENV}/lib/python3.11/site-packages/nstpl_hello/__init__.py\n"
    )
    assert run_ok(sb, "pip list --format=freeze").count("nstpl-hello==1.0") == 1

    # the unprivileged user (uid 1000, the default) installs into the same venv, which it owns
    r = sb.commands.run(["pip", "install", *index.pip_args, "nstpl-other"], timeout=PIP_TIMEOUT)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "Successfully installed nstpl-other-2.0" in r.stdout
    owner = run_ok(sb, f"stat -c %u {VENV}/lib/python3.11/site-packages/nstpl_other/__init__.py")
    assert owner == "1000\n"
    code = "import nstpl_hello, nstpl_other; print(nstpl_other.ANSWER)"
    assert run_ok(sb, ["python3", "-c", code]) == "42\n"
    assert run_ok(sb, ["python3", "-c", code], user="root") == "42\n"


@root_only
def test_pip_cannot_reach_an_index_the_allow_list_does_not_name(
    factory: Any, index: SimpleIndex
) -> None:
    """The counterpart of the test above: the same install without the allow list entry
    fails (so that test's success is the index's, through the NAT)."""
    sb = factory.create(network="nat", allow=["127.0.0.1:1"])
    r = sb.commands.run(
        ["pip", "install", "--retries", "0", "--timeout", "5", *index.pip_args,
         "nstpl-hello"],
        timeout=PIP_TIMEOUT,
    )  # fmt: skip
    assert r.exit_code != 0
    assert index.requests == []
    assert sb.commands.run(["python3", "-c", "import nstpl_hello"]).exit_code == 1


# ---------------------------------------------------------------------------- env layers


def test_template_env_under_sandbox_env_under_call_env_also_after_restore(
    factory: Any,
) -> None:
    sb = factory.create(env={"VIRTUAL_ENV": "/from-sandbox", "MINE": "1"})
    probe = (
        'printf "%s|%s|%s|%s\\n" '
        '"${PATH%%:*}" "$VIRTUAL_ENV" "$PIP_DISABLE_PIP_VERSION_CHECK" "$MINE"'
    )
    assert run_ok(sb, probe) == f"{VENV}/bin|/from-sandbox|1|1\n"
    assert run_ok(sb, probe, env={"VIRTUAL_ENV": "/from-call"}) == f"{VENV}/bin|/from-call|1|1\n"
    snap = sb.snapshot()
    try:
        clone = factory.create(from_snapshot=snap)
        assert run_ok(clone, probe) == f"{VENV}/bin|/from-sandbox|1|1\n"
        cold = factory.create(cold=True)
        assert run_ok(cold, probe) == f"{VENV}/bin|{VENV}|1|\n"
    finally:
        delete_snapshot(snap)


# ---------------------------------------------------------------------------- TLS


def test_curl_and_python_verify_tls_with_the_system_ca_store(factory: Any) -> None:
    """A CA added the Debian way (update-ca-certificates) is trusted by curl and by
    Python's default context: both use /etc/ssl/certs, and nothing else is needed."""
    sb = factory.create()
    script = r"""
set -e
mkdir -p /tmp/tls && cd /tmp/tls
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout key.pem -out cert.pem -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost 2>/dev/null
openssl s_server -quiet -accept 127.0.0.1:4433 -cert cert.pem -key key.pem -www \
    </dev/null >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for i in $(seq 100); do
    if curl -s -o /dev/null http://127.0.0.1:4433/ 2>/dev/null || [ $? -ne 7 ]; then break; fi
    sleep 0.1
done
set +e
curl -sv -o /dev/null https://localhost:4433/ 2>curl-before.txt
echo "before=$?"
grep -o 'CAfile: [^ ]*' curl-before.txt
cp cert.pem /usr/local/share/ca-certificates/novasandbox-test.crt
update-ca-certificates >/dev/null 2>&1
echo "update=$?"
curl -sS -o /dev/null -w 'curl=%{http_code}\n' https://localhost:4433/
python3 -c 'import urllib.request as u; print("python=%d" % u.urlopen("https://localhost:4433/").status)'
"""
    out = run_ok(sb, ["bash", "-c", script], timeout=120, user="root")  # the system CA store
    assert out.splitlines() == [
        "before=60",  # peer certificate cannot be authenticated with known CA certificates
        "CAfile: /etc/ssl/certs/ca-certificates.crt",
        "update=0",
        "curl=200",
        "python=200",
    ]
