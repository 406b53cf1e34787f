"""A GPT written in plain PyTorch (nanoGPT-style: embeddings, an ``nn.ModuleList`` of blocks, final norm, head)
inside an ordinary LightningModule whose ``training_step`` computes the causal-LM loss from the logits: a user's
own model, with no plan shipped for it. It trains on ``tiny_hf.loader("llama", ...)`` batches (rows padded to
each batch's own longest, padding labelled -100)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 96, 64, 4, 2, 32
# The plan a user writes for it, paths relative to the LightningModule.
TENSOR_PLAN = {"model.blocks.*.q": "colwise", "model.blocks.*.k": "colwise", "model.blocks.*.v": "colwise",
               "model.blocks.*.proj": "rowwise", "model.blocks.*.up": "colwise", "model.blocks.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        normed = self.norm1(x)
        # -1, not HEADS: under tensor parallelism each rank holds HEADS / tp heads (colwise q, k, v).
        q, k, v = (linear(normed).view(batch, seq, -1, WIDTH // HEADS).transpose(1, 2)
                   for linear in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class GPTModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = GPT()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["input_ids"])
        # Token t predicts label t + 1: the labels shift here, in the user's code (a plan says so: shifted_labels).
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
