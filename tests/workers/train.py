"""Train the tiny BERT for a few steps under a given layout; rank 0 writes losses and full weights.

Run directly (``python tests/workers/train.py --out x.pt``) or under torchrun; the single-process
reference is the same script with ``--devices 1 --strategy none``. ``--layouts '[{...}, {...}]'`` trains under
several layouts of one world size in turn, in the same processes: starting the ranks (imports, process group)
costs as much as training the tiny model, and the suite runs on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from helpers.tiny_bert import TinyBertModule, loader


class RecordLoss(Callback):
    def __init__(self, grad_norms: bool = False) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.record_grad_norms = grad_norms
        self.widths: list[int] = []  # of this rank's batches
        self.labelled_tokens: list[float] = []  # logged with reduce_fx="sum" (tiny BERT)
        self.compiled: list[dict] = []  # what torch.compile had done in this process after each step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_mp.parallel.compile import compile_counts

        self.losses.append(float(trainer.callback_metrics["train_loss"]))
        if "labelled_tokens" in trainer.callback_metrics:
            self.labelled_tokens.append(float(trainer.callback_metrics["labelled_tokens"]))
        if isinstance(batch, dict):
            self.widths.append(int(batch["input_ids"].shape[1]))
        self.compiled.append(compile_counts())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # After the GradScaler unscaled the gradients, before clipping: the global norm over every shard.
        if self.record_grad_norms:
            from lightning_mp.parallel.grad_norm import total_grad_norm

            self.grad_norms.append(float(total_grad_norm([p for p in pl_module.parameters()])))


class FSDPProbe(Callback):
    """What FSDP2 was configured with: the parameters still gathered (not DTensors) when backward starts, and
    each unit's explicit prefetch targets and reduction dtype (read back after training)."""

    def __init__(self) -> None:
        self.gathered_at_backward: list[list[str]] = []

    def on_before_backward(self, trainer, pl_module, loss):
        from torch.distributed.tensor import DTensor

        self.gathered_at_backward.append(
            [name for name, p in pl_module.named_parameters() if not isinstance(p, DTensor)])

    @staticmethod
    def units(module) -> dict:
        from torch.distributed.fsdp import FSDPModule

        from lightning_mp._compat import fsdp_unit_settings

        names = {id(m): name for name, m in module.named_modules()}
        units = {}
        for name, unit in module.named_modules():
            if isinstance(unit, FSDPModule):
                settings = fsdp_unit_settings(unit)
                units[name] = {"forward_prefetch": [names[id(m)] for m in settings["forward_prefetch"]],
                               "backward_prefetch": [names[id(m)] for m in settings["backward_prefetch"]],
                               "reduce_dtype": str(settings["reduce_dtype"])}
        return units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--strategy", default="lightning_mp", choices=["lightning_mp", "lightning", "none"],
                        help="lightning: Lightning's own ModelParallelStrategy (the peer)")
    parser.add_argument("--layout", default="{}", help="JSON kwargs for ModelParallelStrategy")
    parser.add_argument("--strategy-name", default=None,
                        help="Trainer(strategy=NAME) from Lightning's registry after `import lightning_mp`"
                             " (no --layout)")
    parser.add_argument("--precision", default="32-true",
                        help="16-mixed is forced (GradScaler plugin): on CPU the Trainer would turn it into bf16-mixed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--module", default="tiny", choices=["tiny", "dropin", "gpt"],
                        help="gpt: helpers/plain_gpt.py, a user's own model; its layouts say \"gpt_plan\": \"dict\""
                             " or \"ModelPlan\" (how the plan reaches the strategy)")
    parser.add_argument("--all-labelled", action="store_true", help="every token labelled (equal counts per rank)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers of the tiny BERT")
    parser.add_argument("--validate", action="store_true", help="run a validation epoch after fitting")
    parser.add_argument("--family", default=None, help="a tiny HF model of this family (tests/helpers/tiny_hf.py)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="with --family")
    parser.add_argument("--lr", type=float, default=1e-2, help="with --family")
    parser.add_argument("--fixed-width", action="store_true", help="with --family: pad every batch to full length")
    parser.add_argument("--config", default="{}", help="with --family: JSON config overrides")
    parser.add_argument("--grad-norms", action="store_true", help="record the global gradient norm before each step")
    parser.add_argument("--probe-logits", action="store_true",
                        help="after training, record the class, placements and local shape of the model's logits")
    parser.add_argument("--probe-hidden", action="store_true",
                        help="after training, record the class, placements and local shape of block 0's output")
    parser.add_argument("--probe-sent", action="store_true",
                        help="under a pipeline: the shapes of what the first stage received and sent in the last step")
    parser.add_argument("--probe-fsdp", action="store_true",
                        help="record the parameters gathered when backward starts and each FSDP unit's settings")
    parser.add_argument("--variable-width", action="store_true",
                        help="batches padded to their own longest row; only data-parallel rank 1's width changes")
    parser.add_argument("--layouts", default=None,
                        help="JSON list of ModelParallelStrategy kwargs: train under each in turn, "
                             "in the same processes "
                             "(one launch; one Trainer each, seeded alike); rank 0 writes the list of results")
    args = parser.parse_args()
    layouts = json.loads(args.layouts) if args.layouts is not None else [json.loads(args.layout)]
    results = []
    for layout in layouts:
        if args.layouts is not None:  # which layout a failure belongs to
            print(f"[train] layout {json.dumps(layout)}", file=sys.stderr, flush=True)
        result, global_zero = train(args, layout)
        results.append(result)
    if global_zero:
        torch.save(results if args.layouts is not None else results[0], args.out)


def gpt_plan(layout: dict) -> dict:
    """``layout`` with ``"gpt_plan"`` turned into the strategy's ``plan=`` argument for the plain GPT: its
    tensor-parallel plan as a dict, or as a ModelPlan (which can also say that the loss shifts its labels, so
    data-parallel ranks weight the tokens the loss counts)."""
    layout = dict(layout)
    form = layout.pop("gpt_plan", None)
    if form is None:
        return layout
    from helpers.plain_gpt import TENSOR_PLAN
    from lightning_mp.plans import ModelPlan

    if form == "dict":
        return {**layout, "plan": TENSOR_PLAN}
    plan = ModelPlan(tensor_parallel=TENSOR_PLAN, blocks="model.blocks", shifted_labels=True, name="GPT")
    return {**layout, "plan": plan}


def train(args: argparse.Namespace, layout: dict) -> tuple[dict, bool]:
    """One Trainer under ``layout``: (what rank 0 writes, whether this is global rank 0)."""
    L.seed_everything(0, verbose=False)
    if args.strategy == "none":
        strategy, data_size = "auto", 1
    elif args.strategy == "lightning":
        from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallel

        strategy = LightningModelParallel(**layout)
    elif args.strategy_name:
        import lightning_mp  # noqa: F401  registers the names

        strategy = args.strategy_name
    else:
        from lightning_mp import ModelParallelStrategy

        strategy = ModelParallelStrategy(**gpt_plan(layout))
    if args.strategy != "none":
        world = args.devices * args.num_nodes
        model_size = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
        data_size = layout.get("data_parallel_size", world // model_size)
    make_loader = partial(loader, all_labelled=args.all_labelled, variable_width=args.variable_width,
                          global_batch_size=args.batch_size)
    if args.family is not None:
        from helpers import tiny_hf

        Module = partial(tiny_hf.TinyHFModule, args.family, layers=args.layers, optimizer=args.optimizer,
                         lr=args.lr, **json.loads(args.config))
        make_loader = partial(tiny_hf.loader, args.family, fixed_width=args.fixed_width)
    elif args.module == "dropin":
        from dropin_module import DropInModule as Module
    elif args.module == "gpt":
        from helpers import tiny_hf
        from helpers.plain_gpt import GPTModule as Module

        make_loader = partial(tiny_hf.loader, "llama")
    else:
        Module = partial(TinyBertModule, layers=args.layers)
    recorder = RecordLoss(grad_norms=args.grad_norms)
    fsdp_probe = FSDPProbe()
    precision: dict = {"precision": args.precision}
    if args.precision == "16-mixed":  # the plugin a GPU run gets: fp16 autocast and a GradScaler
        from lightning.pytorch.plugins.precision import MixedPrecision

        precision = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
        **precision, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder, *([fsdp_probe] if args.probe_fsdp else [])],
        num_sanity_val_steps=0,
    )
    module = Module()
    single = args.strategy == "none"
    trainer.fit(module, make_loader(args.batch_size // data_size, single_process=single))
    result = {"losses": recorder.losses, "grad_norms": recorder.grad_norms, "widths": recorder.widths,
              "compiled": recorder.compiled, "labelled_tokens": recorder.labelled_tokens}
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    result["grad_scale"] = scaler.get_scale() if scaler is not None else None
    if args.validate:
        # In order (no sampler shuffling) in every layout;
        # 22 rows: the last batch is not a multiple of the microbatches.
        # With --variable-width, 38 rows: two full batches per rank in which only rank 1's width changes (a
        # shape change on one data-parallel peer alone), then a padded last batch.
        in_order = {} if args.family is not None else {"shuffled": False}
        val_loader = make_loader(args.batch_size // data_size, size=38 if args.variable_width else 22, **in_order)
        result["validation"] = {k: float(v) for k, v in trainer.validate(module, val_loader, verbose=False)[0].items()}
    if args.probe_logits or args.probe_hidden:
        # One forward after training: the layout of the logits and of block 0's output (what a block hands on).
        from lightning_mp.plans import find_plan

        def describe(tensor):
            placements = [str(p) for p in getattr(tensor, "placements", ())]
            local = tensor.to_local() if placements else tensor
            return type(tensor).__name__, placements, tuple(local.shape), tuple(tensor.shape)

        batch = next(iter(make_loader(args.batch_size // data_size, single_process=single)))
        _, planned, plan = find_plan(module)
        seen = []
        hook = planned.get_submodule(plan.blocks)[0].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            logits = planned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hook.remove()
        if args.probe_logits:
            result["logits"] = describe(logits)
        if args.probe_hidden:
            result["hidden"] = describe(seen[0][0] if isinstance(seen[0], tuple) else seen[0])
    if args.probe_fsdp:
        result["gathered_at_backward"] = fsdp_probe.gathered_at_backward
        result["fsdp_units"] = FSDPProbe.units(module)
    if args.probe_sent:  # rank 0 holds the first stage (and tensor rank 0's shard)
        from lightning_mp._compat import stage_metadata

        meta = stage_metadata(trainer.strategy._pipeline.runtime.stages[0])
        result["sent"] = (tuple(meta.inputs[0].shape), tuple(meta.outputs[0].shape))
    if args.strategy == "lightning_mp":
        from torch.distributed._composable.contract import _get_registry

        from lightning_mp.checkpoint.state import model_state
        from lightning_mp.planner.measure import local_state_bytes

        result["state_dict"] = model_state(module, full=True, pipeline_group=trainer.strategy.pipeline_group)
        result["checkpointed"] = [n for n, m in module.named_modules() if "checkpoint" in (_get_registry(m) or {})]
        result["local_bytes"] = local_state_bytes(module, trainer.optimizers[0])
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, result["local_bytes"])
        result["bytes_per_rank"] = gathered
        # The failure watch must be gone once the Trainer is done (a store call at shutdown aborts the process).
        watch_running = [None] * trainer.world_size
        torch.distributed.all_gather_object(watch_running, trainer.strategy._failure_watch.running)
        result["failure_watch_running"] = watch_running
        per_rank = [None] * trainer.world_size
        torch.distributed.all_gather_object(per_rank, {"widths": recorder.widths, "compiled": recorder.compiled})
        result["steps_per_rank"] = per_rank
        # Who started the ranks and the numbers each rank took from it (SLURM's, torchrun's or Lightning's).
        env = trainer.strategy.cluster_environment
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, (env.global_rank(), env.node_rank(), env.local_rank()))
        result["cluster_environment"], result["ranks"] = type(env).__name__, ranks
        result["strategy"] = type(trainer.strategy).__module__ + "." + type(trainer.strategy).__name__
        result["mesh_shape"] = trainer.strategy.mesh_shape
    elif args.strategy == "lightning":
        from lightning_mp.checkpoint.state import model_state

        result["state_dict"] = model_state(module, full=True)
    else:
        result["state_dict"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return result, trainer.is_global_zero


if __name__ == "__main__":
    main()
