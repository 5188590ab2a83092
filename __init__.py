"""specserve: a speculative-decoding inference server for vision-language models.

The repository root is this package. Its parts, one folder each:

- ``specserve.kernels``: pure tensor algorithms (draft trees, masks, acceptance, KV compaction).
- ``specserve.drafting``: proposers that draft token trees (n-gram, draft LM, MSD draft head) and the
  tree shaper they share.
- ``specserve.server.engine``: the engine (target model, speculative step, sequences, scheduler).
- ``specserve.server.http``, ``.training``, ``.cli``: the OpenAI-compatible API, draft-head and
  tiny-vlm training, the command line; ``specserve.server.store`` brings model files.
"""

__version__ = "0.1.0"
