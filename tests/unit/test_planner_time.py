"""The planner's data-parallel time model follows what the strategy runs: the replicated mode is one bucketed
all-reduce of the gradients over the link the group spans, FSDP gathers in the compute dtype and reduces in
the stored one, and the search offers the replicated mode, taking it where it fits and is faster."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from lightning_mp.parallel.replicate import BUCKET_BYTES, FIRST_BUCKET_BYTES
from lightning_mp.planner import Cluster, Layout, choose, fullest_state_bytes, shape_from_config, step_time
from lightning_mp.planner.time import LATENCY_INTER_S, LATENCY_INTRA_S

LLAMA_1B = shape_from_config(LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8))
TINY = shape_from_config(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))


def data_seconds(shape, layout, cluster, precision):
    return step_time(shape, layout, cluster, global_batch=16, seq=1024, precision=precision).data_comm


def stored_bytes(shape, precision):
    return max(r["parameters"] for r in fullest_state_bytes(shape, Layout(8, 1, 1, "replicated"), precision))


def test_replicated_all_reduce_crosses_nodes_only_when_the_group_does():
    one_node, two_nodes = Cluster(devices_per_node=8), Cluster(devices_per_node=4, num_nodes=2)
    layout = Layout(8, 1, 1, "replicated")
    inside, across = (data_seconds(LLAMA_1B, layout, c, "bf16-mixed") for c in (one_node, two_nodes))
    # The same volume and number of buckets over NVLink (450 GB/s, 10 µs a call) or the network (50 GB/s, 30 µs).
    grads = stored_bytes(LLAMA_1B, "bf16-mixed")  # fp32 gradients under "-mixed"
    buckets = 1 + -(-(grads - FIRST_BUCKET_BYTES) // BUCKET_BYTES)
    assert inside == pytest.approx(2 * 7 / 8 * grads / 450e9 + buckets * LATENCY_INTRA_S)
    assert across == pytest.approx(2 * 7 / 8 * grads / 50e9 + buckets * LATENCY_INTER_S)


def test_a_model_under_one_bucket_pays_one_latency():
    layout = Layout(2, 1, 1, "replicated")
    grads = stored_bytes(TINY, "32-true")
    assert grads < FIRST_BUCKET_BYTES
    seconds = data_seconds(TINY, layout, Cluster(devices_per_node=2), "32-true")
    assert seconds == pytest.approx(2 * 1 / 2 * grads / 450e9 + LATENCY_INTRA_S)


@pytest.mark.parametrize("precision,ratio", [("32-true", 2 / 3), ("bf16-mixed", 1.0), ("bf16-true", 2 / 3)])
def test_replicated_against_fully_sharded_traffic(precision, ratio):
    """FSDP moves parameters twice (gathered in the compute dtype) and gradients once (in the stored dtype);
    the replicated mode moves gradients twice (a ring all-reduce): at fp32 that is 2/3 of FSDP's bytes,
    under bf16-mixed (bf16 gathers, fp32 reductions) the same."""
    cluster = Cluster(devices_per_node=8)
    grads = stored_bytes(LLAMA_1B, precision)
    buckets = 1 + -(-(grads - FIRST_BUCKET_BYTES) // BUCKET_BYTES)
    # Bandwidth terms only: the replicated mode pays a latency per bucket, FSDP three per block and the root.
    replicated = data_seconds(LLAMA_1B, Layout(8, 1, 1, "replicated"), cluster, precision) - buckets * LATENCY_INTRA_S
    sharded = (data_seconds(LLAMA_1B, Layout(8, 1, 1, "fully_sharded"), cluster, precision)
               - 3 * (LLAMA_1B.layers + 1) * LATENCY_INTRA_S)
    assert replicated / sharded == pytest.approx(ratio, rel=1e-6)


def test_the_search_replicates_what_fits_and_shards_what_does_not():
    cluster = Cluster(devices_per_node=8, device_memory_gb=80)
    best, ranked = choose(TINY, cluster, global_batch=16, seq=128, precision="32-true")
    assert best.layout.mode == "replicated" and best.layout.data == 8, best.layout.describe()
    assert any(c.layout.mode == "fully_sharded" and c.rejected is None for c in ranked)
    # 1.2 B parameters with fp32 AdamW (16 bytes each, 19.8 GB) in 24 GB devices: only shards fit.
    small = Cluster(devices_per_node=8, device_memory_gb=24)
    _, ranked = choose(LLAMA_1B, small, global_batch=16, seq=1024, precision="32-true")
    data_only = {c.layout.mode: c for c in ranked if (c.layout.data, c.layout.tensor, c.layout.pipeline) == (8, 1, 1)
                 and c.layout.checkpointing == "full"}
    assert "GiB per device, more than 90% of 24 GB" in data_only["replicated"].rejected
    assert data_only["fully_sharded"].rejected is None


@pytest.mark.parametrize("fsdp_settings,mode", [(None, "replicated"),
                                                ({"reshard_after_forward": "all"}, "fully_sharded")])
def test_layout_auto_replicates_unless_fsdp_settings_were_given(fsdp_settings, mode):
    """FSDP settings apply to FSDP only (the replicated mode refuses them): given, the planner keeps FSDP."""
    import lightning as L
    from transformers import LlamaForCausalLM

    from lightning_mp import ModelParallelStrategy

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2))

    strategy = ModelParallelStrategy(layout="auto", global_batch_size=16, sequence_length=128, device_memory_gb=16,
                                     fsdp_settings=fsdp_settings)
    L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False, precision="32-true")
    strategy.check_model(Module())
    assert strategy.parallel_config.data_parallel_mode == mode
    assert strategy.parallel_config.data_parallel_size == 4
