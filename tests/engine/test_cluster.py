"""Scale-out: remote_ok kinds on a dask.distributed cluster, on loopback.

A ``LocalCluster(processes=True, n_workers=2, host="127.0.0.1")`` for most tests
and a ``dask scheduler`` + ``dask worker`` started as separate processes for one:
progress relayed back, cancel of a running remote job, a worker killed mid-job
(no silent retry: the job ends interrupted), the client killed and re-attached
(the job runs once), results and errors. Skipped when dask is not installed
(``pip install blender-taskqueue[dask]``; the test extra has it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from blender_taskqueue.engine import JobState  # noqa: E402

from support import wait_until  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import cluster_kinds  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def runs(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split() for line in log.read_text().splitlines() if line.startswith("start")]


@pytest.fixture(scope="module")
def cluster():
    import dask

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.worker.daemon": False}):
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=None)
    yield lc
    lc.close()


@pytest.fixture
def engine(make_engine, registry, cluster, tmp_path):
    for spec in cluster_kinds.SPECS:
        registry.register(spec)
    return make_engine(max_workers=2, state_dir=tmp_path / "state", cluster=cluster.scheduler_address,
                       cluster_modules=("cluster_kinds",))


def finish(engine, job_id, timeout=60.0):
    assert engine.wait([job_id], timeout=timeout), f"job {job_id} did not finish"
    return engine.get(job_id)


def test_a_remote_job_runs_on_a_worker_with_progress_and_checkpoints(engine, tmp_path):
    log = tmp_path / "log"
    job_id = engine.submit("cl.steps", {"n": 20, "delay": 0.05, "log": str(log)})
    seen = []
    wait_until(lambda: seen.append(engine.get(job_id).progress) or 0 < seen[-1] < 1,
               timeout=60, what="remote progress")
    info = finish(engine, job_id)
    assert info.state is JobState.COMPLETED, info.error
    assert info.result["steps"] == 20 and info.result["pid"] != os.getpid()
    assert info.progress == 1.0 and info.stage == "step 20/20"
    assert info.partial_result["done"] == 20
    local = finish(engine, engine.submit("cl.local"))
    assert local.result == os.getpid()  # not remote_ok: stays on this machine


def test_a_remote_error_fails_the_job_with_its_message(engine):
    info = finish(engine, engine.submit("cl.fails", {"what": "x"}))
    assert info.state is JobState.FAILED
    assert info.error.type == "ValueError" and info.error.message == "bad input 'x'"


def test_a_remote_pipeline_step_gets_the_results_it_depends_on(engine, tmp_path):
    log = tmp_path / "log"
    first, local, last = engine.submit_many([
        {"kind": "cl.steps", "name": "a", "params": {"n": 2, "delay": 0.01, "log": str(log)}},
        {"kind": "cl.local", "name": "b"},
        {"kind": "cl.gather", "depends_on": ["@a", "@b"]},
    ])
    info = finish(engine, last)
    assert info.state is JobState.COMPLETED, info.error
    a, b = engine.get(first), engine.get(local)
    assert info.result["inputs"] == {first: a.result, local: b.result}
    assert info.result["pid"] != os.getpid()  # it ran on a worker


def test_cancel_stops_a_running_remote_job(engine, tmp_path):
    log = tmp_path / "log"
    job_id = engine.submit("cl.forever", {"log": str(log)})
    wait_until(lambda: runs(log), timeout=60, what="the remote job running")
    t0 = time.monotonic()
    assert engine.cancel(job_id)
    info = finish(engine, job_id, timeout=30)
    assert info.state is JobState.CANCELLED
    assert time.monotonic() - t0 < 10  # cooperative, not the grace-period future.cancel()


def test_cancel_of_a_remote_process_run_kills_its_tree_on_the_worker(engine, tmp_path):
    import psutil

    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
              "print('up', flush=True)\ntime.sleep(120)\n")
    job_id = engine.submit("cl.process", {"argv": [sys.executable, "-c", script]})
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=60,
               what="the remote process tree up")
    tree = [int(p) for p in pids.read_text().split()]
    engine.cancel(job_id)
    assert finish(engine, job_id, timeout=30).state is JobState.CANCELLED

    def gone() -> bool:
        return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                   for p in tree)
    wait_until(gone, timeout=20, what="the remote process and its child stopped")


def test_a_killed_worker_ends_the_job_interrupted_and_never_reruns_it(engine, tmp_path):
    log = tmp_path / "log"
    job_id = engine.submit("cl.forever", {"log": str(log)})
    wait_until(lambda: runs(log), timeout=60, what="the remote job running")
    pid = int(runs(log)[0][2])
    os.kill(pid, signal.SIGKILL)
    info = finish(engine, job_id, timeout=60)
    assert info.state is JobState.INTERRUPTED, (info.state, info.message, info.error)
    assert len(runs(log)) == 1


def test_a_killed_client_re_attaches_and_the_job_runs_once(cluster, tmp_path):
    log = tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    args = [sys.executable, str(HERE / "cluster_child.py"), "--state-dir", str(tmp_path / "s"),
            "--cluster", cluster.scheduler_address]
    first = subprocess.Popen([*args, "--submit", str(log)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = first.stdout.readline()
        assert line.startswith("REMOTE"), line
        first.send_signal(signal.SIGKILL)  # Blender crashes; the cluster keeps the future
        first.wait(10)
    finally:
        first.stdout.close()
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=90)
    done = [x for x in second.stdout.splitlines() if x.startswith("DONE")]
    assert done and done[0].split()[1] == "completed", second.stdout + second.stderr
    assert len(runs(log)) == 1, runs(log)
    assert json.loads(done[0].split(" ", 2)[2])["steps"] == 40


def test_separate_dask_scheduler_and_worker_processes(make_engine, registry, tmp_path):
    dask_cli = shutil.which("dask", path=os.path.dirname(sys.executable))
    if dask_cli is None:
        pytest.skip("the dask command is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--nthreads", "1", "--no-dashboard"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for spec in cluster_kinds.SPECS:
            registry.register(spec)
        engine = make_engine(max_workers=2, cluster=address, cluster_modules=("cluster_kinds",))
        log = tmp_path / "log"
        info = finish(engine, engine.submit("cl.steps", {"n": 5, "log": str(log)}), timeout=90)
        assert info.state is JobState.COMPLETED, info.error
        assert info.result["pid"] in [p.pid for p in procs] or info.result["pid"] != os.getpid()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_an_unreachable_cluster_is_said_and_falls_back_only_if_asked(make_engine, registry, tmp_path):
    for spec in cluster_kinds.SPECS:
        registry.register(spec)
    engine = make_engine(max_workers=1, cluster="tcp://127.0.0.1:9", cluster_modules=("cluster_kinds",))
    info = finish(engine, engine.submit("cl.steps", {"n": 1, "log": str(tmp_path / "a")}), timeout=60)
    assert info.state is JobState.FAILED and "unreachable" in info.error.message
    assert "unreachable" in (engine.stats().cluster_error or "")
    engine.configure(cluster_fallback_local=True)
    info = finish(engine, engine.submit("cl.steps", {"n": 1, "log": str(tmp_path / "b")}), timeout=60)
    assert info.state is JobState.COMPLETED and info.result["pid"] == os.getpid()


def _certificates(folder: Path) -> tuple[str, str, str]:
    """A CA and one certificate for 127.0.0.1 signed by it (openssl), as files."""
    ca_key, ca, key, csr, cert = (str(folder / n) for n in ("ca.key", "ca.pem", "tq.key", "tq.csr", "tq.pem"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=taskqueue-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "1", "-extfile", str(ext))
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
def test_a_tls_cluster_with_the_configured_certificates(make_engine, registry, tmp_path):
    from distributed.security import Security

    ca, cert, key = _certificates(tmp_path)
    sec = Security(tls_ca_file=ca, tls_scheduler_cert=cert, tls_scheduler_key=key,
                   tls_worker_cert=cert, tls_worker_key=key, tls_client_cert=cert, tls_client_key=key,
                   require_encryption=True)
    lc = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  protocol="tls", security=sec, dashboard_address=None)
    try:
        assert lc.scheduler_address.startswith("tls://")
        for spec in cluster_kinds.SPECS:
            registry.register(spec)
        log = tmp_path / "log"
        plain = make_engine(max_workers=1, cluster=lc.scheduler_address, cluster_modules=("cluster_kinds",))
        refused = finish(plain, plain.submit("cl.steps", {"n": 1, "log": str(log)}), timeout=60)
        assert refused.state is JobState.FAILED  # no certificates: the cluster does not let it in
        secure = make_engine(max_workers=1, cluster=lc.scheduler_address, cluster_modules=("cluster_kinds",),
                             cluster_tls_ca_file=ca, cluster_tls_cert=cert, cluster_tls_key=key)
        info = finish(secure, secure.submit("cl.steps", {"n": 2, "log": str(log)}), timeout=60)
        assert info.state is JobState.COMPLETED, info.error
    finally:
        lc.close()
