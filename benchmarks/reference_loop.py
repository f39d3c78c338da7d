"""The reference PyTorch loop: the course's plain-PyTorch code (its dataset, model, training step and generate loop),
re-implemented as the baseline the benchmarks compare char_lstm with.

Kept as close to that code's behaviour as possible (per-character dict lookups in `__getitem__`, one multi-layer
`nn.LSTM`, the manual zero_grad/forward/backward/clip/step, one `model(x, hidden)` call per generated character):
it is the yardstick, not code to use. It touches char_lstm only to copy a `CharLSTMForCausalLM`'s weights.
"""

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from char_lstm import CharLSTMForCausalLM


class ReferenceCharDataset(Dataset):
    """Every item is cut from the text and mapped character by character when it is read."""

    def __init__(self, text: str, seq_length: int, char_to_idx: dict[str, int]):
        self.text, self.seq_length, self.char_to_idx = text, seq_length, char_to_idx

    def __len__(self):
        return len(self.text) - self.seq_length

    def __getitem__(self, idx):
        chunk = self.text[idx : idx + self.seq_length + 1]
        return (
            torch.tensor([self.char_to_idx[c] for c in chunk[:-1]]),
            torch.tensor([self.char_to_idx[c] for c in chunk[1:]]),
        )


class ReferenceCharLSTM(nn.Module):
    """Embedding, one multi-layer `nn.LSTM` (dropout between layers), dropout, linear head."""

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.embedding = nn.Embedding(vocab_size, embed_size)
        between_layers = dropout if num_layers > 1 else 0
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True, dropout=between_layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, hidden=None):
        output, hidden = self.lstm(self.embedding(x), hidden)
        return self.fc(self.dropout(output)), hidden

    def init_hidden(self, batch_size: int, device):
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        return (zeros, zeros.clone())

    @classmethod
    def from_char_lstm(cls, model: CharLSTMForCausalLM) -> "ReferenceCharLSTM":
        """The reference model holding the weights of `model` (same function: the layers are stacked into one
        module)."""
        config = model.config
        reference = cls(config.vocab_size, config.embedding_size, config.hidden_size, config.num_hidden_layers,
                        config.dropout)
        state = {"embedding.weight": model.model.embeddings.weight, "fc.weight": model.lm_head.weight,
                 "fc.bias": model.lm_head.bias}
        for index, layer in enumerate(model.model.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                state[f"lstm.{name}_l{index}"] = getattr(layer, f"{name}_l0")
        reference.load_state_dict({key: value.detach().clone() for key, value in state.items()})
        return reference.to(model.device)


def reference_generate(model: ReferenceCharLSTM, prompts: torch.Tensor, length: int, temperature: float = 0.8
                       ) -> torch.Tensor:
    """The reference generate loop (prompt one character per call, then one call per new character), on a batch of
    prompts (B, P): the course's code with `batch_size` rows instead of 1. Returns (B, P + length)."""
    model.eval()
    with torch.no_grad():
        hidden = model.init_hidden(prompts.shape[0], prompts.device)
        for t in range(prompts.shape[1] - 1):
            _, hidden = model(prompts[:, t : t + 1], hidden)
        x, generated = prompts[:, -1:], [prompts]
        for _ in range(length):
            logits, hidden = model(x, hidden)
            if temperature == 0:
                x = logits[:, -1].argmax(dim=-1, keepdim=True)
            else:
                x = torch.multinomial(torch.softmax(logits[:, -1] / temperature, dim=-1), 1)
            generated.append(x)
    return torch.cat(generated, dim=1)


def reference_training_intervals(model: ReferenceCharLSTM, dataset: ReferenceCharDataset, batch_size: int,
                                 steps: int, device) -> list[float]:
    """Wall seconds between the ends of `steps` + 1 consecutive steps of the reference training loop (a shuffled
    `DataLoader`, Adam at 2e-3, clipping at 1.0, the loss read back every step as the course's loop does)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    criterion = nn.CrossEntropyLoss()
    intervals, last = [], None
    for index, (inputs, targets) in enumerate(loader):
        if index == steps + 1:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        hidden = model.init_hidden(inputs.size(0), device)
        optimizer.zero_grad()
        outputs, _ = model(inputs, hidden)
        loss = criterion(outputs.view(-1, outputs.size(-1)), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()  # the course's loop accumulates the loss as a Python float every step
        now = time.perf_counter()
        if last is not None:
            intervals.append(now - last)
        last = now
    return intervals
