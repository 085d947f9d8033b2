"""An independent replica of the paper's public GAM_Model (docs/paper.md), written for the tests.

It is deliberately plain nn.Module code (nn.Conv1d padded by K-1 and sliced, matmul-softmax-matmul,
two sigmoid gates) and shares nothing with gam_ext, so that comparing the two checks gam_ext's math
and its checkpoint compatibility.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PaperBlock(nn.Module):
    """The paper's GAMBlock: its gated mixer's parameters live in the block, as in its state_dict."""

    def __init__(self, d_model: int, num_slots: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.causal_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size - 1, groups=d_model)
        self.memory_bank = nn.Parameter(torch.empty(num_slots, d_model))
        nn.init.xavier_uniform_(self.memory_bank)
        self.gate = nn.Linear(d_model, 2 * d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.ln2 = nn.LayerNorm(d_model)

    def mixer(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[1]
        local = self.causal_conv(h.permute(0, 2, 1))[..., :n].permute(0, 2, 1)
        scores = torch.matmul(h, self.memory_bank.t())
        glob = torch.matmul(F.softmax(scores, dim=-1), self.memory_bank)
        gate_local, gate_global = self.gate(h).chunk(2, dim=-1)
        return torch.sigmoid(gate_local) * local + torch.sigmoid(gate_global) * glob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class PaperModel(nn.Module):
    def __init__(
        self,
        vocab: int,
        block_size: int,
        d_model: int,
        n_layer: int,
        slots: int,
        kernel_size: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d_model)
        self.pos_embedding = nn.Embedding(block_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PaperBlock(d_model, slots, kernel_size, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.token_embedding.weight = self.head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
