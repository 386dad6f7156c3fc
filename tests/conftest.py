"""Shared fixtures. Engines made here log to a temp folder and are shut down after the test."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry


def taskqueue_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskqueue-")]


@pytest.fixture
def registry() -> KindRegistry:
    """A fresh kinds registry, so tests never see each other's kinds."""
    return KindRegistry()


@pytest.fixture
def make_engine(tmp_path, registry) -> Callable[..., Engine]:
    """Factory: ``make_engine(max_workers=2, start=True, **config)`` -> a started Engine.

    Every engine is shut down at teardown, and the test fails if a worker,
    watchdog, writer or log thread outlives it.
    """
    made: list[Engine] = []

    def factory(
        *,
        start: bool = True,
        clock: Any = None,
        wall_clock: Any = None,
        memory_probe: Any = None,
        sidecar_writer: Any = None,
        **config: Any,
    ) -> Engine:
        config.setdefault("log_dir", tmp_path / "logs")
        config.setdefault("console_log", False)
        kwargs: dict[str, Any] = {"registry": registry}
        if clock is not None:
            kwargs["clock"] = clock
        if wall_clock is not None:
            kwargs["wall_clock"] = wall_clock
        if memory_probe is not None:
            kwargs["memory_probe"] = memory_probe
        if sidecar_writer is not None:
            kwargs["sidecar_writer"] = sidecar_writer
        engine = Engine(EngineConfig(**config), **kwargs)
        made.append(engine)
        if start:
            engine.start()
        return engine

    before = set(taskqueue_threads())
    yield factory
    for engine in made:
        engine.shutdown(wait=True, timeout=5.0)
    leaked = [t for t in taskqueue_threads() if t not in before and t.is_alive()]
    assert not leaked, f"threads left behind: {leaked}"
