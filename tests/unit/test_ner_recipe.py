"""The NER recipe end to end: Hydra compose API in-process, then the real command line with ranks."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from helpers.launch import ROOT
from lightning_mp.tasks.ner.recipe import check_config


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("ner_bert", overrides=overrides)


@pytest.mark.parametrize("overrides,message", [
    (["model=bert-tiny", "trainer.devices=4", "parallel.tensor=4"],
     "tensor_parallel_size=4 does not divide num_attention_heads=2 of BertForTokenClassification;"
     " valid tensor_parallel_size values for this model: 1, 2"),
    (["trainer.devices=4", "parallel.tensor=2", "parallel.data=3"], "world size is 4"),
    (["trainer.devices=2", "trainer.batch_size=7"],
     "trainer.batch_size=7 is not divisible by the 2 data-parallel ranks"),
    (["trainer.precision=fp8"], "precision='fp8' is not supported by lightning_mp; choose one of 32-true"),
    (["model=bert-tiny", "trainer.devices=4", "parallel.pipeline=4"],
     "pipeline_parallel_size=4 with schedule '1f1b': 4 pipeline stages need at least 4 blocks (one each),"
     " but the model has 2"),
    (["trainer.devices=2", "parallel.pipeline=2", "parallel.microbatches=4", "trainer.batch_size=18"],
     "the batch size per data-parallel rank, 18, is not divisible by microbatches=4; use a multiple of 4"),
])
def test_bad_overrides_fail_at_once(overrides, message):
    with pytest.raises(ValueError) as error:
        check_config(compose_config(overrides))
    assert message in str(error.value)
