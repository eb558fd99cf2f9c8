"""Hugging Face ``transformers`` models as a user would train them, from tiny random configs (nothing downloaded).

Each LightningModule holds the model as ``self.model``, defines no ``forward`` and calls the model in its step, with
an attention mask, either with the model's own ``labels=`` loss or with a loss computed in the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.utils.data import TensorDataset

VOCAB, LENGTH = 48, 12
FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert", "t5")


def build(family: str) -> torch.nn.Module:
    """A tiny randomly initialised model of ``family``, without dropout (the reference and the pipeline draw their
    dropout masks from different random streams)."""
    import transformers as tf

    # "-untied": the output layer gets its own weight (the asynchronous policies need that)
    family, untied = family.removesuffix("-untied"), family.endswith("-untied")
    tie = {"tie_word_embeddings": False} if untied else {}
    small = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    if family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **tie,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(config)  # input and output embeddings tied
    if family == "llama":
        config = tf.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return tf.LlamaForCausalLM(config)
    if family == "qwen2":
        config = tf.Qwen2Config(**small, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return tf.Qwen2ForCausalLM(config)
    if family == "mistral":
        config = tf.MistralConfig(**small, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        return tf.MistralForCausalLM(config)
    if family == "bert":
        config = tf.BertConfig(
            **small, num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3,
        )  # fmt: skip
        return tf.BertForSequenceClassification(config)
    if family == "t5":
        config = tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **tie,
        )  # fmt: skip
        return tf.T5ForConditionalGeneration(config)  # encoder, decoder and head share one embedding
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_data(samples: int, seed: int = 0) -> TensorDataset:
    """Token sequences with a learnable rule (each token is the previous one plus one, modulo the vocabulary),
    their attention masks (the last tokens of some rows are padding) and a class per row (the first token mod 3)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (samples, 1), generator=g)
    ids = (start + torch.arange(LENGTH)) % (VOCAB - 1) + 1
    lengths = torch.randint(LENGTH - 3, LENGTH + 1, (samples, 1), generator=g)
    mask = (torch.arange(LENGTH) < lengths).long()
    return TensorDataset(ids * mask, mask, start[:, 0] % 3)


class HFModule(LightningModule):
    """Trains ``self.model`` with its own loss (``loss="model"``: ``labels=`` passed to the model) or with a loss
    computed here (``loss="step"``)."""

    def __init__(self, family: str, loss: str = "model", lr: float = 0.05) -> None:
        super().__init__()
        self.family, self.loss_from, self.lr = family, loss, lr
        self.model = build(family)

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, mask, label = batch
        if self.family == "bert":
            if self.loss_from == "model":
                return self.model(input_ids=ids, attention_mask=mask, labels=label).loss
            return F.cross_entropy(self.model(input_ids=ids, attention_mask=mask).logits, label)
        targets = ids.masked_fill(mask == 0, -100)
        if self.family == "t5":  # the encoder reads the sequence, the decoder writes it again
            if self.loss_from == "model":
                return self.model(input_ids=ids, attention_mask=mask, labels=targets).loss
            out = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=self.model._shift_right(targets))
            return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if self.loss_from == "model":
            return self.model(input_ids=ids, attention_mask=mask, labels=targets).loss
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
