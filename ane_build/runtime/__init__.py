"""Run an exported program (or the eager model) to generate text: the ``ane-build run`` runner.

- ``program``: open a ``.pte`` through ``executorch.runtime`` or a canonical checkpoint
  eagerly, behind one interface (``info``, ``methods``, ``run``);
- ``kv_cache``: the caller-owned KV caches, mask and per-call inputs, updated in place;
- ``sampling``: greedy, temperature and top-p;
- ``tokenizer``: pytorch-tokenizers files and streaming text;
- ``generate``: the loop, with prefill and decode speeds measured apart;
- ``cli``: the flags of the seed's ``run.py`` (``python -m ane_build.cli.run``).
"""
