"""The lightning-mp command: ls, cp, run (Hydra arguments passed through: --config-path, --config-dir, -m,
overrides), convert, and the errors for names it does not know. Recipes run as subprocesses (Hydra owns
sys.argv and logging); the planner recipe is used because it is a dry run of a few seconds."""

from __future__ import annotations

import pytest

from helpers.launch import ROOT
from lightning_mp import cli


def test_ls_lists_recipes_their_configs_and_the_groups(capsys):
    cli.main(["ls"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in out[1:6]}
    assert rows == {"llm_generate": "-", "ner_bert": "ner_bert.yaml", "ner_predict": "-", "plan": "plan.yaml",
                    "sft_llm": "sft_llm.yaml"}
    assert ("  model: bert-10b, bert-base, bert-large, bert-medium, bert-mini, bert-small, bert-tiny, llama3-405b,"
            " llama3-70b, llama3-8b, minilm, qwen2.5-7b, smollm2") in out
    assert "  parallel: auto, default" in out
    assert cli.config_dir().resolve() == (ROOT / "conf").resolve()  # this checkout's own conf/, not another one


def test_cp_copies_the_recipe_config_tree_and_never_overwrites_silently(tmp_path, capsys):
    cli.main(["cp", "ner_bert", str(tmp_path / "my_conf")])
    copied = {str(p.relative_to(tmp_path / "my_conf")) for p in (tmp_path / "my_conf").rglob("*.yaml")}
    shipped = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert copied == shipped - {"plan.yaml", "sft_llm.yaml"}  # other recipes' primary configs are not copied
    assert (tmp_path / "my_conf" / "ner_bert.yaml").read_text() == (ROOT / "conf" / "ner_bert.yaml").read_text()
    assert f"lightning-mp run ner_bert --config-path {tmp_path / 'my_conf'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"19 of the 19 files exist already \(first: .*ner_bert.yaml\); pass"
                                         r" --overwrite"):
        cli.main(["cp", "ner_bert", str(tmp_path / "my_conf")])
    cli.main(["cp", "ner_bert", str(tmp_path / "my_conf"), "--overwrite"])
    with pytest.raises(SystemExit, match=r"recipe 'ner_predict' has no Hydra config \(ner_predict.yaml\)"):
        cli.main(["cp", "ner_predict", str(tmp_path / "other")])


@pytest.mark.parametrize("command", [["run", "ner_bertt"], ["cp", "nope", "x"]])
def test_unknown_recipe_lists_the_valid_ones(command):
    with pytest.raises(SystemExit, match=r"unknown recipe '(ner_bertt|nope)'; valid recipes: llm_generate, ner_bert,"
                                         r" ner_predict, plan, sft_llm\."):
        cli.main(command)


def test_convert_is_the_checkpoint_converter(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "is neither a sharded checkpoint directory (with .metadata) nor a file" in capsys.readouterr().err


def test_relative_config_path_is_made_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.absolute_config_path(["--config-path", "my_conf", "a=1"]) == ["--config-path", str(tmp_path / "my_conf"),
                                                                              "a=1"]
    assert cli.absolute_config_path(["-cp=c", "--config-dir", "d"]) == [f"-cp={tmp_path / 'c'}", "--config-dir", "d"]
    assert cli.absolute_config_path(["--config-path", "pkg://x.conf"]) == ["--config-path", "pkg://x.conf"]
