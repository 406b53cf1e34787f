"""What the tests share: the one launcher (``launch``), comparisons (``compare``), tiny models and data shaped like
real data (``tiny_bert``, ``tiny_hf``, ``llm_tiny``). ``tests/`` is on the path (pytest's ``pythonpath``; the
launcher's ``PYTHONPATH`` for workers)."""

