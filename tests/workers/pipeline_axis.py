"""Pipeline axis at the torch level: each pipeline run against a single-process reference on the same
batches. Launched by torch.distributed.run (one process per pipeline rank, CPU + gloo); every rank also
trains the reference locally (tiny model), so nothing has to be gathered but a few numbers.

Rank 0 writes a JSON file: per schedule the losses, the max weight difference after the steps, the
gradient-norm difference, eval results and FQN checks; plus guards on the data itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import BertForTokenClassification

from helpers.tiny_bert import SEQ, TokenDataset, tiny_config
from lightning_mp.parallel.grad_norm import total_grad_norm
from lightning_mp.pipeline.runtime import build_pipeline
from lightning_mp.plans import find_plan
from lightning_mp.processes.launch import destroy_process_group_at_exit

LR = 1e-3


def batches(steps: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    data = TokenDataset(size=steps * batch_size, seed=0)
    ids, labels, mask = data.input_ids.clone(), data.labels.clone(), data.attention_mask.clone()
    # Padding on every other sequence, so the attention mask really travels to every stage.
    for i in range(1, len(ids), 2):
        pad = 2 + i % 4
        mask[i, SEQ - pad:] = 0
        labels[i, SEQ - pad:] = -100
        ids[i, SEQ - pad:] = 0
    return [
        {"input_ids": ids[s:s + batch_size], "attention_mask": mask[s:s + batch_size],
         "labels": labels[s:s + batch_size]}
        for s in range(0, len(ids), batch_size)
    ]


def new_model() -> BertForTokenClassification:
    torch.manual_seed(1234)
    return BertForTokenClassification(tiny_config(layers=4))


def grad_norm(params) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


def reference(data: list[dict], eval_inputs: dict) -> dict:
    model = new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        norms.append(grad_norm(model.parameters()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        out = model(**eval_inputs)
        again = model(**data[0]).loss.item()
    return {"losses": losses, "norms": norms, "state": {k: v.detach().clone() for k, v in model.named_parameters()},
            "eval_logits": out.logits, "eval_loss": out.loss.item(), "loss_again": again}


def guards(data: list[dict], microbatches: int) -> dict:
    """The data must make the token weighting matter: microbatches with different labelled-token counts,
    and a mean of microbatch means visibly different from the token mean."""
    model = new_model()
    batch = data[0]
    counts = [int((mb != -100).sum()) for mb in batch["labels"].chunk(microbatches)]
    with torch.no_grad():
        full = model(**batch).loss.item()
        chunks = [{k: v.chunk(microbatches)[i] for k, v in batch.items()} for i in range(microbatches)]
        parts = [model(**chunk).loss.item() for chunk in chunks]
    return {"counts": counts, "mean_of_means_gap": abs(sum(parts) / len(parts) - full)}


def token_loss_share(normalizer: torch.Tensor):
    """A microbatch's share of the batch's token-mean cross entropy (the shares sum to the batch loss)."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum") / normalizer

    return loss


def from_last_stage(runtime, value) -> torch.Tensor:
    """A number computed on the rank holding the last stage, on every pipeline rank."""
    total = value.detach().double() if runtime.is_last else torch.zeros((), dtype=torch.float64)
    dist.broadcast(total, src=dist.get_global_rank(runtime.group, runtime.last_rank), group=runtime.group)
    return total


def train_step(runtime, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    normalizer = (batch["labels"] != -100).sum().float()
    losses: list = []
    runtime.run(inputs, batch["labels"], token_loss_share(normalizer), losses=losses)
    return from_last_stage(runtime, torch.stack(losses).sum() if runtime.is_last else None)


def run_schedule(name: str, pp_mesh, data: list[dict], eval_inputs: dict, ref: dict, microbatches: int,
                 split_points) -> dict:
    model = new_model()
    _, hf_model, plan = find_plan(model)
    runtime = build_pipeline(hf_model, plan, pp_mesh, name, microbatches, torch.device("cpu"),
                             split_points=split_points)
    all_names = {n for n, _ in model.named_parameters()}
    del model, hf_model
    opt = torch.optim.AdamW(list(runtime.parameters()), lr=LR)
    losses, norm_diffs = [], []
    for step, batch in enumerate(data):
        loss = train_step(runtime, batch)
        norm = total_grad_norm(list(runtime.parameters()), extra_group=runtime.group).item()
        norm_diffs.append(abs(norm - ref["norms"][step]))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    # Every rank compares its own stage parameters with the reference of the same name.
    state = ref["state"]
    local_diff = max((p.detach() - state[n]).abs().max().item() for n, p in runtime.named_parameters())
    diff = torch.tensor(local_diff, dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=runtime.group)

    # Forward-only, on another sequence length (the shapes between stages are inferred anew).
    eval_inputs_no_labels = {k: v for k, v in eval_inputs.items() if k != "labels"}
    out = runtime.eval_step(eval_inputs_no_labels)
    logits_diff = (out - ref["eval_logits"]).abs().max().item() if runtime.is_last else 0.0
    eval_loss = None
    if runtime.is_last:
        eval_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), eval_inputs["labels"].reshape(-1))
    eval_loss_diff = abs(from_last_stage(runtime, eval_loss).item() - ref["eval_loss"])
    misplaced_output = float(runtime.is_last != (out is not None))
    checks = torch.tensor([logits_diff, misplaced_output], dtype=torch.float64)
    dist.all_reduce(checks, op=dist.ReduceOp.MAX, group=runtime.group)
    # And training resumes after eval (mode switch back, shapes back to the training length).
    loss_again = train_step(runtime, data[0]).item()
    opt.zero_grad()

    names = [sorted(n for n, _ in module.named_parameters()) for module in runtime.stage_modules]
    gathered: list = [None] * runtime.pp_mesh.size()
    dist.all_gather_object(gathered, {"stages": runtime.stage_ids, "names": names}, group=runtime.group)
    stage_names = [set(n) for item in gathered for n in item["names"]]
    union = set().union(*stage_names)
    return {
        "losses": losses,
        "ref_losses": ref["losses"],
        "max_weight_diff": diff.item(),
        "max_grad_norm_diff": max(norm_diffs),
        "eval_logits_diff": checks[0].item(),
        "eval_output_only_on_last": checks[1].item() == 0.0,
        "eval_loss_diff": eval_loss_diff,
        "train_after_eval_loss_diff": abs(loss_again - ref["loss_again"]),
        "fqn_subset": all(s <= all_names for s in stage_names),
        "fqn_union": union == all_names,
        "fqn_disjoint": sum(len(s) for s in stage_names) == len(union),
        "stages_per_rank": [item["stages"] for item in gathered],
        "split_points": runtime.split_points,
        "sample_stage_fqn": sorted(stage_names[-1])[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", action="append", default=[],
                        help="a schedule name, optionally pinned: '1f1b:0,3' (first block of every stage)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    # The job's last act is a collective: without the strategy's exit hook, interpreter shutdown can abort a gloo
    # thread still holding the result ("terminate called without an active exception"; seen in CI on a loaded
    # machine, twice in three runs).
    destroy_process_group_at_exit()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("pipeline_parallel",))
    pp_mesh = mesh["pipeline_parallel"]
    data = batches(args.steps, args.batch_size)
    # Eval on a shorter sequence than training, to exercise new inter-stage shapes.
    eval_inputs = {k: v[:, : SEQ - 4].contiguous() for k, v in data[-1].items()}
    ref = reference(data, eval_inputs)
    results = {"guards": guards(data, args.microbatches)}
    for run in args.job or ["1f1b"]:
        name, _, pinned = run.partition(":")
        split_points = [int(p) for p in pinned.split(",")] if pinned else None
        results[run] = run_schedule(name, pp_mesh, data, eval_inputs, ref, args.microbatches, split_points)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
