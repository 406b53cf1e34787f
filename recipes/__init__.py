"""The recipes, runnable from a checkout (``python recipes/ner_bert.py``) and installed as ``lightning_mp.recipes``
(``lightning-mp run ner_bert`` / ``python -m lightning_mp.recipes.ner_bert``); see pyproject.toml."""
