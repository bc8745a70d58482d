"""`meshlet up --netns` (root): every replica in its own pod with transparent
interception; apps dial services by name; everything removed on exit and after a
crash (`meshlet down --netns`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import UpProcess, eventually

from netns.netlab import can_run

pytestmark = [pytest.mark.timeout(240)]

why_not = can_run()
if why_not:
    pytest.skip(why_not, allow_module_level=True)

APPS = str(Path(__file__).with_name("apps.py"))


def ours() -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = [x.split()[0] for x in ns.splitlines() if x.startswith("mshl-")]
    found += re.findall(r"^\d+: (mshl(?:v\d+|br0))[@:]", links, re.M)
    if os.path.isdir("/etc/netns"):
        found += [d for d in os.listdir("/etc/netns") if d.startswith("mshl-")]
    return found


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    p = tmp_path / "mesh.yaml"
    p.write_text(f"""
trust_domain: pods.test
services:
  - name: web
    ports: [8080]
    policy: {{default: all-authenticated}}
    run:
      command: python {APPS} http 8080 web
      replicas: 2
  - name: client
    run:
      command: python -c "import time; time.sleep(3600)"
""")
    return p


@pytest.fixture
def clean() -> Iterator[None]:
    assert not ours(), f"leftovers before the test: {ours()}"
    yield
    if ours():
        subprocess.run([sys.executable, "-m", "meshlet", "down", "--netns"],
                       capture_output=True, timeout=60)


def curl_in(pod: str, url: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", pod, "curl", "-sS", "-m", "5", url],
                       capture_output=True, text=True, timeout=20)
    return r.stdout + r.stderr


def test_up_netns_runs_pods_and_cleans_up(mesh_file: Path, tmp_path: Path,
                                          clean: None) -> None:
    up = UpProcess(mesh_file, tmp_path / "state", "--netns", new_session=True)
    try:
        up.wait_line("mesh up;", 90)
        assert "mshl-web-0" in up.text() and "mshl-client-0" in up.text()
        # The client dials the service by name and port, knowing nothing of the mesh:
        # resolved to the service's virtual address, intercepted, balanced, mTLS.
        seen: set[str] = set()

        def both() -> bool:
            out = curl_in("mshl-client-0", "http://web:8080/")
            assert "client=spiffe://pods.test/ns/default/sa/client" in out, out
            seen.add(out.split()[2])
            return seen == {"web-0", "web-1"}

        eventually(both, timeout=20, interval=0.05)
        # Plaintext from outside the mesh (the host) to a pod: refused by its policy.
        web0 = re.search(r"mshl-web-0\s+(\d+\.\d+\.\d+\.\d+):8080", up.text())
        assert web0, up.text()
        out = subprocess.run(["curl", "-sS", "-m", "5", "-i", f"http://{web0.group(1)}:8080/"],
                             capture_output=True, text=True, timeout=20).stdout
        assert " 403 " in out.splitlines()[0], out
        check = subprocess.run([sys.executable, "-m", "meshlet", "check", "--state-dir",
                                str(tmp_path / "state")], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        rc = up.stop(60)
    assert rc == 0, up.text()
    assert "pods removed" in up.text()
    assert not ours(), ours()


def test_down_cleans_up_after_a_crash(mesh_file: Path, tmp_path: Path, clean: None) -> None:
    up = UpProcess(mesh_file, tmp_path / "state", "--netns", new_session=True)
    try:
        up.wait_line("mesh up;", 90)
    finally:
        os.killpg(up.proc.pid, signal.SIGKILL)  # up and everything it started
        up.proc.wait(10)
    assert ours(), "nothing left behind to clean?"
    r = subprocess.run([sys.executable, "-m", "meshlet", "down", "--netns", "--state-dir",
                        str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "netns mshl-web-0" in r.stdout
    assert not ours(), ours()
