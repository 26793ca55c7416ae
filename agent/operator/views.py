"""How a rollout's progress is shown while the operator waits: nothing (``--json``), one
line per event (logs, CI), or one redrawn line per instance on a terminal.

Split from ``agent/operator/commands.py`` (docs/architecture.md, "Command line"): the
commands decide what to wait for, these views only print what the tracker holds, through
the sanitising renderers of ``agent/operator/display.py``.
"""

from __future__ import annotations

from typing import TextIO

from agent.operator.display import OUTCOME_COLORS, clean, paint
from agent.operator.rollouts import Batch, Progress, Tracker


class QuietView:
    """Shows nothing while waiting (--json: the document at the end says it all)."""

    tick_seconds = 1.0

    def sent(self, batch: Batch, total: int) -> None:
        pass

    def update(self, tracker: Tracker, progress: Progress | None, now: float) -> None:
        pass

    def finish(self, tracker: Tracker, now: float) -> None:
        pass


class PlainView(QuietView):
    """One line per event, for logs and CI output."""

    def __init__(self, stream: TextIO, *, color: bool = False) -> None:
        self.stream, self.color = stream, color

    def sent(self, batch: Batch, total: int) -> None:
        print(
            f"batch {batch.index}/{total}: command {batch.command_id} -> "
            f"{' '.join(batch.instances)}",
            file=self.stream,
            flush=True,
        )

    def line(self, progress: Progress, now: float) -> str:
        status = progress.result.outcome if progress.result else progress.status
        message = progress.result.message if progress.result else progress.message
        return (
            f"  {clean(progress.instance, 40):<16} {clean(progress.phase, 12):<10} "
            f"{paint(f'{clean(status, 12):<11}', OUTCOME_COLORS.get(status), self.color)} "
            f"{progress.elapsed(now):>6.1f}s  {clean(message, 70)}"
        ).rstrip()

    def update(self, tracker: Tracker, progress: Progress | None, now: float) -> None:
        if progress is not None:
            print(self.line(progress, now), file=self.stream, flush=True)

    def finish(self, tracker: Tracker, now: float) -> None:
        for progress in tracker.progress.values():
            if progress.result is not None and progress.result.outcome == "timed-out":
                print(self.line(progress, now), file=self.stream, flush=True)


class LiveView(PlainView):
    """On a terminal: one line per instance, redrawn in place with phase and elapsed time."""

    tick_seconds = 0.5

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream, color=True)
        self._drawn = 0

    def update(self, tracker: Tracker, progress: Progress | None, now: float) -> None:
        lines = [self.line(p, now) for _, p in sorted(tracker.progress.items())]
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def finish(self, tracker: Tracker, now: float) -> None:
        self.update(tracker, None, now)
        self._drawn = 0


def make_view(*, json_output: bool, stream: TextIO) -> QuietView:
    if json_output:
        return QuietView()
    return LiveView(stream) if stream.isatty() else PlainView(stream)
