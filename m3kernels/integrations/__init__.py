"""Adapters that let other merge tools run on m3kernels: PEFT (:mod:`.peft`) and mergekit
(:mod:`.mergekit_plugin`). docs/INTEGRATIONS.md describes each and what is exact."""
