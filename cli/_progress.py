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
    """Context manager: ``on_trial`` is an Optuna callback, ``on_step`` a training callback."""

    def __init__(
        self,
        console: Console,
        *,
        total: int | None,
        enabled: bool = True,
        trials: bool = True,
        step_label: str = "current trial",
    ) -> None:
        """``trials=False``: one bar, the training's (a retrain has no trials to count)."""
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
        self._started = False
        self._trials = self._progress.add_task("trials", total=total, visible=trials)
        self._steps = self._progress.add_task(step_label, total=None, visible=False)

    def __enter__(self) -> TrialProgress:
        return self  # the bars appear with the first update, so early errors print alone

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._progress.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self._progress.stop()

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: one finished trial."""
        self._start()
        over = trial.user_attrs.get("infeasible")
        if over:  # (COMPLETE with a top-1 of 0: never trained)
            last = f"over budget ({', '.join(over)})"
        else:
            value = "" if not trial.values else f" top1 {trial.values[0]:.2f}"
            last = f"{trial.state.name.lower()}{value}"
        self._progress.update(
            self._trials, advance=1, description=f"trials (last #{trial.number} {last})"
        )
        self._progress.update(self._steps, visible=False)

    def on_step(self, done: int, total: int) -> None:
        """Training callback: updates done of the current trial."""
        self._start()
        self._progress.update(self._steps, completed=done, total=total, visible=True)
