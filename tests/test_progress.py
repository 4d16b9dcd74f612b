"""Progress of long work where nobody watches a terminal: log lines with counts and time left."""

import logging

from sd2.progress import bar, trainer_callback


def test_a_bar_without_a_terminal_logs_counts_at_most_every_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="sd2.progress")
    b = bar(progress=False, desc="distill (regenerate)", total=40, unit="prompt", every_s=3600)
    for _ in range(40):
        b.update(1)
        b.set_postfix_str("1,234 tokens generated", refresh=False)
    b.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sd2.progress"]
    # the first line and the last, none in between: an hour has not passed
    assert len(lines) == 2, lines
    assert lines[0].startswith("distill (regenerate): 0/40 (0%)")
    assert lines[-1].startswith("distill (regenerate): 40/40 (100%) | ") and "prompt/s" in lines[-1]
    assert lines[-1].endswith("1,234 tokens generated") and "left" in lines[-1]

    caplog.clear()
    for _ in bar(range(3), progress=False, desc="engine at γ=4", unit="prompt", every_s=0):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "sd2.progress"]
    assert [ln.split(" | ")[0] for ln in lines] == [f"engine at γ=4: {i}/3 ({p}%)" for i, p in
                                                    [(0, 0), (1, 33), (2, 67), (3, 100)]]


def test_the_trainer_callback_logs_steps_loss_and_the_end(caplog):
    from types import SimpleNamespace

    caplog.set_level(logging.INFO, logger="sd2.progress")
    cb = trainer_callback(4, desc="train (kd)")
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    cb.on_train_begin(None, state, None)
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(None, state, None)
        cb.on_log(None, state, None, logs={"loss": 2.0 / step})
    cb.on_train_end(None, state, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "sd2.progress"]
    assert lines[0].startswith("train (kd): 0/4 (0%)")
    assert lines[-1].startswith("train (kd): 4/4 (100%)") and lines[-1].endswith("loss=0.5000")
    # another rank logs nothing
    caplog.clear()
    other = trainer_callback(4)
    other.on_train_begin(None, SimpleNamespace(is_world_process_zero=False, global_step=0), None)
    other.on_step_end(None, state, None)
    other.on_train_end(None, state, None)
    assert not [r for r in caplog.records if r.name == "sd2.progress"]
