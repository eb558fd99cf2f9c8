"""A small GPT language model, pipeline-parallel over CPU processes.

``GPT`` is an ordinary decoder-only transformer (``nn.ModuleList`` of blocks, residual additions in plain
``forward`` code) written as for one device; the only pipeline-specific choice is the Trainer's ``strategy``.
Without ``--text`` the tokens are generated (a fixed sparse Markov chain over 65 symbols, so the loss has
something to fall to); ``--text file.txt`` trains a character-level model on a local UTF-8 file instead.

    python examples/gpt.py                                  # gpipe, 2 stages
    python examples/gpt.py --schedule timeprest_v --devices 3
    python examples/gpt.py --schedule auto --devices 1      # plain single-device training
"""

from __future__ import annotations

import argparse
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import lightning_timeprest  # importing it registers the strategy names ("gpipe", "1f1b", "timeprest_v", ...)

__all__ = [
    "GPT",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "GPTLanguageModel",
    "TextDataModule",
    "make_markov_tokens",
]

GENERATED_VOCAB_SIZE = 65  # as many symbols as the characters of tiny-shakespeare, GPTLanguageModel's default


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``.

    Dropout is an ``nn.Dropout`` module on the output projection, not SDPA's ``dropout_p``: a module follows
    ``train()``/``eval()`` by itself, where a functional dropout would have to branch on ``self.training``.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # (B, T, C) -> three (B, heads, T, C / heads); no Python use of B, so the batch dim stays dynamic
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    """The transformer's position-wise feed-forward layer (4x wide, GELU)."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-style decoder-only language model: ``forward(idx)`` maps tokens (B, T) to logits (B, T, vocab).

    The input embedding ``wte`` and the output ``lm_head`` are separate weights. GPT-2 ties them, but a pipeline
    puts the two on the first and the last stage, and the asynchronous policies (timeprest_v, timeprest_i, ...)
    update each stage at its own time, so they refuse parameters tied across stages.

    Args:
        vocab_size: number of token ids.
        block_size: the longest sequence (the positional embedding's length).
        n_layer, n_head, n_embd: transformer depth, attention heads, and width.
        dropout: dropout after the embeddings and inside every block.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the projections that add to the residual stream shrink with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPTLanguageModel(LightningModule):
    """An ordinary LightningModule training ``GPT`` on next-token prediction; it knows nothing of pipelines."""

    def __init__(
        self,
        vocab_size: int = GENERATED_VOCAB_SIZE,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.1,
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout)

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def make_markov_tokens(
    num_sequences: int, length: int, vocab_size: int = GENERATED_VOCAB_SIZE, branching: int = 4, seed: int = 0
) -> Tensor:
    """``num_sequences`` token sequences of ``length`` from a fixed random sparse Markov chain.

    Each token may be followed by only ``branching`` others, with random probabilities, so the best possible
    loss is at most ``log(branching)`` against ``log(vocab_size)`` for guessing: a model that learns the
    transitions shows it clearly. Deterministic from ``seed`` (the chain too).
    """
    g = torch.Generator().manual_seed(seed)
    successors = torch.rand(vocab_size, vocab_size, generator=g).argsort(dim=1)[:, :branching]
    weights = torch.rand(vocab_size, branching, generator=g) + 0.1
    transitions = torch.zeros(vocab_size, vocab_size).scatter_(1, successors, weights / weights.sum(1, True))
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (num_sequences,), generator=g)
    for i in range(1, length):
        tokens[:, i] = torch.multinomial(transitions[tokens[:, i - 1]], 1, generator=g).squeeze(1)
    return tokens


class TextDataModule(LightningDataModule):
    """Next-token windows ``(x, y = x shifted by one)`` of ``block_size`` tokens, split 90/10 (seeded).

    With ``path``: character-level tokens of a local UTF-8 text file (the vocabulary is its sorted characters),
    cut into consecutive windows of ``block_size + 1`` characters that overlap by one, so an epoch predicts each
    character once. Without: ``num_sequences`` generated ``make_markov_tokens`` windows over 65 symbols.

    Args:
        path: a UTF-8 text file, or ``None`` to generate tokens.
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        num_sequences: generated data only: how many windows.
        seed: the generated data's and the split's seed.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        num_sequences: int = 2000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    @cached_property
    def vocabulary(self) -> list[str] | None:
        """The text file's sorted characters (``None`` for generated data); token ``i`` is ``vocabulary[i]``."""
        if self.hparams.path is None:
            return None
        return sorted(set(self._text))

    @property
    def vocab_size(self) -> int:
        """Token ids in use, to build the model with: read from the file, before ``setup`` if need be."""
        return GENERATED_VOCAB_SIZE if self.vocabulary is None else len(self.vocabulary)

    @cached_property
    def _text(self) -> str:
        return Path(self.hparams.path).expanduser().read_text(encoding="utf-8")

    def _windows(self) -> Tensor:
        hp = self.hparams
        if self.vocabulary is None:
            return make_markov_tokens(hp.num_sequences, hp.block_size + 1, seed=hp.seed)
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        tokens = torch.tensor([index[ch] for ch in self._text], dtype=torch.long)
        windows = tokens.unfold(0, hp.block_size + 1, hp.block_size)
        if len(windows) < 2:
            raise ValueError(
                f"{hp.path} has {len(tokens)} characters: a train and a validation window of block_size + 1 = "
                f"{hp.block_size + 1} need at least {2 * hp.block_size + 1}"
            )
        return windows

    def setup(self, stage: str) -> None:
        windows = self._windows()
        dataset = TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
        num_val = max(1, round(0.1 * len(dataset)))
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set = random_split(dataset, [len(dataset) - num_val, num_val], generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)


def main() -> None:
    from summary import print_summary  # examples/summary.py, beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="gpipe", help="a pipeline schedule, or 'auto' for one device")
    parser.add_argument("--devices", type=int, default=2, help="pipeline stages (one process each)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text", default=None, help="a UTF-8 text file to train a character-level model on")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--num-microbatches", type=int, default=None, help="micro-batches per batch")
    args = parser.parse_args()

    seed_everything(0)
    data = TextDataModule(args.text, block_size=args.block_size, batch_size=args.batch_size)
    model = GPTLanguageModel(
        vocab_size=data.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd
    )
    strategy: Any = args.schedule
    if args.num_microbatches is not None:
        strategy = lightning_timeprest.TiMePReStStrategy(schedule=args.schedule, num_microbatches=args.num_microbatches)
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    print_summary(
        trainer,
        f"{args.devices} stages, schedule {args.schedule}",
        f" (uniform guess: {math.log(data.vocab_size):.4f})",
    )


if __name__ == "__main__":
    main()
