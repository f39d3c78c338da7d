"""The output heads of CharLSTM: the loss, the log-probabilities at the targets, and the adaptive softmax
(Grave et al., 2017) in training, evaluation and decoding.

This file is shipped to the Hub with `modeling_char_lstm.py` (``trust_remote_code``) and imports only torch and its
siblings. The linear head's loss is transformers' own (`model.loss_function`); the losses here are reduced the same
way (`_causal_lm_loss`).

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``V`` vocabulary size.
"""

import torch
from torch import nn

from .internals_char_lstm import TemperatureLogitsWarper


# ---------------------------------------------------------------------------------------------------------------------
# Losses and the log-probabilities at the targets


def _causal_lm_loss(nll: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The loss from the negative log-likelihoods of the scored positions, reduced as transformers' causal-LM loss: a
    sum over `num_items_in_batch` when Trainer passes it, else the mean."""
    if num_items_in_batch is not None:
        return nll.sum() / torch.as_tensor(num_items_in_batch, device=nll.device)
    return nll.mean()


def _adaptive_logits_and_loss(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, labels: torch.Tensor | None,
                              training: bool, shift_labels=None, num_items_in_batch=None, ignore_index: int = -100):
    """(logits, loss) of the adaptive softmax `head` from the last hidden states (B, T, H). Training (`training`, with
    autograd) with labels: only the clusters of the targets are computed (the head's own loss path) and no logits are
    returned (None); otherwise the logits are the full log-probabilities (B, T, V) and the loss, when asked for, their
    negative at the targets. The loss is reduced as transformers' causal-LM loss (a sum over `num_items_in_batch` when
    Trainer passes it, else the mean)."""
    if labels is not None and training and torch.is_grad_enabled():
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        keep = targets != ignore_index
        nll = -head(hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]).output
        return None, _causal_lm_loss(nll, num_items_in_batch)
    batch, length = hidden.shape[:2]
    logits = head.log_prob(hidden.reshape(batch * length, -1)).view(batch, length, -1)
    loss = None
    if labels is not None:  # the log-probabilities at the targets: no second log-softmax over the vocabulary
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
        targets = shift_labels.to(logits.device)
        keep = targets != ignore_index
        nll = -logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
        loss = _causal_lm_loss(nll, num_items_in_batch)
    return logits, loss


def _target_log_probs(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels=None,
                      num_items_in_batch=None, ignore_index: int = -100):
    """(log-probabilities of the labels (B, T) in float32, loss) from the last hidden states (B, T, H), for
    `logits_at_targets=True`: an adaptive softmax computes its head and the labels' clusters only (the head's own
    target path), a linear head its logits. Positions without a label get 0. The loss is reduced as
    transformers' causal-LM loss."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("logits_at_targets=True needs labels (or shift_labels): it returns the "
                             "log-probabilities of the labels.")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    targets = shift_labels.to(hidden.device)
    keep = targets != ignore_index
    if isinstance(head, nn.AdaptiveLogSoftmaxWithLoss):
        log_probs = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        if labels is not None and bool(keep[:, :-1].all()):  # every position but the last: no gather
            log_probs[:, :-1] = head(hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                      targets[:, :-1].reshape(-1)).output.view(-1, targets.shape[1] - 1)
        else:
            log_probs[keep] = head(hidden[keep], targets[keep]).output.float()
    else:
        log_probs = -nn.functional.cross_entropy(head(hidden).float().transpose(1, 2), targets,
                                                 ignore_index=ignore_index, reduction="none")
    return log_probs, _causal_lm_loss(-log_probs[keep], num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding with an adaptive softmax


# The adaptive softmax's next token without its full distribution. Its log-probabilities are a head over the
# shortlist and one entry per cluster, plus each cluster's own log-softmax: log p(x) = head[c] + cluster_c[x] for a
# character x of cluster c. The full distribution (`log_prob`) and a draw over all of it (`torch.multinomial` draws
# one exponential variate per class) cost more than the recurrent step at 6k characters; a draw from the head and
# then, when it names a cluster, from that cluster alone costs a fraction of it.

_REJECTION_ROUNDS = 4  # of the draw below for temperatures <= 1; rows still without a token are drawn exactly


def _hierarchical_temperature(head: nn.Module, logits_processor, do_sample: bool) -> float | None:
    """How `_adaptive_next_tokens` may choose for an adaptive softmax `head`: 0.0 greedy (no logits processor), the
    temperature of sampling whose only processor is transformers' `TemperatureLogitsWarper` (1.0 with none), or None:
    the full distribution through the processors (any other processor, a linear head, or an adaptive one without the
    attributes read)."""
    if not isinstance(head, nn.AdaptiveLogSoftmaxWithLoss) or not all(
        hasattr(head, name) for name in ("head", "tail", "cutoffs", "shortlist_size")
    ):
        return None
    if not do_sample:
        return 0.0 if len(logits_processor) == 0 else None
    if len(logits_processor) == 0:
        return 1.0
    if len(logits_processor) > 1 or TemperatureLogitsWarper is None:
        return None
    processor = logits_processor[0]
    temperature = getattr(processor, "temperature", None)
    if type(processor) is not TemperatureLogitsWarper or not isinstance(temperature, (int, float)) or temperature <= 0:
        return None
    return float(temperature)


def _adaptive_argmax(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor) -> torch.Tensor:
    """The argmax of `head.log_prob(hidden)` (B, H) -> (B,), bit for bit (the same operations on the same rows), with a
    cluster computed only when its head entry beats the best shortlist character of some row: a character of cluster c
    scores head[c] + cluster_c[x] <= head[c]. Ties go to the lower id, as `torch.argmax` does."""
    head_log_prob = nn.functional.log_softmax(head.head(hidden), dim=1)
    shortlist = head.shortlist_size
    best = head_log_prob[:, :shortlist].argmax(dim=1)
    best_value = head_log_prob.gather(1, best.unsqueeze(1))
    if not bool((head_log_prob[:, shortlist:] > best_value).any()):
        return best
    best_value = best_value.squeeze(1)
    for cluster, (start, _) in enumerate(zip(head.cutoffs, head.cutoffs[1:])):
        bound = head_log_prob[:, shortlist + cluster]
        if not bool((bound > best_value).any()):
            continue
        log_prob = nn.functional.log_softmax(head.tail[cluster](hidden), dim=1) + bound.unsqueeze(1)
        index = log_prob.argmax(dim=1)
        value = log_prob.gather(1, index.unsqueeze(1)).squeeze(1)
        better = value > best_value
        best = torch.where(better, index + start, best)
        best_value = torch.where(better, value, best_value)
    return best


def _tempered_cluster(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, cluster: int, temperature: float):
    """p(x|c)^(1/T) for the characters x of cluster c (rows, size of the cluster), in float32: their sum, the cluster's
    tempered mass, is <= 1 at temperatures <= 1."""
    log_prob = nn.functional.log_softmax(head.tail[cluster](hidden).float(), dim=1)
    return (log_prob / temperature).exp()


def _draw(weights: torch.Tensor) -> torch.Tensor:
    """One draw per row (R, n) -> (R,) with probabilities proportional to `weights` (>= 0, not normalized): the first
    cumulative weight above a uniform draw times the row's total (one random number per row)."""
    cumulative = weights.cumsum(dim=1)
    threshold = torch.rand(len(weights), 1, device=weights.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, threshold, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


def _draw_in_clusters(head, hidden, entries, rows, tokens, temperature, clusters=None) -> torch.Tensor:
    """For the rows (R,) whose head entry (R,) is a cluster: a character of that cluster into `tokens`. `clusters`:
    each cluster's `_tempered_cluster` for all rows of `hidden`, which are then kept; without them, each is computed
    for its rows, and a row keeps its character with probability the cluster's tempered mass (<= 1 at temperatures
    <= 1). Returns the rows that did not keep one."""
    rejected = []
    for cluster, (start, _) in enumerate(zip(head.cutoffs, head.cutoffs[1:])):
        picked = entries == head.shortlist_size + cluster
        if not bool(picked.any()):
            continue
        cluster_rows = rows[picked]
        if clusters is not None:
            tokens[cluster_rows] = _draw(clusters[cluster][cluster_rows]) + start
            continue
        weights = _tempered_cluster(head, hidden[cluster_rows], cluster, temperature)
        kept = torch.rand(len(cluster_rows), device=weights.device) < weights.sum(dim=1)
        rejected.append(cluster_rows[~kept])
        if bool(kept.any()):
            tokens[cluster_rows[kept]] = _draw(weights[kept]) + start
    return torch.cat(rejected) if rejected else rows[:0]


def _adaptive_sample(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """One draw per row (B, H) -> (B,) from softmax(head.log_prob(hidden) / temperature), exactly in distribution (not
    the draws of transformers' loop, which go through every class). A shortlist character or a cluster is drawn from
    the head's tempered probabilities, then a character from the cluster's tempered distribution. At temperatures <= 1
    that proposal is kept with probability the cluster's tempered mass sum_x p(x|c)^(1/T) (<= 1), which makes the draw
    exact; a rejected row draws again, and after a few rounds exactly from all clusters (what higher temperatures do
    at once: each cluster's head entry then carries the cluster's tempered mass)."""
    head_weights = nn.functional.softmax(head.head(hidden).float() / temperature, dim=1)
    shortlist = head.shortlist_size
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    tokens = None
    for _ in range(_REJECTION_ROUNDS if temperature <= 1 else 0):
        entries = _draw(head_weights if tokens is None else head_weights[rows])
        if tokens is None:  # the first round: every row drew, most often a shortlist character
            if not bool((entries >= shortlist).any()):
                return entries
            tokens = entries.clone()
        else:
            tokens[rows] = entries  # the shortlist's characters; the clusters' are drawn next
        rows = _draw_in_clusters(head, hidden, entries, rows, tokens, temperature)
        if not len(rows):
            return tokens
    if tokens is None:
        tokens = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    hidden, head_weights = hidden[rows], head_weights[rows]
    clusters = [_tempered_cluster(head, hidden, cluster, temperature) for cluster in range(len(head.tail))]
    masses = torch.stack([weights.sum(dim=1) for weights in clusters], dim=1)
    entries = _draw(torch.cat([head_weights[:, :shortlist], head_weights[:, shortlist:] * masses], dim=1))
    drawn = entries.clone()
    _draw_in_clusters(head, hidden, entries, torch.arange(len(rows), device=rows.device), drawn, temperature, clusters)
    tokens[rows] = drawn
    return tokens


def _adaptive_next_tokens(head: nn.AdaptiveLogSoftmaxWithLoss, hidden: torch.Tensor, temperature: float):
    """The next token of each row (B,) from the last layer's output (B, H): temperature 0.0 is greedy
    (`_hierarchical_temperature`)."""
    return _adaptive_argmax(head, hidden) if temperature == 0.0 else _adaptive_sample(head, hidden, temperature)
