"""Load a pretrained HF model with lightning_mp.from_pretrained under a layout, predict, optionally train
and export.

Every rank writes ``<out>.rank<N>.pt``: the logits of the rows it predicted (by row index), its
non-persistent buffers, which parameter names were one tensor when the strategy had loaded the weights
(before any forward: FSDP's unsharding would re-point shared modules itself), and what it measured;
``--fit-steps N`` then trains N SGD steps on the rows (labels: the ids) and gathers the weights again;
with ``--export DIR`` the model is then exported. ``--plain-too`` then repeats it all with the class's own
from_pretrained under the same layout in the same processes (one launch for the pair).
"""

from __future__ import annotations

import argparse
import json
import resource

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from helpers.pretrained import HEAD_SEED, model_inputs


def model_class(name: str):
    import transformers

    return getattr(transformers, name)


class Rows(Dataset):
    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), **{k: v[i] for k, v in self.inputs.items()}}


class Pretrained(L.LightningModule):
    def __init__(self, cls_name: str, path: str, kwargs: dict, plain: bool) -> None:
        super().__init__()
        import lightning_mp

        torch.manual_seed(HEAD_SEED)
        cls = model_class(cls_name)
        self.model = cls.from_pretrained(path, **kwargs) if plain else lightning_mp.from_pretrained(cls, path, **kwargs)

    def on_predict_start(self) -> None:
        self.tensors_after_loading = shared_tensors(self.model)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def predict_step(self, batch, batch_idx):
        index = batch.pop("index")
        return {"index": index, "logits": self.model(**batch).logits.detach().cpu()}


def shared_tensors(model: torch.nn.Module) -> dict[str, list]:
    """Parameter names that are one object and one storage: {first name: [names, local storage pointers]}."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))

    def storage(name: str) -> int:
        tensor = params[name]
        return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).untyped_storage().data_ptr()

    return {names[0]: [names, sorted({storage(n) for n in names})] for names in groups.values() if len(names) > 1}


def training_rows(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "labels": labels[i]} for i in range(len(labels))]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def load_predict_fit(args: argparse.Namespace, layout: dict, plain: bool, export: str | None) -> tuple[dict, int]:
    """One Trainer under the layout: load (meta + lightning_mp.from_pretrained, or the class's own), predict,
    gather, optionally train and export. Returns what this rank measured and its global rank."""
    from lightning_mp import ModelParallelStrategy

    strategy = ModelParallelStrategy(**layout)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=args.fit_steps, num_sanity_val_steps=0)
    baseline = peak_rss_bytes()
    module = Pretrained(args.cls, args.model_dir, json.loads(args.kwargs), plain)
    vocab = module.model.config.vocab_size
    world = args.devices
    data_size = world // (layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1))
    inputs = model_inputs(vocab)
    loader = DataLoader(Rows(inputs), batch_size=len(inputs["input_ids"]) // data_size)
    result: dict = {"baseline_rss": baseline}
    if args.no_predict:
        trainer.predict(module, DataLoader(Rows({k: v[:data_size] for k, v in inputs.items()}), batch_size=1))
    else:
        outputs = trainer.predict(module, loader)
        result["logits"] = {int(i): row for out in outputs for i, row in zip(out["index"], out["logits"])}
    result["load_rss"] = peak_rss_bytes()
    model = module.model
    result["buffers"] = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
    result["shared_after_loading"] = module.tensors_after_loading
    if not args.no_predict:
        from lightning_mp.checkpoint.state import model_state

        full = model_state(model, full=True, pipeline_group=trainer.strategy.pipeline_group)  # collective
        result["state_dict"] = {k: v.detach().cpu().clone() for k, v in full.items()}  # not the live weights
    if args.fit_steps:
        trainer.fit(module, DataLoader(training_rows(inputs), batch_size=len(inputs["input_ids"]) // data_size))
        from lightning_mp.checkpoint.state import model_state

        full = model_state(model, full=True, pipeline_group=trainer.strategy.pipeline_group)  # collective
        result["trained_state_dict"] = {k: v.detach().cpu() for k, v in full.items()}
        result["shared_after_training"] = shared_tensors(model)
    if export:
        from lightning_mp.checkpoint.export import export_hf_model

        export_hf_model(module, "model", export)
    result["export_rss"] = peak_rss_bytes()
    return result, trainer.global_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--cls", default="AutoModelForTokenClassification")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments of from_pretrained")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--layout", default="{}", help="JSON kwargs for ModelParallelStrategy")
    parser.add_argument("--plain", action="store_true", help="the class's own from_pretrained on every rank")
    parser.add_argument("--plain-too", action="store_true",
                        help="then, in the same processes (one launch, not two), the class's own from_pretrained "
                             "under the same layout, predicted and trained alike: <out>.plain.rank<N>.pt")
    parser.add_argument("--export", default=None, help="export the loaded model as an HF directory here")
    parser.add_argument("--no-predict", action="store_true")
    parser.add_argument("--fit-steps", type=int, default=0, help="then train this many SGD steps")
    args = parser.parse_args()

    layout = json.loads(args.layout)
    # Written before the second run starts: its RSS figures are this run's alone.
    result, rank = load_predict_fit(args, layout, args.plain, args.export)
    torch.save(result, f"{args.out}.rank{rank}.pt")
    if args.plain_too:
        result, rank = load_predict_fit(args, layout, True, None)
        torch.save(result, f"{args.out}.plain.rank{rank}.pt")


if __name__ == "__main__":
    main()
