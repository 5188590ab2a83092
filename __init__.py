"""specserve: a speculative-decoding inference server for vision-language models.

The repository root is this package. Its parts, one folder each:

- ``specserve.kernels``: pure tensor algorithms (draft trees, masks, acceptance, KV compaction).
- ``specserve.drafting``: proposers that draft token trees (n-gram, draft LM, MSD draft head).
- ``specserve.server``: the engine (target model, speculative step, requests), model store, HTTP API.
"""

__version__ = "0.1.0"
