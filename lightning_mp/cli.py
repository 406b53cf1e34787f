"""The ``lightning-mp`` command (also ``python -m lightning_mp``), after torchtune's ``tune``.

    lightning-mp ls                                    recipes, their configs and the config groups
    lightning-mp cp ner_bert my_conf/                  copy a recipe's config tree to edit
    lightning-mp run ner_bert trainer.devices=2        run a recipe; Hydra arguments pass through unchanged
    lightning-mp run ner_bert --config-path my_conf    ... with the edited copy instead of the shipped configs
    lightning-mp run ner_bert --config-dir extra model=my-bert   ... shipped configs plus extra/model/my-bert.yaml
    lightning-mp convert CKPT_DIR model.ckpt           sharded <-> full checkpoint

A recipe is a module of ``lightning_mp.recipes`` (the repository's ``recipes/``); its primary config is
the file of the same name in ``lightning_mp.conf`` (``conf/``), next to the config groups it shares.
Hydra's own flags keep their meaning: ``--config-path`` replaces the config directory (the CLI makes a
relative one relative to the working directory), ``--config-dir`` adds one searched after it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import runpy
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

RECIPES_PACKAGE = "lightning_mp.recipes"


def checkout_recipes() -> Optional[Path]:
    """``recipes/`` of the source tree this package was imported from (a checkout, installed editable or not)."""
    root = Path(__file__).resolve().parent.parent
    return root / "recipes" if (root / "pyproject.toml").is_file() and (root / "recipes").is_dir() else None


def recipes_dir() -> Path:
    """The recipes beside the imported package: a checkout's ``recipes/``, else the installed ``lightning_mp.recipes``
    (never another tree's recipes found through some other install on the path)."""
    checkout = checkout_recipes()
    if checkout is not None:
        return checkout
    spec = importlib.util.find_spec(RECIPES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{RECIPES_PACKAGE} is not installed and {Path(__file__).parent} is not in a checkout.")
    return Path(next(iter(spec.submodule_search_locations)))


def config_dir() -> Path:
    return recipes_dir().parent / "conf"  # the same relation the recipes' config_path="../conf" relies on


def recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.py")) if not p.name.startswith("_")}


def recipe_path(name: str) -> Path:
    found = recipes()
    if name not in found:
        raise SystemExit(f"lightning-mp: unknown recipe {name!r}; valid recipes: {', '.join(found)}.")
    return found[name]


def summary(path: Path) -> str:
    """The first line of a recipe's docstring, read without importing it (imports cost seconds)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().split("\n")[0]


def cmd_ls(args: argparse.Namespace) -> None:
    conf = config_dir()
    rows = [(name, f"{name}.yaml" if (conf / f"{name}.yaml").is_file() else "-", summary(path))
            for name, path in recipes().items()]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'RECIPE':<{width}}{'CONFIG':<{width + 5}}DESCRIPTION")
    for name, config, text in rows:
        print(f"{name:<{width}}{config:<{width + 5}}{text}")
    print(f"\nconfig groups ({conf}), chosen with GROUP=OPTION:")
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        print(f"  {group.name}: {', '.join(sorted(p.stem for p in group.glob('*.yaml')))}")


def cmd_cp(args: argparse.Namespace) -> None:
    """Copy the recipe's primary config and every config group (never another recipe's primary config)."""
    recipe_path(args.recipe)
    conf = config_dir()
    primary = conf / f"{args.recipe}.yaml"
    if not primary.is_file():
        raise SystemExit(f"lightning-mp: recipe {args.recipe!r} has no Hydra config ({primary.name}) to copy.")
    files = [primary] + sorted(p for p in conf.glob("*/*.yaml") if not p.parent.name.startswith(("_", ".")))
    targets = [(src, args.destination / src.relative_to(conf)) for src in files]
    existing = [str(dst) for _, dst in targets if dst.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"lightning-mp: {len(existing)} of the {len(targets)} files exist already (first:"
                         f" {existing[0]}); pass --overwrite to replace them.")
    for src, dst in targets:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    print(f"copied {len(targets)} config files of {args.recipe} to {args.destination}; run with:\n"
          f"  lightning-mp run {args.recipe} --config-path {args.destination} [overrides]")


def absolute_config_path(argv: Sequence[str]) -> list[str]:
    """Hydra reads a relative --config-path relative to the recipe's file; from a command the user means
    the working directory. (``--config-dir`` is already relative to the working directory.)"""
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(out) and not out[i + 1].startswith("pkg://"):
                out[i + 1] = str(Path(out[i + 1]).resolve())
            elif arg.startswith(flag + "=") and not arg.split("=", 1)[1].startswith("pkg://"):
                out[i] = f"{flag}={Path(arg.split('=', 1)[1]).resolve()}"
    return out


def cmd_run(args: argparse.Namespace) -> None:
    path = recipe_path(args.recipe)
    sys.argv = [str(path), *absolute_config_path(args.arguments)]
    module = f"{RECIPES_PACKAGE}.{args.recipe}"
    # Installed: as a module, so torchrun relaunches it the same way (tasks/launch.py). From a checkout: by
    # path, as `python recipes/X.py` runs it. Either way Hydra sees the recipe's file and its ../conf.
    if checkout_recipes() is None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(path), run_name="__main__")


def cmd_convert(args: argparse.Namespace) -> None:
    from lightning_mp.checkpoint.convert import main as convert

    convert(args.arguments)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lightning-mp", description=__doc__.split("\n\n")[0],
                                  epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{ls,cp,run,convert}")
    sub.add_parser("ls", help="list recipes and configs").set_defaults(func=cmd_ls)
    cp = sub.add_parser("cp", help="copy a recipe's config tree to edit")
    cp.add_argument("recipe")
    cp.add_argument("destination", type=Path)
    cp.add_argument("--overwrite", action="store_true", help="replace files that exist")
    cp.set_defaults(func=cmd_cp)
    run = sub.add_parser("run", help="run a recipe; everything after its name goes to the recipe (Hydra)",
                         prefix_chars=chr(0))  # no options of its own: -m, --config-dir, ... belong to Hydra
    run.add_argument("recipe")
    run.add_argument("arguments", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)
    convert = sub.add_parser("convert", help="sharded <-> full checkpoint (python -m lightning_mp.checkpoint.convert)",
                             prefix_chars=chr(0), add_help=False)
    convert.add_argument("arguments", nargs=argparse.REMAINDER)
    convert.set_defaults(func=cmd_convert)
    return top


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
