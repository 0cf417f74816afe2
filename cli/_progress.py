"""Rich progress on stderr for a running study: one bar for trials, one for the current trial."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


class TrialProgress:
    """Context manager; pass ``on_trial`` to ``study.optimize`` callbacks, ``on_step`` to training."""

    def __init__(self, console: Console, *, total: int | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._trials = self._progress.add_task("trials", total=total)
        self._steps = self._progress.add_task("current trial", total=None, visible=False)

    def __enter__(self) -> TrialProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: one finished trial."""
        value = "" if not trial.values else f" top1 {trial.values[0]:.2f}"
        self._progress.update(
            self._trials,
            advance=1,
            description=f"trials (last #{trial.number} {trial.state.name.lower()}{value})",
        )
        self._progress.update(self._steps, visible=False)

    def on_step(self, done: int, total: int) -> None:
        """Training callback: updates done of the current trial."""
        self._progress.update(self._steps, completed=done, total=total, visible=True)
