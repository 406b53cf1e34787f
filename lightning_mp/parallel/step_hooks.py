"""The strategy's step hooks: every step token-weighted over the data-parallel ranks, and run through
the pipeline schedule when the model is split into stages. A mixin of ``ModelParallelStrategy`` (as
``checkpoint/hooks.py`` is): it uses the strategy's token weighting, pipeline loop, failure watch and
precision plugin, and hands everything else to Lightning's ``ParallelStrategy`` behind it."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp._compat import sync_ddp_if_available
from lightning_mp.parallel.loss_parallel import loss_parallel_context
from lightning_mp.pipeline.steps import split_step_arguments


class StepHooks:
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("training_step", self.precision_plugin.train_step_context, args, kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", self.precision_plugin.val_step_context, args, kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", self.precision_plugin.test_step_context, args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is None:
            with self._failure_watch.step():
                return super().predict_step(*args, **kwargs)
        return self._step("predict_step", self.precision_plugin.predict_step_context, args, kwargs)

    def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        # The pipeline's microbatch weights are counted from the labels while they are still on the host, unless
        # the module may change them after the transfer.
        if self._pipeline is not None and not is_overridden("on_after_batch_transfer", self.lightning_module):
            self._pipeline.count_on_host(batch)
        return super().batch_to_device(batch, device, dataloader_idx)

    def _step(self, hook: str, context: Any, args: tuple, kwargs: dict) -> Any:
        with self._failure_watch.step():  # the progress watch: starting and finishing a step count as progress
            return self._run_step(hook, context, args, kwargs)

    def _run_step(self, hook: str, context: Any, args: tuple, kwargs: dict) -> Any:
        if self._pipeline is None:
            with loss_parallel_context(self._loss_parallel):
                return self._weighted_step(getattr(super(), hook), *args, **kwargs)
        module = self.lightning_module
        args, kwargs = self.precision_plugin.convert_input((args, kwargs))
        batch, rest = split_step_arguments(args, kwargs)
        self._observe(batch)
        # Loss parallelism: the schedule runs the loss and its backward inside the step.
        with (context(), self._token_weighting.reducing_logged_values(module),
              loss_parallel_context(self._loss_parallel)):
            if hook != "training_step":
                return self._pipeline.evaluation_step(module, getattr(module, hook), batch, *rest)
            # The schedule runs backward itself, so it applies what Lightning's backward would: the
            # data-parallel token weight and the division by accumulate_grad_batches.
            accumulate = module.trainer.accumulate_grad_batches
            first_in_window = not rest or rest[0] % accumulate == 0  # Lightning's rule for calling zero_grad
            return self._pipeline.training_step(module, batch, rest, self._token_weighting.loss_scale / accumulate,
                                                zeroed_next=first_in_window)

    def _observe(self, batch: Any) -> None:
        data_mesh = self._data_mesh
        self._token_weighting.observe(batch, data_mesh.get_group(), data_mesh.size())

    def _weighted_step(self, step: Any, *args: Any, **kwargs: Any) -> Any:
        self._observe(args[0] if args else kwargs.get("batch"))
        with self._token_weighting.reducing_logged_values(self.lightning_module):
            return step(*args, **kwargs)

    @property
    def _tied(self) -> Optional[Any]:
        """Parameters tied across the first and last pipeline stage, if any."""
        tied = self._pipeline.runtime.tied if self._pipeline is not None else None
        return tied if tied is not None and tied.parameters else None

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        tied = self._tied
        if tied is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_sum_tied() -> Any:
            # After the window's last backward, before clipping and the step: the copies get one gradient.
            result = closure()
            tied.sync_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_sum_tied, model, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self._pipeline is not None:
            # The schedule already ran backward for every microbatch; keep Lightning's hooks around it.
            assert self.lightning_module is not None
            closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
            self._pipeline.hand_over_gradients()
            return self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        closure_loss = self._token_weighting.scale(closure_loss)
        with loss_parallel_context(self._loss_parallel):  # the sharded cross-entropy's backward needs it too
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        if self._token_weighting.applies_to(reduce_op, group):
            return self._token_weighting.weighted_mean(tensor)
        if group is None and self._data_mesh is not None:
            # Tensor-parallel and pipeline peers hold the same rows (and, under a pipeline, the same relayed
            # logs): a sum over the whole world would count each row once per peer.
            group = self._data_mesh.get_group()
        return sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
