"""The pictures: the training curves of a run (training/curves.py) and the gradient-flow figure of bptt_demo."""

from types import SimpleNamespace

import pytest

from char_lstm.training.curves import stop_mark
from helpers import call_script


def test_stop_mark_names_the_time_budget_or_an_early_stop_and_nothing_for_a_full_run():
    assert stop_mark(SimpleNamespace(global_step=120, max_steps=3000), stopped_at=120) == (
        120, "--max_train_seconds reached at step 120")
    assert stop_mark(SimpleNamespace(global_step=40, max_steps=100), stopped_at=None) == (
        40, "stopped early at step 40 of 100")
    assert stop_mark(SimpleNamespace(global_step=100, max_steps=100), stopped_at=None) is None



def test_bptt_demo_draws_the_gradient_flow_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure is drawn with matplotlib")
    figure = tmp_path / "flow.png"
    result = call_script("bptt_demo.py", ["--steps", "12", "--hidden_size", "8", "--plot", str(figure)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == f"figure: {figure}"
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bptt_demo_does_not_draw_over_a_file_that_exists(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure is drawn with matplotlib")
    figure = tmp_path / "flow.png"
    figure.write_bytes(b"the reader's own picture")
    argv = ["--steps", "12", "--hidden_size", "8", "--plot", str(figure)]
    result = call_script("bptt_demo.py", argv, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: --plot {figure} exists; choose another file, or pass --overwrite to "
                                     "replace it.")
    assert figure.read_bytes() == b"the reader's own picture"
    result = call_script("bptt_demo.py", [*argv, "--overwrite"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
