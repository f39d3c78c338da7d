"""Stateful truncated BPTT (`--stateful`): the Trainer that carries each stream's recurrent state from one batch to
the next, and saves it in checkpoints."""

import logging
import os

import torch
from transformers import DynamicCache

from ..cache_char_lstm import cache_from_states, cache_states, detach_cache, reset_cache_rows
from ..errors import UsageError
from .checkpoints import CharLSTMTrainer


logger = logging.getLogger(__name__)


STREAM_STATE_NAME = "stream_state_{}.pt"


class StatefulTrainer(CharLSTMTrainer):
    """`Trainer` for stateful truncated BPTT (char-rnn style, `--stateful`): each batch row continues its own
    contiguous stream of text, starting from the state the previous batch left (detached, so gradients stop at the
    window boundary), and a stream that starts over (`window == 0`: a new epoch, a new evaluation) starts from zero.

    The data comes from `encode_streams` + `collate_stream_blocks`, read in order (`train_sampling_strategy` is
    "sequential"); accelerate deals the batches to the processes so that each process owns its own streams. What
    Trainer does not know and this class adds:

    * the carried state, one per mode: evaluation in the middle of training reads its own streams and leaves the
      training state alone;
    * the state saved in each checkpoint next to the RNG state (one file per process), and restored on resume, so a
      resumed run continues exactly as the uninterrupted one (with gradient accumulation too: micro-batches follow
      each other in the same order).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stream_caches: dict[str, DynamicCache] = {}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "window" not in self._signature_columns:  # the model does not take it, but the collator needs it
            self._signature_columns = [*self._signature_columns, "window"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        window = inputs.pop("window")
        mode = "train" if model.training else "eval"
        cache = self._stream_caches.get(mode)
        if cache is None:
            cache = DynamicCache(config=self.accelerator.unwrap_model(model).config)
        reset_cache_rows(cache, window == 0)
        loss, outputs = super().compute_loss(
            model,
            {**inputs, "cache": cache, "use_cache": True},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        self._stream_caches[mode] = detach_cache(cache)
        return (loss, outputs) if return_outputs else loss

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        cache = self._stream_caches.get("train")
        states = cache_states(cache) if cache is not None else None
        if states is not None:
            saved = {"states": [tuple(s.cpu() for s in layer) for layer in states], "world_size": self.args.world_size}
            torch.save(saved, os.path.join(output_dir, STREAM_STATE_NAME.format(self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STREAM_STATE_NAME.format(self.args.process_index))
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no stream state for process {self.args.process_index}: the streams "
                           "continue from a zero state.")
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        rows, world_size = saved["states"][0][0].shape[0], saved["world_size"]
        if (rows, world_size) != (self.args.per_device_train_batch_size, self.args.world_size):
            raise UsageError(
                f"{checkpoint} was trained with {rows} streams per process and {world_size} process(es), this run has "
                f"{self.args.per_device_train_batch_size} and {self.args.world_size}: resume a --stateful run with "
                "the same --per_device_train_batch_size and number of processes (the streams are laid out for them)."
            )
        device = next(self.model.parameters()).device
        states = [tuple(s.to(device) for s in layer) for layer in saved["states"]]
        self._stream_caches["train"] = cache_from_states(self.accelerator.unwrap_model(self.model).config, states)
