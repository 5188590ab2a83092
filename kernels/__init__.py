"""Pure tensor algorithms, no model inside: draft trees (`tree`), logits processing and sampling
(`sampling`), acceptance rules (`acceptance`, with optional Triton kernels in `triton_acceptance`)
and KV cache compaction (`kv_cache`)."""
