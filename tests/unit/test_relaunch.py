"""How a recipe job reruns itself under torchrun: the same entry (module or file), the same config
sources and overrides; and never under srun, whose tasks are the ranks already."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from omegaconf import OmegaConf

from lightning_mp.tasks.launch import entry_point, hydra_arguments, launched_externally

HYDRA = OmegaConf.create({
    "job": {"config_name": "ner_bert"},
    "runtime": {"config_sources": [
        {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
        {"path": "/home/u/my_conf", "schema": "file", "provider": "main"},
        {"path": "/home/u/extra", "schema": "file", "provider": "command-line"},
        {"path": "", "schema": "structured", "provider": "schema"}]},
    "overrides": {"hydra": ["hydra/job_logging=disabled", "hydra.mode=MULTIRUN", "hydra.run.dir=x"],
                  "task": ["trainer.devices=2", "model=my-bert"]},
})


def test_the_ranks_compose_the_same_configuration():
    assert hydra_arguments(HYDRA) == [
        "--config-name", "ner_bert", "--config-path", "/home/u/my_conf", "--config-dir", "/home/u/extra",
        "hydra/job_logging=disabled", "trainer.devices=2", "model=my-bert"]


def test_a_recipe_started_as_a_module_is_relaunched_as_one(monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="lightning_mp.recipes.ner_bert")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert entry_point(Path("/x/ner_bert.py")) == ["-m", "lightning_mp.recipes.ner_bert"]
    main.__spec__ = None  # `python recipes/ner_bert.py`
    assert entry_point(Path("/x/ner_bert.py")) == ["/x/ner_bert.py"]


def test_srun_tasks_do_not_start_ranks_but_an_interactive_allocation_does(monkeypatch):
    for name in ("LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_externally()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "ner")
    assert launched_externally()
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc + python: Lightning's rule, we start the ranks
    assert not launched_externally()
