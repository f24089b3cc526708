"""Metric logging (JSON lines + TensorBoard) and training progress (tqdm bar or log lines)."""

import json
import math
import os
import sys
import time

import jax
from absl import logging

RESERVED = ("step", "time")


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _drop_partial_line(path: str) -> None:
    """Truncates an unterminated last line (a write cut short by a crash) before appending."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricWriter:
    """Appends metrics to logdir/metrics.jsonl and TensorBoard events; no-op off process 0."""

    def __init__(self, logdir: str, *, tensorboard: bool = True):
        self.logdir = logdir
        self.path = os.path.join(logdir, "metrics.jsonl")
        self.active = _is_main_process()
        self._tb = None
        if not self.active:
            return
        os.makedirs(logdir, exist_ok=True)
        _drop_partial_line(self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: only needed when events are wanted

            self._tb = SummaryWriter(logdir)

    def write(self, step: int, metrics: dict[str, float], *, prefix: str = "") -> None:
        """Appends {"step", "time", prefix+name: value} as one JSON line; scalars to TensorBoard."""
        values = {prefix + k: float(v) for k, v in metrics.items()}
        clash = [k for k in values if k in RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} clash with reserved keys {RESERVED}; "
                             "use a prefix such as 'train/'.")
        if not self.active:
            return
        record = {"step": int(step), "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str) -> list[dict]:
    """Reads a JSON-lines file; an unterminated last line (write in progress) is ignored."""
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}): {line[:80]!r}") from e
    return records


def format_eta(seconds: float) -> str:
    """Formats seconds as H:MM:SS ('?' when unknown, i.e. not finite)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}.")
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Progress bar on a terminal (tqdm), else an absl log line every `every` steps; process 0 only.

    Throughput (images/s) and ETA are measured over the steps since the previous report.
    """

    def __init__(self, total_steps: int, *, initial: int = 0, desc: str = "", every: int = 50,
                 enabled: bool | None = None, clock=time.perf_counter):
        if total_steps < 0 or not 0 <= initial <= total_steps:
            raise ValueError(f"need 0 <= initial ({initial}) <= total_steps ({total_steps}).")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.total, self.desc, self.every, self.clock = total_steps, desc, every, clock
        self.active = _is_main_process()
        self.images_per_sec = math.nan
        self.eta_seconds = math.nan
        self._last_step, self._last_time = initial, clock()
        self._bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled and self.active:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, desc=desc or None, unit="step",
                             file=sys.stderr, dynamic_ncols=True)

    def _measure(self, step: int, images_per_step: int) -> None:
        now = self.clock()
        steps, dt = step - self._last_step, now - self._last_time
        if steps > 0 and dt > 0:
            self.images_per_sec = steps * images_per_step / dt
            self.eta_seconds = max(self.total - step, 0) * dt / steps
        self._last_step, self._last_time = step, now

    def update(self, step: int, metrics: dict[str, float], images_per_step: int) -> None:
        """Reports progress at `step` with host-float metrics (shown as 'name value')."""
        if not self.active:
            return
        shown = " ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
        if self._bar is not None:
            self._measure(step, images_per_step)
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(f"{shown} {self.images_per_sec:.0f} img/s", refresh=False)
            return
        if step <= self._last_step or (step - self._last_step < self.every and step < self.total):
            return
        self._measure(step, images_per_step)
        parts = [self.desc, f"step {step}/{self.total}", shown,
                 f"{self.images_per_sec:.0f} img/s ETA {format_eta(self.eta_seconds)}"]
        logging.info("%s", " ".join(p for p in parts if p))

    def close(self) -> None:
        """Closes the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def latest_records(records: list[dict]) -> list[dict]:
    """One record per (step, metric names), the last written winning, sorted by step.

    A run resumed from a checkpoint logs again the steps after that checkpoint; its records replace
    the interrupted run's.
    """
    out = {}
    for r in records:
        out[(r["step"], tuple(sorted(k for k in r if k != "time")))] = r
    return sorted(out.values(), key=lambda r: r["step"])
