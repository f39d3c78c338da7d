"""The pictures: the training curves of a run (training/curves.py) and the gradient-flow figure of bptt_demo."""

from types import SimpleNamespace

from char_lstm.training.curves import stop_mark


def test_stop_mark_names_the_time_budget_or_an_early_stop_and_nothing_for_a_full_run():
    assert stop_mark(SimpleNamespace(global_step=120, max_steps=3000), stopped_at=120) == (
        120, "--max_train_seconds reached at step 120")
    assert stop_mark(SimpleNamespace(global_step=40, max_steps=100), stopped_at=None) == (
        40, "stopped early at step 40 of 100")
    assert stop_mark(SimpleNamespace(global_step=100, max_steps=100), stopped_at=None) is None

