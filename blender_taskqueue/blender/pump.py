"""The main-thread pump: one persistent ``bpy.app.timers`` function.

Each tick drains the engine's events into a plain-Python mirror the panel
draws from, re-reads the order only when the engine says it changed, runs
queued main-thread calls (``ctx.call_on_main``, completion callbacks) within a
time budget, reports finished jobs in the status bar, and tags a redraw of the
3D view's sidebar regions only when something changed. 10 Hz while anything is
active, 2 Hz when idle. Worker threads never touch bpy: they only fill the
engine's queues, which this drains.
"""

from __future__ import annotations

import collections
import time
import traceback
from typing import Any, Optional

import bpy

from ..engine import Engine, EngineStats, JobInfo, JobState
from ..engine.events import RESYNC
from ..engine.models import Recovery

CATEGORY = "Task Queue"  # the sidebar tab of the panels
ACTIVE_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 0.5
MAIN_CALL_BUDGET_S = 0.008  # of a 100 ms tick: Blender keeps 92% of the main thread
MAX_ROWS = 2000  # the list shows the first rows in display order; the header counts all
STATS_EVERY_S = 0.5
NOTIFY_EVERY_S = 1.0  # at most one status-bar report a second, however many jobs end


def _shown(stats: Optional[EngineStats]) -> Optional[tuple]:
    """The stats as the panel shows them (memory to 0.1 GB), to skip needless redraws."""
    if stats is None:
        return None
    return stats._replace(
        process_memory_mb=0.0,
        available_memory_mb=round(stats.available_memory_mb / 102.4),
        throughput_per_min=0.0,
    )


class Mirror:
    """What the panel draws, refreshed by the pump on the main thread only."""

    def __init__(self) -> None:
        self.infos: dict[str, JobInfo] = {}
        self.order: list[str] = []
        self.stats: Optional[EngineStats] = None
        # Finished jobs the engine still lists, by state: the header counts what the list
        # holds (the engine's stats count the whole session, cleared jobs too).
        self.finished: collections.Counter[JobState] = collections.Counter()
        self.notices: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=20)
        self.recovery: Optional[Recovery] = None  # shown until dismissed
        self.selected_id: str = ""
        self.version = 0

    def info(self, job_id: str) -> Optional[JobInfo]:
        return self.infos.get(job_id)

    def selected(self) -> Optional[JobInfo]:
        return self.infos.get(self.selected_id)


def shows_panel(space: Any, region: Any) -> bool:
    """Whether a 3D view's sidebar ``region`` may be showing the Task Queue tab: not
    when the sidebar is hidden, nor when it shows another tab (Blender 4.1+ says
    which; older ones redraw whatever tab is open). A sidebar redraw is a full
    region draw, so a hidden panel must not cost one."""
    if not getattr(space, "show_region_ui", True):
        return False
    category = getattr(region, "active_panel_category", None)
    return not isinstance(category, str) or category in ("", "UNSUPPORTED", CATEGORY)


class Pump:
    """Owns the mirror and the timer for one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.mirror = Mirror()
        self.online_access = True
        self._order_version = -1
        self._stats_at = 0.0
        self._shadow: list[str] = []  # job ids in the WindowManager rows, as last written
        self._index_seen = -1  # the list's active index as the pump last left it
        # One callable for register/is_registered/unregister: timers match the exact
        # object, and every `self._timer` access makes a new bound method.
        self._timer_fn = self._timer
        self._since = time.time()  # jobs that finished before this pump began are history
        self._unreported: list[tuple[str, str]] = []  # (level, message) for the status bar
        self._notified_at = 0.0
        # A change of progress alone redraws at most this often; anything else at once.
        self.progress_interval_s = ACTIVE_INTERVAL_S
        self._redrawn_at = 0.0
        self._redraw_due = False
        self.redraws = 0
        self.ticks = 0
        self.tick_times: collections.deque[float] = collections.deque(maxlen=2000)
        # CPU time of the tick itself; wall time also holds waits for the GIL.
        self.tick_cpu: collections.deque[float] = collections.deque(maxlen=2000)

    # ---- the timer

    def start(self) -> None:
        if not bpy.app.timers.is_registered(self._timer_fn):
            bpy.app.timers.register(self._timer_fn, first_interval=ACTIVE_INTERVAL_S, persistent=True)
        if self.engine.recovery is not None:
            self.mirror.recovery = self.engine.recovery

    def stop(self) -> None:
        if bpy.app.timers.is_registered(self._timer_fn):
            bpy.app.timers.unregister(self._timer_fn)

    def _timer(self) -> Optional[float]:
        try:
            return self.tick()
        except Exception:  # a timer that raises is dropped by Blender: never let it
            traceback.print_exc()
            return IDLE_INTERVAL_S

    def tick(self) -> float:
        """One pump tick; returns the delay until the next one."""
        started = time.perf_counter()
        cpu_started = time.thread_time()
        engine = self.engine
        mirror = self.mirror
        self.online_access = bool(getattr(bpy.app, "online_access", True))
        changed = False
        urgent = False  # more than progress changed: show it now, not at the progress rate
        finished: list[JobInfo] = []
        resync = False
        for event in engine.drain_events():
            if event.info is not None:
                previous = mirror.infos.get(event.info.id)
                mirror.infos[event.info.id] = event.info
                changed = True
                if event.type != "progress":
                    urgent = True
                if (
                    event.type == "state"
                    and event.info.state.is_terminal
                    and (previous is None or not previous.state.is_terminal)
                    and (event.info.finished_at or 0.0) >= self._since
                ):
                    finished.append(event.info)
            if event.type == "notice":
                if event.level == RESYNC:
                    resync = True
                elif event.message and event.level != "info":  # pause/resume show in the counts
                    mirror.notices.append((time.time(), event.level, event.message))
                    changed = urgent = True
        if resync or engine.order_version != self._order_version:
            self._order_version = engine.order_version
            infos = engine.jobs()
            mirror.infos = {i.id: i for i in infos}
            mirror.order = [i.id for i in infos[:MAX_ROWS]]
            changed = urgent = True
        if urgent:  # progress alone never finishes a job
            mirror.finished = collections.Counter(
                i.state for i in mirror.infos.values() if i.state.is_terminal)
        engine.run_main_calls(MAIN_CALL_BUDGET_S)
        now = time.monotonic()
        if changed or now - self._stats_at >= STATS_EVERY_S or mirror.stats is None:
            stats = engine.stats()
            self._stats_at = now
            if _shown(stats) != _shown(mirror.stats):  # redraw only for what the panel shows
                changed = True
            mirror.stats = stats
        if changed:
            mirror.version += 1
            self._sync_rows()
            self._redraw_due = True
        # Every sidebar redraw costs Blender a full draw of the region (40-50 ms with
        # software OpenGL), so progress alone redraws at the preference's rate.
        if self._redraw_due and (urgent or now - self._redrawn_at >= self.progress_interval_s - 0.01):
            self._redraw_due = False
            self._redrawn_at = now
            self.redraws += 1
            self._tag_redraw()
        if finished:
            self._notify(finished, now)
        if self._unreported and now - self._notified_at >= NOTIFY_EVERY_S:
            self._report(now)
        self.ticks += 1
        self.tick_times.append(time.perf_counter() - started)
        self.tick_cpu.append(time.thread_time() - cpu_started)
        stats = mirror.stats
        busy = stats is not None and (stats.running or (stats.queued - stats.held and not stats.paused))
        active = busy or engine.pending_main_calls or self._redraw_due
        return ACTIVE_INTERVAL_S if active else IDLE_INTERVAL_S

    # ---- the WindowManager rows

    def _sync_rows(self) -> None:
        wm = bpy.context.window_manager
        if wm is None:
            return
        state = wm.taskqueue  # type: ignore[attr-defined]
        rows = state.jobs
        order = self.mirror.order
        mirror = self.mirror
        shadow = self._shadow
        if len(rows) != len(shadow):  # the rows were reset (a file was loaded): rewrite all
            rows.clear()
            shadow.clear()
        # Keep the selection on the same job when the order changes; a click (the
        # index moved since the pump last set it) selects the clicked row's job.
        index = state.active_index
        if index != self._index_seen and 0 <= index < len(shadow):
            mirror.selected_id = shadow[index]
        while len(rows) > len(order):
            rows.remove(len(rows) - 1)
            shadow.pop()
        while len(rows) < len(order):
            rows.add()
            shadow.append("")
        for i, job_id in enumerate(order):
            if shadow[i] != job_id:
                row = rows[i]
                row.job_id = job_id
                info = mirror.infos.get(job_id)
                row.name = info.label if info else job_id
                shadow[i] = job_id
        if mirror.selected_id:
            try:
                wanted = order.index(mirror.selected_id)
            except ValueError:
                wanted = -1
            if wanted != state.active_index:
                state.active_index = wanted
        self._index_seen = state.active_index

    def select(self, job_id: str) -> None:
        """Select ``job_id`` in the list at the next sync (e.g. the job a retry made).
        A click on a row made before this call is taken as seen."""
        self.mirror.selected_id = job_id
        wm = bpy.context.window_manager
        if wm is not None and hasattr(wm, "taskqueue"):
            self._index_seen = wm.taskqueue.active_index  # type: ignore[attr-defined]
            if job_id in self.mirror.order:  # already listed: no tick would move the selection
                self._sync_rows()
                self._tag_redraw()

    def clear_rows(self) -> None:
        wm = bpy.context.window_manager
        if wm is not None and hasattr(wm, "taskqueue"):
            wm.taskqueue.jobs.clear()
        self._shadow.clear()
        self._index_seen = -1

    # ---- redraw and notifications

    @staticmethod
    def _tag_redraw() -> None:
        wm = bpy.context.window_manager
        if wm is None:
            return
        for window in wm.windows:
            screen = window.screen
            if screen is None:
                continue
            for area in screen.areas:
                if area.type != "VIEW_3D":
                    continue
                space = area.spaces.active
                for region in area.regions:
                    if region.type == "UI" and shows_panel(space, region):
                        region.tag_redraw()

    def _notify(self, finished: list[JobInfo], now: float) -> None:
        """Note finished jobs in the mirror at once; the status bar gets one report a
        second at most (an operator call per job would cost the main thread)."""
        failed = [i for i in finished if i.state in (JobState.FAILED, JobState.INTERRUPTED)]
        done = [i for i in finished if i.state is JobState.COMPLETED]
        for info in failed:
            why = f": {info.error.type}: {info.error.message}" if info.error else ""
            self._note("warning", f"'{info.label}' {info.state.value}{why}")
        if done:
            more = f" (+{len(done) - 1} more)" if len(done) > 1 else ""
            self._note("info", f"'{done[0].label}' completed{more}")

    def _note(self, level: str, message: str) -> None:
        self.mirror.notices.append((time.time(), level, message))
        self._unreported.append((level, message))

    def _report(self, now: float) -> None:
        self._notified_at = now
        batch, self._unreported = self._unreported, []
        worst = [m for lvl, m in batch if lvl != "info"]
        message = worst[0] if worst else batch[-1][1]
        more = len(batch) - 1
        text = f"Task Queue: {message}" + (f" (+{more} more)" if more else "")
        try:
            bpy.ops.taskqueue.notify(message=text[:500], level="WARNING" if worst else "INFO")  # type: ignore[attr-defined]
        except Exception:  # no window to report into (background mode): the mirror has it
            pass

    def tick_stats_ms(self) -> dict[str, Any]:
        """Wall-time p50/p99/max of recent ticks, and the p99 of their own CPU time."""
        samples = sorted(self.tick_times)
        if not samples:
            return {"ticks": 0}
        cpu = sorted(self.tick_cpu)

        def pct(values: list[float], q: float) -> float:
            return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000

        return {
            "ticks": len(samples),
            "p50_ms": pct(samples, 50),
            "p99_ms": pct(samples, 99),
            "max_ms": samples[-1] * 1000,
            "cpu_p99_ms": pct(cpu, 99),
        }
