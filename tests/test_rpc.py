"""Boards over TVM RPC, on loopback: a Python server behind a tracker (x86) and tvmq's C++
server running under qemu-aarch64 (an aarch64 board without Python)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import board_runtime_or_skip

from tvmq.cli import main
from tvmq.remote import wait_for_port

pytestmark = pytest.mark.rpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(cmd, host, port):
    # A session of its own: TVM's RPC server forks workers, which a signal to the server alone
    # would leave running after the tests.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(host, port, timeout=60)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tracker_with_board():
    """A TVM RPC tracker and one x86 Python RPC server registered with it as key ``x86``."""
    pytest.importorskip("tornado")  # the tracker needs it
    tport, sport = free_port(), free_port()
    tracker = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
               "--port-end", str(tport + 1)]
    server = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport),
              "--port-end", str(sport + 1), "--tracker", f"127.0.0.1:{tport}", "--key", "x86"]
    with process(tracker, "127.0.0.1", tport), process(server, "127.0.0.1", sport):
        yield f"127.0.0.1:{tport}", f"127.0.0.1:{sport}"


def _input(tmp_path, demo_dir):
    x = np.load(demo_dir / "digits_test.npz")["x"][:1]
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy"


def test_run_through_a_tracker_equals_local_run(tracker_with_board, bundle, tmp_path, demo_dir, capsys):
    tracker, _ = tracker_with_board
    x = _input(tmp_path, demo_dir)
    assert main(["run", str(bundle), "--input", str(x), "--output", str(tmp_path / "local.npz")]) == 0
    assert main(["run", str(bundle), "--input", str(x), "--output", str(tmp_path / "remote.npz"),
                 "--rpc-tracker", tracker, "--rpc-key", "x86", "--repeat", "5"]) == 0
    assert "median of 5 runs on a x86 board" in capsys.readouterr().out
    local, remote = np.load(tmp_path / "local.npz"), np.load(tmp_path / "remote.npz")
    assert local.files == remote.files
    for k in local.files:
        np.testing.assert_array_equal(local[k], remote[k])


def test_tune_measures_on_the_tracker_board(tracker_with_board, tmp_path, demo_dir):
    tracker, _ = tracker_with_board
    db = tmp_path / "db"
    assert main(["tune", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--db", str(db),
                 "--trials", "2", "--max-tasks", "1", "--rpc-tracker", tracker, "--rpc-key", "x86"]) == 0
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines() if line.strip()]
    assert records, "no tuning record came back from the board"
    run_secs = [r[1][1] for r in records]  # [workload index, [trace, run_secs, ...]]
    assert any(secs and min(secs) < 1.0 for secs in run_secs), run_secs


def test_unreachable_board_is_one_error_line(tmp_path, bundle, demo_dir):
    x = _input(tmp_path, demo_dir)
    port = free_port()  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "tvmq", "run", str(bundle), "--input", str(x), "--rpc",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the board at 127.0.0.1:"), r.stderr
    r = subprocess.run([sys.executable, "-m", "tvmq", "run", str(bundle), "--input", str(x), "--rpc", "nohostport"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not HOST:PORT" in r.stderr
    # tuning for a board measures on the board: without a tracker, say so before any work
    assert main(["tune", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--target", "arm",
                 "--db", str(tmp_path / "db")]) == 2
    assert not (tmp_path / "db").exists()


BOARDS = {  # target preset: (cross compiler, runtime arch, qemu, sysroot)
    "arm": ("aarch64-linux-gnu-g++", "aarch64", "qemu-aarch64", "/usr/aarch64-linux-gnu"),
    "arm32": ("arm-linux-gnueabihf-g++", "armv7", "qemu-arm", "/usr/arm-linux-gnueabihf"),
}


@pytest.mark.parametrize("target", sorted(BOARDS))
def test_board_without_python_runs_the_bundle(tmp_path, demo_dir, target):
    """tvmq_rpc_server (C++, TVM runtime only; armv7's runtime built from source) under qemu-user
    runs the bundle sent over RPC, and its int8 output equals the x86 build's (same plan) bit for bit."""
    from tvmq.crossrt import build_rpc_server

    compiler, arch, qemu, sysroot = BOARDS[target]
    if not (shutil.which(compiler) and shutil.which(qemu)):
        pytest.skip(f"needs {compiler} and qemu-user")
    board_runtime_or_skip(arch)
    arm = tmp_path / f"digits-{target}"
    assert main(["compile", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--target", target,
                 "-o", str(arm)]) == 0
    x86 = tmp_path / "digits-x86"  # the same plan (int8 activations, as on ARM) built for this machine
    assert main(["compile", str(demo_dir / "digits.onnx"), "--plan", str(arm / "plan.json"), "-o", str(x86)]) == 0
    server = build_rpc_server(compiler, arch)
    port = free_port()
    cmd = [qemu, "-L", sysroot, "-cpu", "max", str(server), "--host", "127.0.0.1", "--port", str(port),
           "--workdir", str(tmp_path)]
    x = _input(tmp_path, demo_dir)
    with process(cmd, "127.0.0.1", port):
        assert main(["run", str(arm), "--input", str(x), "--output", str(tmp_path / "arm.npz"),
                     "--rpc", f"127.0.0.1:{port}"]) == 0
    assert main(["run", str(x86), "--input", str(x), "--output", str(tmp_path / "x86.npz")]) == 0
    a, b = np.load(tmp_path / "arm.npz"), np.load(tmp_path / "x86.npz")
    for k in b.files:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs g++-aarch64-linux-gnu and qemu-user")
def test_tune_for_arm_measures_on_an_aarch64_board_behind_a_tracker(tmp_path, demo_dir):
    """tvmq_rpc_server under qemu-aarch64 registers with a tracker; MetaSchedule's candidates
    are cross-linked here, uploaded, and timed there (emulated: the times prove the path, not
    the board's speed)."""
    pytest.importorskip("tornado")
    from tvmq.crossrt import build_rpc_server

    tport, sport = free_port(), free_port()
    tracker = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
               "--port-end", str(tport + 1)]
    server = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max",
              str(build_rpc_server("aarch64-linux-gnu-g++", "aarch64")), "--host", "127.0.0.1", "--port", str(sport),
              "--key", "a64", "--tracker", f"127.0.0.1:{tport}", "--workdir", str(tmp_path)]
    db = tmp_path / "db"
    with process(tracker, "127.0.0.1", tport), process(server, "127.0.0.1", sport):
        assert main(["tune", str(demo_dir / "digits.onnx"), "--calib", str(demo_dir / "digits_calib"), "--target", "arm",
                     "--db", str(db), "--trials", "2", "--max-tasks", "1", "--rpc-tracker", f"127.0.0.1:{tport}",
                     "--rpc-key", "a64"]) == 0
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines() if line.strip()]
    assert records and any(r[1][1] and min(r[1][1]) < 1.0 for r in records), records
