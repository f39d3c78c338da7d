"""The output heads (heads_char_lstm.py): the adaptive softmax head of large vocabularies (training, scoring, greedy
choice, draws) and logits_at_targets; generate() through the adaptive head is in test_generation_char_lstm.py."""

import pytest
import torch
import torch.nn.functional as F

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM
from char_lstm.heads_char_lstm import _adaptive_argmax, _adaptive_sample
from helpers import adaptive_model, chi_square


# ---------------------------------------------------------------------------------------------------------------------
# Large vocabularies: the adaptive softmax head


def test_adaptive_softmax_trains_on_the_target_clusters_and_scores_with_full_log_probabilities():
    model = adaptive_model()
    ids = torch.randint(0, 300, (4, 30), generator=torch.Generator().manual_seed(1))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)  # training computes only the targets' clusters
    out.loss.backward()
    assert all(p.grad is not None for p in model.model.parameters())
    model.eval()
    with torch.no_grad():
        scored = model(input_ids=ids, labels=ids)
        log_probs = model.lm_head.log_prob(model.model(input_ids=ids).last_hidden_state.reshape(-1, 32))
    assert scored.logits.shape == (4, 30, 300)
    assert torch.allclose(torch.logsumexp(scored.logits, dim=-1), torch.zeros(4, 30), atol=1e-5)
    assert torch.allclose(scored.logits.reshape(-1, 300), log_probs)
    targets = ids[:, 1:].reshape(-1)
    nll = -scored.logits[:, :-1].reshape(-1, 300).gather(1, targets[:, None]).mean()
    assert torch.allclose(scored.loss, nll, atol=1e-5)
    with pytest.raises(ValueError, match="adaptive_softmax_cutoffs must be increasing ids"):
        CharLSTMConfig(vocab_size=50, adaptive_softmax_cutoffs=[40, 10])
    with pytest.raises(ValueError, match="needs the linear output layer"):
        CharLSTMConfig(vocab_size=50, embedding_size=8, hidden_size=8, tie_word_embeddings=True,
                       adaptive_softmax_cutoffs=[10])


def test_adaptive_softmax_greedy_choice_equals_the_argmax_of_the_full_distribution():
    torch.manual_seed(0)
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 60, [8, 30], div_value=2.0).eval()
    with torch.no_grad():
        head.head.weight[8:] *= 3  # the clusters' entries often beat the shortlist's best character
        hidden = torch.randn(4000, 16) * 2
        full = head.log_prob(hidden).argmax(dim=1)
        chosen = _adaptive_argmax(head, hidden)
    assert torch.equal(chosen, full)
    assert (full < 8).any() and ((full >= 8) & (full < 30)).any() and (full >= 30).any()


@pytest.mark.parametrize("temperature", [0.3, 0.8, 1.0, 1.7])
@pytest.mark.parametrize("clusters", ["peaked", "flat"])
def test_adaptive_softmax_draws_follow_the_tempered_full_distribution(temperature, clusters):
    """The hierarchical draw against softmax(log_prob / T) over 200k rows. "flat": the clusters hold most of the mass,
    spread evenly, so at low temperatures their tempered masses are small and most proposals are rejected (rows then
    draw from all clusters at once)."""
    torch.manual_seed(1)
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 40, [6, 20], div_value=2.0).eval()
    hidden = torch.randn(1, 16) * 2
    with torch.no_grad():
        if clusters == "flat":
            head.head.weight[6:] = hidden[0] / hidden.norm() ** 2 * 4  # each cluster's entry: e^4 times a character's
            for tail in head.tail:
                tail[1].weight.zero_()
        expected = torch.softmax(head.log_prob(hidden)[0] / temperature, dim=0)
        drawn = _adaptive_sample(head, hidden.expand(200_000, -1), temperature)
    statistic, freedom = chi_square(torch.bincount(drawn, minlength=40), expected)
    assert statistic < freedom + 6 * (2 * freedom) ** 0.5, (statistic, freedom)  # chi-square: mean k, sd sqrt(2k)


# ---------------------------------------------------------------------------------------------------------------------
# logits_at_targets: the log-probabilities of the labels only, with the linear and the adaptive head


@pytest.mark.parametrize("head", ["linear", "adaptive"])
def test_logits_at_targets_are_the_log_probabilities_of_the_next_labels(head):
    model = adaptive_model() if head == "adaptive" else CharLSTMForCausalLM(
        CharLSTMConfig(vocab_size=300, embedding_size=16, hidden_size=32, unk_token_id=1, eos_token_id=2,
                       bos_token_id=2))
    model.eval()
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels)
        at_targets = model(input_ids=ids, labels=labels, logits_at_targets=True)
        shifted = model(input_ids=ids, shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:], logits_at_targets=True)
    log_probs = torch.log_softmax(full.logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = labels[:, 1:] != -100
    assert at_targets.logits.shape == (3, 20)
    assert torch.allclose(at_targets.logits[:, :-1][scored], log_probs[scored], atol=1e-5)
    assert torch.all(at_targets.logits[:, :-1][~scored] == 0) and torch.all(at_targets.logits[:, -1] == 0)
    assert torch.allclose(at_targets.loss, full.loss, atol=1e-6)
    assert torch.equal(shifted.logits, at_targets.logits) and torch.allclose(shifted.loss, full.loss, atol=1e-6)
    with pytest.raises(ValueError, match="logits_at_targets=True needs labels"):
        model(input_ids=ids, logits_at_targets=True)
