"""A NumPy implementation of the CharLSTM architecture, forward and backward written out by hand.

This is the NumPy track of the course (the README names the three), made exact enough to be the test oracle of the
torch model: it loads the weights of a `CharLSTMForCausalLM` and reproduces its logits and every parameter gradient.
No autograd anywhere: backpropagation through time (BPTT) is the chain rule applied step by step, from the last
character back to the first.

    from char_lstm.numpy_reference import NumpyCharLSTM
    ref = NumpyCharLSTM.from_model(model)                  # float64 by default
    logits = ref.forward(input_ids)                        # (B, T, V) NumPy array
    loss, grads = ref.loss_and_grads(input_ids, labels)    # grads keyed like dict(model.named_parameters())

Shapes: B batch, T time steps, E embedding size, H hidden size, V vocabulary, G gates (4 LSTM, 3 GRU, 1 RNN).
Gate layouts follow PyTorch: LSTM (input, forget, cell, output), GRU (reset, update, new). Dropout is not modelled
(compare with the torch model in eval mode). Positions where `attention_mask == 0` leave the state unchanged and
output a zero hidden state, as in the torch model.
"""

import math

import numpy as np

from .cells_char_lstm import CELLS, cell_type_of


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow for large |x|


def clip_grads_by_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale all gradients together so that their global L2 norm is at most `max_norm` (what
    `torch.nn.utils.clip_grad_norm_` does); returns (clipped gradients, norm before clipping)."""
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    return {name: g * scale for name, g in grads.items()}, total


class NumpyCharLSTM:
    def __init__(self, params: dict[str, np.ndarray], cell_type: str, num_layers: int, hidden_size: int,
                 tied: bool = False, dtype=np.float64):
        self.cell = ORACLES[cell_type_of(cell_type).name]
        self.params = {name: np.asarray(value, dtype=dtype) for name, value in params.items()}
        self.cell_type, self.num_layers, self.hidden_size, self.tied, self.dtype = (
            cell_type, num_layers, hidden_size, tied, dtype
        )

    @classmethod
    def from_model(cls, model, dtype=np.float64) -> "NumpyCharLSTM":
        """Copy the weights of a `CharLSTMForCausalLM` (parameter names as in `model.named_parameters()`)."""
        config = model.config
        params = {name: p.detach().cpu().double().numpy() for name, p in model.named_parameters()}
        return cls(params, config.cell_type, config.num_hidden_layers, config.hidden_size,
                   tied=bool(config.tie_word_embeddings), dtype=dtype)

    # -----------------------------------------------------------------------------------------------------------------
    # Parameters

    def _layer(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p = f"model.layers.{k}."
        return (self.params[p + "weight_ih_l0"], self.params[p + "weight_hh_l0"],
                self.params[p + "bias_ih_l0"], self.params[p + "bias_hh_l0"])

    def _head(self) -> tuple[np.ndarray, np.ndarray]:
        weight = self.params["model.embeddings.weight"] if self.tied else self.params["lm_head.weight"]
        return weight, self.params["lm_head.bias"]

    def zero_state(self, batch_size: int) -> list[tuple[np.ndarray, ...]]:
        """Per layer: (h, c) for an LSTM, (h,) otherwise, each (B, H) of zeros."""
        return [tuple(np.zeros((batch_size, self.hidden_size), self.dtype) for _ in range(self.cell.num_states))
                for _ in range(self.num_layers)]

    # -----------------------------------------------------------------------------------------------------------------
    # One time step of one layer, forward and backward: the products here, the cell's own part in its class below

    def _cell_forward(self, k: int, x: np.ndarray, state: tuple) -> tuple[tuple, dict]:
        """x (B, in), state ((B, H), ...) -> (new state, cache of what the backward step needs)."""
        w_ih, w_hh, b_ih, b_hh = self._layer(k)
        h = state[0]
        # (B, G*H): the input and hidden pre-activations of every gate
        new_state, cache = self.cell.forward(x @ w_ih.T + b_ih, h @ w_hh.T + b_hh, state, self.hidden_size)
        return new_state, {**cache, "x": x, "h": h}

    def _cell_backward(self, k: int, cache: dict, d_state: tuple, grads: dict) -> tuple[np.ndarray, tuple]:
        """Given dL/d(new state), accumulate the layer's weight gradients and return (dL/dx, dL/d(previous state))."""
        w_ih, w_hh, _, _ = self._layer(k)
        p = f"model.layers.{k}."
        da_ih, da_hh, direct = self.cell.backward(cache, d_state)
        grads[p + "weight_ih_l0"] += da_ih.T @ cache["x"]
        grads[p + "weight_hh_l0"] += da_hh.T @ cache["h"]
        grads[p + "bias_ih_l0"] += da_ih.sum(axis=0)
        grads[p + "bias_hh_l0"] += da_hh.sum(axis=0)
        dh_prev = da_hh @ w_hh  # the recurrent path: one multiplication by W_hh per time step back
        return da_ih @ w_ih, (dh_prev + direct[0], *direct[1:])

    # -----------------------------------------------------------------------------------------------------------------
    # Whole sequences

    def _run(self, input_ids, attention_mask=None, initial_state=None):
        """Forward over (B, T) ids; returns (logits, final state, caches for the backward pass)."""
        ids = np.asarray(input_ids)
        B, T = ids.shape
        mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        x = self.params["model.embeddings.weight"][ids]  # (B, T, E)
        state = [tuple(np.array(s, self.dtype) for s in layer) for layer in (initial_state or self.zero_state(B))]
        caches = [[None] * T for _ in range(self.num_layers)]
        for k in range(self.num_layers):
            outputs = np.zeros((B, T, self.hidden_size), self.dtype)
            for t in range(T):
                new_state, caches[k][t] = self._cell_forward(k, x[:, t], state[k])
                keep = mask[:, t:t + 1]
                # padding: the state passes unchanged and the output is zero
                state[k] = tuple(np.where(keep, s_new, s_old) for s_new, s_old in zip(new_state, state[k]))
                outputs[:, t] = np.where(keep, new_state[0], 0.0)
            x = outputs  # the input of the next layer
        weight, bias = self._head()
        logits = x @ weight.T + bias  # (B, T, V)
        return logits, state, {"ids": ids, "mask": mask, "caches": caches, "top": x}

    def forward(self, input_ids, attention_mask=None, initial_state=None) -> np.ndarray:
        """Logits (B, T, V) for ids (B, T)."""
        return self._run(input_ids, attention_mask, initial_state)[0]

    def loss_and_grads(self, input_ids, labels, attention_mask=None, initial_state=None, return_state: bool = False):
        """Mean cross-entropy of predicting labels[:, t + 1] from position t (labels shifted inside, -100 ignored,
        as in transformers), and its gradient for every parameter, by backpropagation through time.
        With `return_state`, also the final state (for truncated BPTT: the next chunk starts from it)."""
        logits, final_state, run = self._run(input_ids, attention_mask, initial_state)
        loss, d_logits = self._cross_entropy(logits, labels)
        grads, _ = self._backward(run, d_logits, final_state)
        return (loss, grads, final_state) if return_state else (loss, grads)

    @staticmethod
    def _cross_entropy(logits: np.ndarray, labels) -> tuple[float, np.ndarray]:
        """Softmax cross-entropy and dL/dlogits = (softmax - one_hot) / count at the counted positions."""
        B, T, V = logits.shape
        targets = np.full((B, T), -100)
        targets[:, :-1] = np.asarray(labels)[:, 1:]  # position t predicts token t + 1
        valid = targets != -100
        count = int(valid.sum())
        if count == 0:
            raise ValueError("No label to predict: every shifted label is -100.")
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        safe = np.where(valid, targets, 0)[..., None]
        loss = float(-(np.take_along_axis(log_probs, safe, axis=-1)[..., 0] * valid).sum() / count)
        d_logits = np.exp(log_probs)
        np.put_along_axis(d_logits, safe, np.take_along_axis(d_logits, safe, axis=-1) - 1.0, axis=-1)
        return loss, d_logits * (valid[..., None] / count)

    def _backward(self, run: dict, d_logits: np.ndarray, final_state, record_layer: int | None = None):
        """BPTT from dL/dlogits: (gradients keyed like the torch parameters, ‖dL/dh_t‖ of `record_layer` per step)."""
        ids, mask, caches, top = run["ids"], run["mask"], run["caches"], run["top"]
        B, T, _ = d_logits.shape
        grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        weight, _ = self._head()
        grads["model.embeddings.weight" if self.tied else "lm_head.weight"] += np.einsum("btv,bth->vh", d_logits, top)
        grads["lm_head.bias"] += d_logits.sum(axis=(0, 1))  # logits = top @ W^T + b
        d_outputs = d_logits @ weight  # dL/d(top layer outputs), (B, T, H)
        norms = np.zeros(T)

        # Layer by layer from the top, walk back in time. At step t the gradient of the new state is what the output
        # at t received plus what step t + 1 sent back through the state.
        for k in reversed(range(self.num_layers)):
            d_inputs = np.zeros((B, T, caches[k][0]["x"].shape[1]), self.dtype)
            d_state = tuple(np.zeros((B, self.hidden_size), self.dtype) for _ in final_state[k])
            for t in reversed(range(T)):
                keep = mask[:, t:t + 1]
                d_new = (d_state[0] + np.where(keep, d_outputs[:, t], 0.0),) + d_state[1:]
                if k == record_layer:
                    norms[t] = np.linalg.norm(d_new[0], axis=1).mean()
                dx, d_prev = self._cell_backward(k, caches[k][t], tuple(np.where(keep, d, 0.0) for d in d_new), grads)
                d_inputs[:, t] = dx
                # a padded step did not touch the state: its gradient flows straight on to step t - 1
                d_state = tuple(np.where(keep, dp, dn) for dp, dn in zip(d_prev, d_new))
            d_outputs = d_inputs  # the gradient of the outputs of the layer below
        np.add.at(grads["model.embeddings.weight"], ids[mask], d_outputs[mask])  # rows of the characters read
        return grads, norms

    def truncated_bptt(self, input_ids, chunk_size: int, max_norm: float | None = None, initial_state=None):
        """Truncated BPTT over chunks of `chunk_size` steps, as char-rnn trains: each chunk starts from the previous
        chunk's final state, but no gradient crosses a chunk boundary. Returns [(loss, grads, norm before clipping)]
        per chunk (one optimizer step each), the gradients clipped to `max_norm` when given."""
        ids = np.asarray(input_ids)
        state, results = initial_state, []
        for start in range(0, ids.shape[1] - 1, chunk_size):
            chunk = ids[:, start : start + chunk_size + 1]  # inputs chunk[:, :-1], targets chunk[:, 1:]
            mask = np.ones(chunk.shape, bool)
            mask[:, -1] = False  # the last element is only a target: it must not advance the state
            loss, grads, state = self.loss_and_grads(chunk, chunk, mask, initial_state=state, return_state=True)
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
            if max_norm is not None:
                grads, norm = clip_grads_by_global_norm(grads, max_norm)
            results.append((loss, grads, norm))
        return results

    def hidden_grad_norms(self, input_ids, layer: int = 0) -> np.ndarray:
        """‖dL/dh_t‖ (mean over the batch) at every step t of `layer`, where L is the loss of the LAST prediction
        only: how much of one output's gradient reaches back to earlier steps (vanishing or exploding gradients)."""
        ids = np.asarray(input_ids)
        labels = np.full(ids.shape, -100)
        labels[:, -1] = ids[:, -1]
        logits, final_state, run = self._run(ids)
        _, d_logits = self._cross_entropy(logits, labels)
        return self._backward(run, d_logits, final_state, record_layer=layer)[1]


def gradient_flow_demo(tokenizer_size: int = 67, hidden_size: int = 64, steps: int = 61, batch: int = 8,
                       seed: int = 0, max_norm: float = 1.0) -> list[dict]:
    """Vanishing and exploding gradients, measured with this file's BPTT on freshly initialized one-layer models.

    For each model: `norms_back[k]` = ‖dL/dh‖ k steps before the last prediction (L: loss of that prediction only),
    `grad_norm` = global norm of all parameter gradients of a full-sequence loss, `clipped_norm` = the same after
    clipping to `max_norm` (what `--max_grad_norm` does)."""
    import torch

    from .configuration_char_lstm import CharLSTMConfig
    from .modeling_char_lstm import CharLSTMForCausalLM

    def build(cell_type, forget_bias=0.0, pytorch_init=False, recurrent_scale=1.0):
        torch.manual_seed(seed)
        config = CharLSTMConfig(vocab_size=tokenizer_size, embedding_size=16, hidden_size=hidden_size,
                                num_hidden_layers=1, dropout=0.0, cell_type=cell_type, forget_bias=forget_bias)
        model = CharLSTMForCausalLM(config)
        rnn = model.model.layers[0]
        if pytorch_init:
            rnn.reset_parameters()
        with torch.no_grad():
            rnn.weight_hh_l0.mul_(recurrent_scale)
        return NumpyCharLSTM.from_model(model)

    models = {
        "rnn, PyTorch default init": build("rnn", pytorch_init=True),
        "rnn, orthogonal init": build("rnn"),
        "rnn, recurrent weights x3": build("rnn", recurrent_scale=3.0),
        "gru": build("gru"),
        "lstm, forget bias 0": build("lstm", 0.0),
        "lstm, forget bias 1": build("lstm", 1.0),
        "lstm, forget bias 3": build("lstm", 3.0),
    }
    ids = np.random.default_rng(seed).integers(2, tokenizer_size, size=(batch, steps))
    rows = []
    for name, ref in models.items():
        norms = ref.hidden_grad_norms(ids)
        _, grads = ref.loss_and_grads(ids, ids)
        clipped, total = clip_grads_by_global_norm(grads, max_norm)
        clipped_total = math.sqrt(sum(float(np.sum(g * g)) for g in clipped.values()))
        rows.append({"model": name, "norms_back": norms[-2::-1].tolist(), "grad_norm": total,
                     "clipped_norm": clipped_total})
    return rows


def plot_gradient_flow(rows: list[dict], path: str, max_norm: float = 1.0) -> None:
    """Draw `gradient_flow_demo`'s rows into the PNG `path`: ‖dL/dh‖ against steps back on a log scale, one line per
    model (left), and each model's global gradient norm before and after clipping at `max_norm` (right)."""
    from matplotlib.figure import Figure  # matplotlib's file renderer: no display, no pyplot state

    colors = {"rnn, PyTorch default init": "0.55", "rnn, orthogonal init": "0.2", "rnn, recurrent weights x3": "red",
              "gru": "tab:purple", "lstm, forget bias 0": "#9ecae1", "lstm, forget bias 1": "#4292c6",
              "lstm, forget bias 3": "#08306b"}
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    flow, norms = fig.subplots(1, 2, width_ratios=(3, 2))
    for row in rows:
        back = np.arange(len(row["norms_back"]))
        flow.semilogy(back, row["norms_back"], color=colors.get(row["model"]), linewidth=1.8, label=row["model"])
    flow.set_xlabel("steps back from the predicted character (k)")
    flow.set_ylabel("‖dL/dh‖ at k steps back (log scale)")
    flow.set_title("How much of the last prediction's gradient reaches earlier states", fontsize=10)
    flow.grid(True, which="major", alpha=0.3)
    flow.legend(fontsize=8, loc="lower left")

    y = np.arange(len(rows))
    norms.barh(y - 0.2, [row["grad_norm"] for row in rows], height=0.4, color="0.6", label="before clipping")
    norms.barh(y + 0.2, [row["clipped_norm"] for row in rows], height=0.4, color="tab:blue",
               label=f"after clipping at {max_norm:g}")
    norms.axvline(max_norm, color="black", linestyle="--", linewidth=1)
    norms.set_xscale("log")
    norms.set_yticks(y, [row["model"] for row in rows], fontsize=8)
    norms.invert_yaxis()
    norms.set_xlabel("gradient norm, whole-sequence loss (log)")
    norms.set_title("Exploding gradients and clipping", fontsize=10)
    norms.grid(True, axis="x", alpha=0.3)
    norms.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=80)


# ---------------------------------------------------------------------------------------------------------------------
# The cells, one class each, named by the registry (`cells_char_lstm.CELLS[name].oracle`). forward(a_ih, a_hh, state,
# H): the pre-activations x W_ih^T + b_ih and h W_hh^T + b_hh (B, G*H) and the state -> (new state, cache);
# backward(cache, d_state) -> (dL/da_ih, dL/da_hh, the state gradients that bypass W_hh: added to dL/dh_prev, then
# the others)


class NumpyLSTMCell:
    """The LSTM, gates (input, forget, cell, output) as PyTorch lays them out."""

    num_states = 2

    @staticmethod
    def forward(a_ih, a_hh, state, H):
        a = a_ih + a_hh
        i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 3 * H:])
        g = np.tanh(a[:, 2 * H:3 * H])
        c_new = f * state[1] + i * g  # the cell keeps (f) part of its memory and writes (i) new content (g)
        tanh_c = np.tanh(c_new)
        h_new = o * tanh_c  # the output gate decides what of the memory is shown
        return (h_new, c_new), {"c": state[1], "i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c}

    @staticmethod
    def backward(cache, d_state):
        dh, dc = d_state
        i, f, g, o, tanh_c = cache["i"], cache["f"], cache["g"], cache["o"], cache["tanh_c"]
        do = dh * tanh_c  # h = o * tanh(c)
        dc = dc + dh * o * (1.0 - tanh_c ** 2)  # ... and through tanh(c) into the cell
        di, dg, df = dc * g, dc * i, dc * cache["c"]  # c = f * c_prev + i * g
        # back through the gate nonlinearities
        da = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g ** 2), do * o * (1 - o)], axis=1)
        # the cell path: multiplied by the forget gate only (why LSTMs keep gradients alive)
        return da, da, (0.0, dc * f)


class NumpyGRUCell:
    """The GRU, gates (reset, update, new) as PyTorch lays them out."""

    num_states = 1

    @staticmethod
    def forward(a_ih, a_hh, state, H):
        h = state[0]
        r = sigmoid(a_ih[:, :H] + a_hh[:, :H])
        z = sigmoid(a_ih[:, H:2 * H] + a_hh[:, H:2 * H])
        hn = a_hh[:, 2 * H:]
        n = np.tanh(a_ih[:, 2 * H:] + r * hn)  # candidate state: the reset gate scales the hidden contribution
        h_new = (1.0 - z) * n + z * h  # the update gate interpolates between old state and candidate
        return (h_new,), {"r": r, "z": z, "n": n, "hn": hn}

    @staticmethod
    def backward(cache, d_state):
        (dh,) = d_state
        r, z, n, hn, h = cache["r"], cache["z"], cache["n"], cache["hn"], cache["h"]
        dn = dh * (1.0 - z)  # h_new = (1 - z) * n + z * h
        dz = dh * (h - n)
        dan = dn * (1.0 - n ** 2)  # n = tanh(ax_n + r * hn)
        dar, daz = dan * hn * r * (1 - r), dz * z * (1 - z)
        # the hidden part of n is scaled by r; h reaches h_new directly through z
        return np.concatenate([dar, daz, dan], axis=1), np.concatenate([dar, daz, dan * r], axis=1), (dh * z,)


class NumpyRNNCell:
    """The Elman RNN with tanh."""

    num_states = 1

    @staticmethod
    def forward(a_ih, a_hh, state, H):
        h_new = np.tanh(a_ih + a_hh)
        return (h_new,), {"h_new": h_new}

    @staticmethod
    def backward(cache, d_state):
        da = d_state[0] * (1.0 - cache["h_new"] ** 2)  # h_new = tanh(a)
        return da, da, (0.0,)


# Each registered cell's class, named by its registry entry (a cell without one fails here, on import)
ORACLES = {name: globals()[cell.oracle] for name, cell in CELLS.items()}
