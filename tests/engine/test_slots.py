"""Per-resource concurrency (``KindSpec.slots``): a studio's GPU servers each run at
most ``slot_limit`` jobs, jobs spread across them, and the job learns its server
(``ctx.slot``); and per-params online checks (``KindSpec.needs_network``)."""

from __future__ import annotations

import threading

import pytest

from blender_taskqueue.engine import KindSpec, NotPermitted

WAIT = 10.0


def test_jobs_spread_over_slots_and_each_slot_runs_one(make_engine, registry):
    gate = threading.Event()
    lock = threading.Lock()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    seen = []
    started = threading.Semaphore(0)

    def handler(ctx, params):
        with lock:
            running[ctx.slot] = running.get(ctx.slot, 0) + 1
            peak[ctx.slot] = max(peak.get(ctx.slot, 0), running[ctx.slot])
            seen.append(ctx.slot)
        started.release()
        gate.wait(WAIT)
        with lock:
            running[ctx.slot] -= 1
        return {"slot": ctx.slot}

    registry.register(KindSpec(name="t.gpu", handler=handler,
                               slots=lambda params: params["servers"], slot_limit=1))
    registry.register(KindSpec(name="t.other", handler=lambda c, p: {"ok": True}))
    engine = make_engine(max_workers=4)
    servers = ["http://a:8188", "http://b:8188"]
    ids = [engine.submit("t.gpu", {"servers": servers}) for _ in range(5)]
    for _ in range(2):
        assert started.acquire(timeout=WAIT)
    assert sorted(seen) == servers, "the first two jobs take one server each"
    assert engine.get(ids[2]).state.value == "queued", "a third job waits for a free server"
    other = engine.submit("t.other")  # another kind is not held up by the full servers
    assert engine.wait([other], timeout=WAIT)
    gate.set()
    assert engine.wait(ids, timeout=WAIT)
    assert peak == {s: 1 for s in servers}
    assert {engine.get(i).result["slot"] for i in ids} <= set(servers)


def test_a_kind_can_say_per_job_whether_it_goes_online(make_engine, registry):
    registry.register(KindSpec(
        name="t.http", handler=lambda c, p: {}, network=True,
        needs_network=lambda params: not params["url"].startswith("http://127.0.0.1"),
    ))
    engine = make_engine()
    engine.submit_check = lambda spec, params: "offline" if spec.goes_online(params) else None
    engine.submit("t.http", {"url": "http://127.0.0.1:8188"})
    with pytest.raises(NotPermitted, match="offline"):
        engine.submit("t.http", {"url": "https://gpu.example:8188"})
