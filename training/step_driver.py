"""Bookkeeping of a resumable, time-boxed driver: a call that runs steps while they fit in its wall time.

The GPU drivers (``scripts/toy_baselines_gpu.py``, ``toy_sfpp_gpu.py``, ``toy_resampling_gpu.py``) run a plan
of steps, each skipped when done, and stop with "rerun to continue" before a step that would not finish inside
the call's ``max_wall`` seconds. What they share lives here:

- a step is done when its marker ``<folder>/.done/<step>`` exists (the file holds the clock's time, whole
  seconds, when it was written);
- every event is a JSON line in ``<results>/driver.jsonl`` (and printed with ``[driver]``), starting with
  ``time`` (the clock, 0.1 s) and ``call_elapsed_s`` (since the call started);
- ``clock`` (seconds, like ``time.time``) is what every time decision and record reads: the call's start, the
  time left, the markers, the records. Tests pass a fake one, so no decision depends on the machine's speed.
  Deadlines handed to code that reads ``time.time()`` itself go through :meth:`StepBook.deadline`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable


class StepBook:
    """One call's clock, markers and record. ``results``: where ``driver.jsonl`` is appended; ``max_wall``:
    the seconds this call may run; ``clock``: a function returning seconds."""

    def __init__(self, results: str, max_wall: float, clock: Callable[[], float] = time.time):
        self.results = results
        self.max_wall = float(max_wall)
        self.clock = clock
        self.t0 = clock()

    def elapsed(self) -> float:
        """Seconds since the call started."""
        return self.clock() - self.t0

    def left(self) -> float:
        """Seconds this call has left (negative once past ``max_wall``)."""
        return self.max_wall - self.elapsed()

    def deadline(self, reserve: float = 0.0) -> float:
        """The end of this call less ``reserve`` seconds, in ``time.time()`` units (for code that reads the
        real clock itself, e.g. ``run_protocol``'s deadline)."""
        return time.time() + self.left() - reserve

    @staticmethod
    def marker(folder: str, step: str) -> str:
        return os.path.join(folder, ".done", step)

    def done(self, folder: str, step: str) -> bool:
        return os.path.isfile(self.marker(folder, step))

    def mark(self, folder: str, step: str) -> None:
        os.makedirs(os.path.join(folder, ".done"), exist_ok=True)
        with open(self.marker(folder, step), "w") as fh:
            fh.write(f"{self.clock():.0f}\n")

    def record(self, **entry) -> dict:
        """Append ``entry`` (after ``time`` and ``call_elapsed_s``) to ``driver.jsonl`` and print it."""
        now = self.clock()
        entry = {"time": round(now, 1), "call_elapsed_s": round(now - self.t0, 1), **entry}
        print(f"[driver] {json.dumps(entry)}", flush=True)
        os.makedirs(self.results, exist_ok=True)
        with open(os.path.join(self.results, "driver.jsonl"), "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return entry

    def run_step(self, step: str, folder: str, marker: str, need: float, run: Callable[[], bool], *,
                 label: str | None = None, need_key: str = "estimate_s", **keys) -> int | None:
        """One step of a plan. When fewer than ``need`` seconds are left: record ``stopped`` (``before``, the
        ``keys``, ``need_key``, ``left_s``) and return 3 ("rerun to continue"). Else ``run()`` (True: the step
        finished), record ``step`` (``step``, the ``keys``, ``seconds``, ``finished``); finished: write the
        ``marker`` in ``folder`` and return None, else return 3 (the step continues in the next call)."""
        left = self.left()
        if need > left:
            self.record(event="stopped", before=step, **keys, **{need_key: round(need)}, left_s=round(left))
            print(f"[driver] stopped before {label or step} (needs ~{need:.0f} s, {left:.0f} s left in this call); "
                  "rerun the same command to continue", flush=True)
            return 3
        t = self.clock()
        finished = run()
        self.record(event="step", step=step, **keys, seconds=round(self.clock() - t, 1), finished=finished)
        if not finished:
            print("[driver] rerun the same command to continue", flush=True)
            return 3
        self.mark(folder, marker)
        return None

    def protocol(self, models, proto, reserve: float) -> bool:
        """Run the evaluation protocol (``training.protocol.run_protocol``) on ``models`` into
        ``<results>/protocol`` until ``reserve`` seconds before the end of this call. False when it stopped for
        time (each model's metrics are cached: the next call goes on); True when done (headline printed)."""
        from .protocol import run_protocol
        from .protocol_report import headline

        res = run_protocol(models, os.path.join(self.results, "protocol"), proto, deadline=self.deadline(reserve))
        if res is None:
            return False
        print(headline(res), flush=True)
        return True

    def all_done(self) -> int:
        print(f"[driver] all done in this call's {self.elapsed():.0f} s; results in {self.results}", flush=True)
        return 0


class ManualClock:
    """A clock that moves only when told (``advance``): what the drivers' tests pass, so that every decision
    follows from the seconds the test says each step took, whatever the machine's speed."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += float(seconds)


def compile_once(book: StepBook, rt, model_cfg, forwards: Callable, **entry) -> bool:
    """Run ``forwards(model)`` once on a fresh model of ``model_cfg`` (train mode, on ``rt.device``) to compile
    the kernels of the training forwards before any stage's clock runs (compiled kernels are shared
    in-process); record a ``warm_up`` event with its seconds and ``entry``. Only on CUDA (False elsewhere:
    nothing to compile)."""
    if rt.device.type != "cuda":
        return False
    import torch

    from .models import build_model

    t0 = book.clock()
    model = build_model(model_cfg, 0, rt.device).train()
    forwards(model)
    torch.cuda.synchronize(rt.device)
    del model
    book.record(event="warm_up", seconds=round(book.clock() - t0, 1), **entry)
    return True


def protocol_seconds(per_model: float, prompts: int, seeds, lengths) -> float:
    """Estimated seconds of the protocol for one (model, training seed): ``per_model`` measured at 64 prompts x
    3 seeds x 20x the training length, scaled linearly."""
    return per_model * prompts * len(seeds) * max(lengths) / (64 * 3 * 20)


def write_json(obj, path: str) -> None:
    """Write ``obj`` as JSON through a temporary file and an atomic replace."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)
