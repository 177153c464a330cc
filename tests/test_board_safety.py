"""What a board runs is safe to expose: the C++ runner never hangs or lies on a bad .npy, checks
the library against the manifest before loading it, and tvmq_rpc_server keeps clients inside
its work folder and off the network unless told otherwise."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time

import numpy as np
import pytest

from tvmq.cli import main


def _runner():
    from tvmq.crossrt import build_runner

    return build_runner("g++", "x86_64")


def _npy(header: str, data: bytes = b"", version: int = 1, header_len: int | None = None) -> bytes:
    """A .npy file with ``header`` as its dict text, as numpy writes it (or with a forged length)."""
    text = header.encode("latin-1")
    n = len(text) if header_len is None else header_len
    prefix = b"\x93NUMPY" + bytes([version, 0]) + (n.to_bytes(2, "little") if version == 1 else n.to_bytes(4, "little"))
    return prefix + text + data


GOOD = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8), }"
DATA = np.zeros((1, 1, 8, 8), np.float32).tobytes()

# (file name, content, words the one error line must contain)
HAND_MADE = [
    ("huge_header.npy", _npy(GOOD, DATA, version=2, header_len=0xFFFFFFF0), ["header length", "over the limit"]),
    ("big_endian.npy", _npy(GOOD.replace("<f4", ">f4"), DATA), ["big-endian"]),
    ("negative.npy", _npy(GOOD.replace("(1, 1, 8, 8)", "(1, 1, -8, 8)"), DATA), ["shape (1, 1, -8, ...) has a negative dimension"]),
    ("bad_dim.npy", _npy(GOOD.replace("(1, 1, 8, 8)", "(1, 1, x, 8)"), DATA), ["tuple of integers"]),
    ("overflow.npy", _npy(GOOD.replace("(1, 1, 8, 8)", "(99999999999, 99999999999, 99999999999)"), DATA), ["overflows"]),
    ("truncated.npy", _npy(GOOD, DATA[:100]), ["truncated"]),
    ("trailing.npy", _npy(GOOD, DATA + b"xx"), ["trailing bytes"]),
    ("not_npy.npy", b"PK\x03\x04 this is a zip", ["not a .npy file"]),
    ("empty.npy", b"", ["too short"]),
    ("version.npy", _npy(GOOD, DATA, version=9), ["format version 9"]),
    ("fortran.npy", _npy(GOOD.replace("False", "True"), DATA), ["Fortran"]),
    ("no_shape.npy", _npy("{'descr': '<f4', 'fortran_order': False, }", DATA), ["needs 'descr', 'fortran_order' and 'shape'"]),
    ("object.npy", _npy(GOOD.replace("<f4", "|O"), DATA), ["unsupported dtype"]),
    ("wrong_shape.npy", _npy(GOOD.replace("(1, 1, 8, 8)", "(1, 1, 4, 16)"), DATA), ["shape (1, 1, 4, 16)", "input 'input' is (1, 1, 8, 8)"]),
    ("wrong_dtype.npy", _npy(GOOD.replace("<f4", "<i4"), DATA), ["dtype int32", "is float32"]),
]


def test_the_runner_answers_every_hand_made_bad_input_with_one_error_line(bundle, tmp_path):
    runner = _runner()
    for name, content, words in HAND_MADE:
        path = tmp_path / name
        path.write_bytes(content)
        out = subprocess.run([str(runner), str(bundle / "model.so"), str(path), "-o", str(tmp_path / "out_")],
                             capture_output=True, text=True, timeout=20)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), (name, out.stderr)
        assert all(w in lines[0] for w in words), (name, lines[0])
        assert not list(tmp_path.glob("out_*")), name  # nothing computed, nothing written
    # and a good one runs
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    ok = subprocess.run([str(runner), str(bundle / "model.so"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "out_")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "out_0.npy").shape == (1, 10)


def test_the_runner_checks_the_library_against_the_manifest(bundle, tmp_path):
    runner = _runner()
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")  # still a loadable library, no longer the one the manifest names
    run = lambda *extra: subprocess.run([str(runner), str(copy / "model.so"), str(tmp_path / "x.npy"),  # noqa: E731
                                         "-o", str(tmp_path / "o_"), *extra], capture_output=True, text=True, timeout=60)
    bad = run()
    assert bad.returncode == 2 and "does not match its sha256" in bad.stderr and "--no-verify" in bad.stderr
    assert run("--no-verify").returncode == 0  # the development opt-out
    (copy / "manifest.json").unlink()
    missing = run()
    assert missing.returncode == 2 and "no manifest.json beside" in missing.stderr


def _mutations(rng, seeds: list[bytes]):
    """Malformed .npy files: truncations, bit flips, byte overwrites, random and forged headers, extreme dims."""
    for i in range(1200):
        base = bytearray(seeds[i % len(seeds)])
        kind = i % 6
        if kind == 0:
            yield bytes(base[: rng.integers(0, len(base))])
        elif kind == 1:
            for _ in range(rng.integers(1, 8)):
                pos = rng.integers(0, len(base))
                base[pos] ^= 1 << rng.integers(0, 8)
            yield bytes(base)
        elif kind == 2:
            pos = rng.integers(6, min(len(base), 80))
            base[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
            yield bytes(base)
        elif kind == 3:
            header = bytes(rng.integers(0, 256, rng.integers(0, 120), dtype=np.uint8))
            yield b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(base[-32:])
        elif kind == 4:
            dims = ", ".join(str(int(d)) for d in rng.choice([0, 1, 7, -1, 2**31, 2**62, 2**63 - 1, 10**30], rng.integers(0, 6)))
            descr = rng.choice(["<f4", "|u1", "<i8", ">f8", "<c8", "|b1", "<f16", "<U3", ""])
            yield _npy(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims},), }}", bytes(base[-64:]))
        else:
            version = int(rng.integers(1, 4))
            yield _npy(GOOD, DATA, version=version, header_len=int(rng.integers(0, 2**16 if version == 1 else 2**32)))


def test_fuzzed_npy_files_give_no_sanitizer_report_no_hang_and_one_line_each(tmp_path):
    """The runner's .npy reader, built alone with AddressSanitizer and UBSan (-DTVMQ_NPY_CHECK),
    on 1200 malformed files: every file is "ok" (and then numpy reads the same dtype and shape) or
    one "error:" line; no sanitizer report, no hang."""
    from tvmq.crossrt import RUNNER_SOURCE

    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    checker = tmp_path / "npy_check"
    subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-DTVMQ_NPY_CHECK", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", str(RUNNER_SOURCE), "-o", str(checker)], check=True, timeout=300)
    rng = np.random.default_rng(0)
    seeds = []
    for i, a in enumerate([np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((2, 3, 5), np.uint8),
                           np.zeros((1, 1, 8, 8), np.int64), np.array(3.5, np.float16)]):
        np.save(tmp_path / f"seed{i}.npy", a)
        seeds.append((tmp_path / f"seed{i}.npy").read_bytes())
    cases = tmp_path / "cases"
    cases.mkdir()
    files = []
    for i, content in enumerate(_mutations(rng, seeds)):
        files.append(cases / f"{i:04d}.npy")
        files[-1].write_bytes(content)
    counts = {"ok": 0, "error": 0}
    # Leak checking needs ptrace-like access some sandboxes deny; memory errors and UB are the point here.
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    for start in range(0, len(files), 100):
        batch = files[start : start + 100]
        out = subprocess.run([str(checker), *map(str, batch)], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]  # a sanitizer report fails the run
        lines = out.stdout.splitlines()
        assert len(lines) == len(batch)
        for path, line in zip(batch, lines):
            m = re.match(r"ok (\w+) \((.*)\)$", line)
            if m:
                counts["ok"] += 1
                a = np.load(path, allow_pickle=False)  # what the reader accepted, numpy reads alike
                assert str(a.dtype) == m.group(1) and ", ".join(map(str, a.shape)).rstrip(",") == m.group(2).rstrip(",")
            else:
                counts["error"] += 1
                assert line.startswith(f"error: {path}: "), line
    assert counts["error"] > 1000 and sum(counts.values()) == 1200, counts


# ------------------------------------------------------------------ tvmq_rpc_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(*args):
    from tvmq.crossrt import build_rpc_server

    port = _free_port()
    proc = subprocess.Popen([str(build_rpc_server("g++", "x86_64")), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on ([\d.]+):(\d+) .*work folder (\S+)\)", line)
    assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, port, m.group(1), m.group(3)


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


def test_rpc_server_listens_on_loopback_and_keeps_paths_in_its_work_folder(tmp_path):
    from tvm import rpc

    proc, port, host, workdir = _start_server()
    try:
        assert host == "127.0.0.1"  # the default: reach it from elsewhere through an SSH tunnel
        assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
        outside = os.path.dirname(workdir)
        session = rpc.connect("127.0.0.1", port)
        blob = tmp_path / "f.txt"
        blob.write_bytes(b"hello")
        session.upload(str(blob), target="inside.txt")  # what clients are for
        assert session.download("inside.txt") == b"hello"
        for target in ("../rpc_pwned.txt", "a/../../rpc_pwned.txt", "/tmp/rpc_pwned.txt"):
            with pytest.raises(Exception, match="refused"):
                session.upload(str(blob), target=target)
        assert not os.path.exists(os.path.join(outside, "rpc_pwned.txt")) and not os.path.exists("/tmp/rpc_pwned.txt")
        os.symlink(tmp_path, os.path.join(workdir, "link"))  # a link already there leads nowhere
        with pytest.raises(Exception, match="symbolic link"):
            session.upload(str(blob), target="link/f2.txt")
        with pytest.raises(Exception, match="symbolic link"):
            session.download("link/f.txt")
        with pytest.raises(Exception, match="refused"):
            session.load_module("../x.so")
        with pytest.raises(Exception, match="refused"):
            session.remove("/etc/hostname")
        assert not (tmp_path / "f2.txt").exists()
    finally:
        _stop(proc)
    assert not os.path.exists(workdir)  # removed on exit


def test_rpc_server_refuses_peers_outside_allow_and_warns_off_loopback():
    from tvm import rpc

    proc, port, _, _ = _start_server("--allow", "10.0.0.0/8")
    try:
        with pytest.raises(Exception):  # noqa: B017 (TVM raises whatever its socket layer raises)
            rpc.connect("127.0.0.1", port, session_timeout=5)
        time.sleep(0.2)
    finally:
        _stop(proc)
    assert "refused a connection from 127.0.0.1 (not in --allow)" in proc.stderr.read()

    proc, port, _, _ = _start_server("--host", "0.0.0.0", "--allow", "127.0.0.1/32")
    try:
        rpc.connect("127.0.0.1", port).upload(__file__, target="ok.py")  # an allowed peer gets in
    finally:
        _stop(proc)
    err = proc.stderr.read()
    assert "anyone who can reach this port can upload and run code as user" in err and "--allow networks only" in err
    bad = subprocess.run([str(_server_binary()), "--allow", "10.0.0.0/33"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --allow 10.0.0.0/33")


def _server_binary():
    from tvmq.crossrt import build_rpc_server

    return build_rpc_server("g++", "x86_64")


def test_runtime_folder_runner_rejects_bad_input_too(tmp_path, bundle):
    """The programs `tvmq runtime` puts in a board folder are these same, hardened builds."""
    board = tmp_path / "board"
    assert main(["runtime", "--target", "x86", "-o", str(board)]) == 0
    (tmp_path / "x.npy").write_bytes(HAND_MADE[0][1])
    out = subprocess.run([str(board / "tvmq_run"), str(bundle / "model.so"), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "over the limit" in out.stderr


def test_python_runner_answers_the_same_files_with_one_error_line_or_the_right_numbers(bundle, tmp_path, capsys):
    """`tvmq run` (and run.py, the same code): a big-endian or Fortran-ordered array is converted, not
    misread (numpy reads both right); every other hand-made file is one error line, exit code 2."""
    good = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    assert main(["run", str(bundle), "--input", str(tmp_path / "good.npy"), "--output", str(tmp_path / "good.npz")]) == 0
    (tmp_path / "be.npy").write_bytes(_npy(GOOD.replace("<f4", ">f4"), good.astype(">f4").tobytes()))
    assert main(["run", str(bundle), "--input", str(tmp_path / "be.npy"), "--output", str(tmp_path / "be.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "be.npz")["logits"], np.load(tmp_path / "good.npz")["logits"])
    capsys.readouterr()
    fortran = good[0, 0].T.copy()  # stored transposed, so in Fortran order it reads back as `good`
    (tmp_path / "f.npy").write_bytes(_npy(GOOD.replace("False", "True"), fortran.tobytes()))
    assert main(["run", str(bundle), "--input", str(tmp_path / "f.npy"), "--output", str(tmp_path / "f.npz")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "f.npz")["logits"], np.load(tmp_path / "good.npz")["logits"])
    capsys.readouterr()
    for name, content, _ in HAND_MADE:
        if name in ("big_endian.npy", "fortran.npy"):
            continue
        (tmp_path / name).write_bytes(content)
        assert main(["run", str(bundle), "--input", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (name, err)
