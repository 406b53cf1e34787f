"""Causal-LM fine-tuning on chat data: readers, encoding with reply-only loss, rank-aware batches, the
LightningModule, greedy answers, recipe glue."""
