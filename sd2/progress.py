"""Progress of long work. On a terminal a tqdm bar; where nobody watches a terminal (flows, workers: `progress=False`)
the same counts as a log line on the `sd2.progress` logger at most once a minute, so a 40-minute stage in the
Prefect UI or a worker's log says where it is and when it will end instead of nothing."""

from __future__ import annotations

import logging
from typing import Iterable

from tqdm.auto import tqdm

LOG_EVERY_S = 60.0
_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) | {rate_fmt}, {elapsed} elapsed, {remaining} left{postfix}"
_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} | {rate_fmt}, {elapsed} elapsed{postfix}"


class _LogLines:
    """A file for tqdm that turns each refresh into one log record (tqdm writes '\\r' + the line)."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.last = logger, ""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        count = line.split(" | ")[0]  # the closing refresh repeats the last count: one line per count
        if line and count != self.last:
            self.last = count
            self.logger.info(line)

    def flush(self) -> None:
        pass


def bar(iterable: Iterable | None = None, *, progress: bool, desc: str, total: float | None = None,
        unit: str = "it", every_s: float = LOG_EVERY_S, **kw) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand): drawn when `progress`, else logged every `every_s`
    seconds and once at the end."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if progress:
        return tqdm(iterable, desc=desc, total=total, unit=unit, **kw)
    fmt = _FORMAT if total else _FORMAT_NO_TOTAL
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_LogLines(logging.getLogger("sd2.progress")),
                mininterval=every_s, maxinterval=every_s, miniters=1, bar_format=fmt, dynamic_ncols=False,
                ncols=200, **kw)


def trainer_callback(max_steps: int, desc: str = "train"):
    """A transformers TrainerCallback logging steps, loss and time left on rank 0 (the Trainer's own bar is off
    when `progress=False`)."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        pbar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.pbar = bar(progress=False, desc=desc, total=max_steps, unit="step", initial=state.global_step)

        def on_step_end(self, args, state, control, **kw):
            if self.pbar is not None:
                self.pbar.update(state.global_step - self.pbar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.pbar is not None and logs and "loss" in logs:
                self.pbar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.pbar is not None:
                self.pbar.close()
                self.pbar = None

    return _Progress()
