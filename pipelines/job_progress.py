"""Progress of a running distillation job, for a person waiting on it: steps done / total, loss, elapsed, time left.

What it does: `DistillProgress` is a context manager that, while the caller waits for a job submitted through the
Ray Jobs API, polls the MLflow run the job's rank-0 worker logs to (jobs/distill_worker.py logs `step`, `loss`
every `log_every` steps and `total_steps` as a parameter) every `every_s` seconds and prints one line; when the
training run has finished and the job is still running, it says the job is evaluating. `progress_line` and
`TimeLeft` are the pure parts (formatting, the time-left estimate).

What it does not do: submit or wait for the job (pipelines/trigger.py), or change it: it only reads MLflow, and
a failed read only skips a line (progress is best effort; the job's outcome comes from the Jobs API).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TimeLeft:
    """Seconds of training left from the steps seen so far: the rate between the first report seen and the
    latest, so that the job's start (workers, target load, feature cache) does not count as step time."""

    def __init__(self):
        self.first: tuple[int, float] | None = None

    def observe(self, step: int, total: int, now: float) -> float | None:
        if self.first is None or step < self.first[0]:  # a resumed worker may report a lower step again
            self.first = (step, now)
            return None
        first_step, first_time = self.first
        if step <= first_step or now <= first_time:
            return None
        return (total - step) * (now - first_time) / (step - first_step)


def progress_line(*, elapsed_s: float, step: int | None = None, total: int | None = None,
                  loss: float | None = None, left_s: float | None = None, training_done: bool = False) -> str:
    """One line of progress: the stage the job is in, with what is known of it."""
    elapsed = f"elapsed {format_seconds(elapsed_s)}"
    if step is None:
        return f"distillation job: starting (Ray Train workers, target, traffic); {elapsed}"
    done = f"{step}/{total} steps" if total else f"{step} steps"
    loss_text = "" if loss is None else f", loss {loss:.3f}"
    if training_done:
        return f"distillation job: training done ({done}{loss_text}); evaluating the challenger; {elapsed}"
    share = f" ({100 * step / total:.0f}%)" if total else ""
    left = "" if left_s is None or (total and step >= total) else f", ~{format_seconds(left_s)} of training left"
    return f"distillation job: {done}{share}{loss_text}; {elapsed}{left}"


class DistillProgress:
    """`with DistillProgress(url, experiment, run_name, say): outcome = trigger.wait(...)` prints a line every
    `every_s` seconds (see the module docstring) and a last one when the block ends."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, say: Callable[[str], None], *,
                 every_s: float = 15.0):
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.say, self.every_s = say, every_s
        self.time_left = TimeLeft()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._client = None

    def __enter__(self) -> "DistillProgress":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="distill-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        line = self.line(final=True)
        if line:
            self.say(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            line = self.line()
            if line:
                self.say(line)

    def read(self) -> dict | None:
        """The training run's latest figures from MLflow (None before the run exists)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        runs = self._client.search_runs([experiment.experiment_id],
                                        filter_string=f"attributes.run_name = '{self.run_name}'", max_results=1)
        if not runs:
            return None
        run = runs[0]
        metrics, params = run.data.metrics, run.data.params
        total = params.get("total_steps")
        return {"step": int(metrics["step"]) if "step" in metrics else None,
                "total": int(total) if total and total.isdigit() else None, "loss": metrics.get("loss"),
                "finished": run.info.status != "RUNNING"}

    def line(self, *, final: bool = False) -> str | None:
        """The current line, or None when MLflow could not be read (logged at debug level); `final`: the line
        after the job ended, None when no step was ever reported."""
        now = time.monotonic()
        try:
            figures = self.read()
        except Exception as error:  # noqa: BLE001 - progress is best effort, never fails the wait
            logger.debug("progress unavailable: %s", error)
            return None
        elapsed = now - self._started
        if figures is None or figures["step"] is None:
            return None if final else progress_line(elapsed_s=elapsed)
        step, total = figures["step"], figures["total"]
        left = self.time_left.observe(step, total, now) if total and not final else None
        line = progress_line(elapsed_s=elapsed, step=step, total=total, loss=figures["loss"], left_s=left,
                             training_done=figures["finished"] and not final)
        return line.replace("distillation job:", "distillation job ended:", 1) if final else line
