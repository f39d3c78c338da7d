"""The picture of a run: `training_curves.png` in the output folder (and on the model card), drawn from Trainer's
log history with matplotlib's file renderer (Agg: no display needed, pyplot's state left alone). Without matplotlib
the run goes on, and says so once."""

import logging
import math
import os


logger = logging.getLogger(__name__)


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the log history, one value per step (the last one logged at that step: the final
    model's evaluation repeats the last step's)."""
    values = {entry["step"]: entry[key] for entry in log_history if key in entry and "step" in entry}
    steps = sorted(values)
    return steps, [values[step] for step in steps]


def stop_mark(state, stopped_at: int | None) -> tuple[int, str] | None:
    """Where the curves mark the end of a run cut short (step, label): by --max_train_seconds (`stopped_at`), or by
    another callback (an early stop); None for a run that went to its last step."""
    if stopped_at is not None:
        return stopped_at, f"--max_train_seconds reached at step {stopped_at}"
    if 0 < state.global_step < state.max_steps:
        return state.global_step, f"stopped early at step {state.global_step} of {state.max_steps}"
    return None


def plot_training_curves(log_history: list[dict], path: str, stop: tuple[int, str] | None = None) -> bool:
    """Draw the run's curves into `path` (a PNG): training and validation loss (nats/char on the left axis,
    bits/char on the right) against steps above, the learning rate on its own axis below, and `stop` =
    (step, label) marked as a dashed line on both. A log scale for the loss only when it spans more than a factor 10.
    Returns False (after one warning line) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no backend or global state of the caller's is touched
    except ImportError:
        logger.warning(f"matplotlib is not installed: no {os.path.basename(path)} was drawn "
                       "(pip install matplotlib to get one).")
        return False

    train_steps, train_loss = _series(log_history, "loss")
    eval_steps, eval_loss = _series(log_history, "eval_loss")
    lr_steps, lr = _series(log_history, "learning_rate")
    fig = Figure(figsize=(8, 5.6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    fig.subplots_adjust(left=0.1, right=0.9, top=0.94, bottom=0.09, hspace=0.1)  # fixed: a layout engine costs 0.3 s
    dots = "." if len(train_steps) < 60 else None  # where the log is sparse, the points show where it was read
    ax_loss.plot(train_steps, train_loss, color="tab:blue", marker=dots, linewidth=1.2,
                 label="training loss (mean since the point before)")
    ax_loss.plot(eval_steps, eval_loss, color="tab:orange", marker="o", markersize=5, linewidth=1.8, zorder=3,
                 label="validation loss")
    losses = [value for value in train_loss + eval_loss if math.isfinite(value) and value > 0]
    if losses and max(losses) / min(losses) > 10:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (nats/char)")
    bits = ax_loss.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
    bits.set_ylabel("bits/char")
    if eval_loss:
        ax_loss.set_title(f"final validation loss {eval_loss[-1]:.3f} nats/char = "
                          f"{eval_loss[-1] / math.log(2):.3f} bits/char at step {eval_steps[-1]}", fontsize=10)
    ax_lr.plot(lr_steps, lr, color="tab:green", marker=dots, linewidth=1.2)
    if not lr:  # logged with the training loss, every --logging_steps
        ax_lr.text(0.5, 0.5, "not logged yet", transform=ax_lr.transAxes, ha="center", va="center", color="0.4")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("training step")
    ax_lr.set_xlim(left=0)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(True, alpha=0.3)
        if stop is not None:
            ax.axvline(stop[0], color="tab:red", linestyle="--", linewidth=1.2, zorder=1,
                       label=stop[1] if ax is ax_loss else None)
    ax_loss.legend(loc="upper right")
    fig.savefig(path, dpi=90)  # Agg, matplotlib's file renderer: no display needed
    return True
