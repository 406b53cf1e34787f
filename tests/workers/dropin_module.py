"""A LightningModule written for Lightning's own ModelParallelStrategy: it parallelizes itself in
``configure_model`` with ``self.device_mesh["tensor_parallel"]`` / ``["data_parallel"]``."""

from __future__ import annotations

from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from helpers.tiny_bert import TinyBertModule


class DropInModule(TinyBertModule):
    def configure_model(self):
        tp_mesh = self.device_mesh["tensor_parallel"]
        dp_mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            if tp_mesh.size() > 1:
                parallelize_module(layer, tp_mesh, {
                    "attention.self.query": ColwiseParallel(),
                    "attention.self.key": ColwiseParallel(),
                    "attention.self.value": ColwiseParallel(),
                    "attention.output.dense": RowwiseParallel(),
                    "intermediate.dense": ColwiseParallel(),
                    "output.dense": RowwiseParallel(),
                })
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)
