"""Pure tensor algorithms, no model inside: draft trees (`tree`), logits processing and sampling
(`sampling`), acceptance rules (`acceptance`, with optional Triton kernels in `triton_acceptance`),
the slot KV cache and its compaction (`kv_cache`), and the target's CPU fast paths: grouped-query
attention (`grouped_attention`) on a C++ kernel for decoding and verification (`cpu_attention`),
packed and weight-only linear layers (`cpu_linear`, `weight_only`); and where specserve's cache
is (`cache`: the model store's and the built kernels')."""
