"""The distillation job's progress lines (pipelines/job_progress.py): formatting and the time-left estimate."""

from pipelines.job_progress import DistillProgress, TimeLeft, format_seconds, progress_line


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_time_left_uses_the_rate_since_the_first_report_seen():
    left = TimeLeft()
    assert left.observe(20, 600, now=100.0) is None  # one point: no rate yet (the job's start is not step time)
    assert left.observe(20, 600, now=110.0) is None  # no new step
    assert left.observe(80, 600, now=130.0) == (600 - 80) * 30.0 / 60  # 0.5 s per step
    assert left.observe(10, 600, now=140.0) is None  # a resumed worker restarts the estimate


def test_progress_lines_say_the_stage_steps_loss_and_time_left():
    assert progress_line(elapsed_s=12) == "distillation job: starting (Ray Train workers, target, traffic); elapsed 12s"
    line = progress_line(elapsed_s=100, step=120, total=600, loss=2.3456, left_s=260)
    assert line == "distillation job: 120/600 steps (20%), loss 2.346; elapsed 1m40s, ~4m20s of training left"
    done = progress_line(elapsed_s=400, step=600, total=600, loss=1.0, left_s=0, training_done=True)
    assert done.startswith("distillation job: training done (600/600 steps, loss 1.000); evaluating")


class _Progress(DistillProgress):
    def __init__(self, figures):
        super().__init__("http://unused", "exp", "run", print, every_s=60)
        self.figures = figures

    def read(self):
        if isinstance(self.figures, Exception):
            raise self.figures
        return self.figures


def test_the_last_line_reports_the_end_and_a_failed_read_is_skipped():
    assert _Progress({"step": 30, "total": 30, "loss": 0.5, "finished": True}).line(final=True).startswith(
        "distillation job ended: 30/30 steps (100%), loss 0.500")
    assert _Progress(None).line(final=True) is None  # nothing was ever reported: no "ended" line
    assert _Progress(None).line().startswith("distillation job: starting")
    assert _Progress(OSError("MLflow down")).line() is None
