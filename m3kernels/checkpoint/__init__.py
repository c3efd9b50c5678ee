"""Whole-checkpoint merges, read top-down: config -> plan -> read -> merge -> write -> publish.

``config`` (mergekit-format YAML), ``source`` and ``safetensors_io`` (the inputs, memory-mapped),
``plan`` (which output tensor comes from what, in which shard), ``run`` (the streaming merge),
``gpu_pipeline`` (the same on a GPU), ``writer`` (shards, journal, atomic publish).
"""

DEFAULT_SHARD_SIZE = 5 * 2**30  # largest output shard unless told (--out-shard-size), as transformers' 5 GB
