"""Boards over the network, with TVM's own RPC (``tvm.rpc``): run bundles and tune on them.

* A board runs ``python -m tvm.exec.rpc_server`` (with Python and the TVM wheel) or
  ``tvmq_rpc_server`` (``tvmq.crossrt.build_rpc_server``: C++, only the TVM runtime).
* ``tvmq run OUT --rpc HOST:PORT`` connects directly; ``--rpc-tracker HOST:PORT --rpc-key KEY``
  asks a ``tvm.exec.rpc_tracker`` for a board of that kind, as fleets do.
* ``tvmq tune ... --rpc-tracker HOST:PORT --rpc-key KEY`` measures MetaSchedule's candidates on
  the boards (``RPCRunner``); for cross targets each candidate is linked with the target's
  cross compiler before upload, so the board needs no compiler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvmq.errors import TvmqError

__all__ = ["RemoteTarget", "parse_address", "run_remote", "rpc_runner", "cross_export_initializer"]


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, _, port = (text or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TvmqError(f"{flag} {text!r} is not HOST:PORT (e.g. 192.168.1.20:9190)")
    return host, int(port)


@dataclass(frozen=True)
class RemoteTarget:
    """Where to reach a board: ``rpc`` (a server's HOST:PORT) or ``tracker`` + ``key``."""

    rpc: str | None = None
    tracker: str | None = None
    key: str = ""
    timeout: int = 300

    def __post_init__(self):
        if bool(self.rpc) == bool(self.tracker):
            raise TvmqError("give one of --rpc HOST:PORT (a server) or --rpc-tracker HOST:PORT with --rpc-key KEY")
        if self.tracker and not self.key:
            raise TvmqError("--rpc-tracker needs --rpc-key KEY, the kind of board to ask the tracker for")
        parse_address(self.rpc or self.tracker, "--rpc" if self.rpc else "--rpc-tracker")

    def connect(self):
        from tvm import rpc

        try:
            if self.rpc:
                host, port = parse_address(self.rpc, "--rpc")
                return rpc.connect(host, port, self.key, session_timeout=self.timeout)
            host, port = parse_address(self.tracker, "--rpc-tracker")
            return rpc.connect_tracker(host, port).request(self.key, session_timeout=self.timeout)
        except Exception as err:  # socket errors and TVM's RPC errors alike
            where = self.rpc or f"tracker {self.tracker} (key {self.key!r})"
            raise TvmqError(f"cannot reach the board at {where}: {str(err).splitlines()[0][:200]}; "
                            "start its RPC server (python -m tvm.exec.rpc_server or tvmq_rpc_server)") from None


def run_remote(bundle_dir, inputs: dict, remote: RemoteTarget, repeat: int = 0) -> tuple[dict, float | None]:
    """Run a bundle on a board: upload its library, load it there, run ``main`` on ``inputs``.

    Checksums are verified here before anything is sent. Returns ``(outputs, median ms)``, the
    latency measured on the board when ``repeat`` > 0.
    """
    import tvm
    from tvm import relax

    from tvmq.runtime import Bundle, BundleError

    try:
        bundle = Bundle(bundle_dir)
        arrays = bundle.check_inputs(inputs)
    except BundleError as err:
        raise TvmqError(str(err)) from None
    session = remote.connect()
    lib = bundle.library
    session.upload(str(lib))
    try:
        rmod = session.load_module(lib.name)
    except Exception as err:  # wrong ISA for this board, missing runtime symbols, ...
        raise TvmqError(f"the board cannot load {lib.name} ({str(err).splitlines()[0][:200]}); it was built for "
                        f"{bundle.manifest.get('target', {}).get('triple', 'another target')}") from None
    device = session.cuda(0) if bundle.manifest.get("target", {}).get("device") == "cuda" else session.cpu(0)
    vm = relax.VirtualMachine(rmod, device)
    args = [tvm.runtime.tensor(a, device) for a in arrays]
    result = vm["main"](*args)
    values = result if isinstance(result, (list, tuple, tvm.ir.Array)) else [result]
    outputs = {spec["name"]: np.asarray(v.numpy()) for spec, v in zip(bundle.outputs, values)}
    latency = None
    if repeat > 0:
        timer = vm.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=0)
        latency = float(np.median(timer(*args).results)) * 1e3
    return outputs, latency


# ----------------------------------------------------------------------------- tuning
def rpc_runner(remote: RemoteTarget):
    """A MetaSchedule runner measuring on the tracker's boards of ``remote.key``."""
    from tvmq._compat import meta_schedule

    ms = meta_schedule()
    if not remote.tracker:
        raise TvmqError("tuning on boards goes through a tracker: pass --rpc-tracker HOST:PORT --rpc-key KEY")
    host, port = parse_address(remote.tracker, "--rpc-tracker")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=remote.key,
                                 session_timeout_sec=remote.timeout)
    evaluator = ms.runner.EvaluatorConfig(number=10, repeat=3, min_repeat_ms=0, enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1,
                               f_alloc_argument=alloc_from_host)


def alloc_from_host(session, device, args_info, alloc_repeat):
    """MetaSchedule argument allocation that fills tensors with data sent from here.

    The default asks the board for ``tvm.contrib.random.random_fill_for_measure``, which only a
    full TVM build has; a board with just the runtime (tvmq_rpc_server) lacks it.
    """
    import tvm

    from tvmq.kernels import random_argument

    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for kind, dtype, shape in args_info:
            if kind != "TENSOR":
                raise NotImplementedError(f"cannot allocate a {kind} argument")
            data = random_argument(rng, shape, dtype)
            tensor = tvm.runtime.empty(shape, dtype, device)
            tensor.copyfrom(data)
            args.append(tensor)
        repeated.append(args)
    return repeated


EXPORT_FUNC = "tvmq.export_cross"


def cross_export_initializer(compiler: str):
    """A builder-worker initializer registering ``tvmq.export_cross``: link with ``compiler``."""
    import functools

    return functools.partial(_register_cross_export, compiler)


def _register_cross_export(compiler: str) -> None:
    import tempfile

    import tvm_ffi

    from tvmq.targets import intrinsics

    intrinsics.register()  # traces name tvmq's intrinsics

    @tvm_ffi.register_global_func(EXPORT_FUNC, override=True)
    def _export(mod) -> str:
        from tvm.support import cc

        path = str(Path(tempfile.mkdtemp(prefix="tvmq-ms-")) / "candidate.so")
        mod.export_library(path, fcompile=cc.cross_compiler(compiler))
        return path


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something listens on ``host:port`` (servers started by scripts and tests)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TvmqError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
