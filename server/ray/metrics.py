"""The replica's speculative-decoding and prefix-cache counters, mirrored into Ray's metrics.

Behind Ray's proxy `GET /metrics` reaches one replica at a time, so each replica also copies its
`vllm:spec_decode_*` and `vllm:prefix_cache_*` counters into Ray Serve counters (Ray adds the
`deployment`, `replica` and `application` tags); Ray's metrics agent exports them from every node, as

- `ray_specserve_spec_decode_num_drafts_total`          (from `vllm:spec_decode_num_drafts`)
- `ray_specserve_spec_decode_num_draft_tokens_total`    (`vllm:spec_decode_num_draft_tokens`)
- `ray_specserve_spec_decode_num_accepted_tokens_total` (`vllm:spec_decode_num_accepted_tokens`)
- `ray_specserve_spec_decode_num_accepted_tokens_per_pos_total{position}`
- `ray_specserve_prefix_cache_queries_total`             (`vllm:prefix_cache_queries`)
- `ray_specserve_prefix_cache_hits_total`                (`vllm:prefix_cache_hits`)

Cluster-wide mean accepted length (incl. bonus) over a window = 1 + sum(increase(accepted)) /
sum(increase(num_drafts)), summed over replicas; per replica, group by the `replica` tag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from ray.serve.metrics import Counter

MIRROR_INTERVAL_S = 1.0
# the app's counter -> the Ray counter that mirrors it
MIRRORED = {
    f"vllm:{name}": f"specserve_{name}"
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                 "spec_decode_num_accepted_tokens_per_pos", "prefix_cache_queries", "prefix_cache_hits")
}


class CounterMirror:
    """Copies the growth of one app's `MIRRORED` counters into Ray counters of the same meaning."""

    def __init__(self, registry: CollectorRegistry, counter: Callable[..., Any] = Counter) -> None:
        """`counter(name, description=, tag_keys=)` makes the target counters (Ray Serve's)."""
        self._registry = registry
        self._seen: dict[tuple, float] = {}  # (metric, labels) -> value already copied
        self._counters = {
            name: counter(target, description=f"{name} of each replica",
                          tag_keys=("model_name", "position") if name.endswith("_per_pos") else ("model_name",))
            for name, target in MIRRORED.items()
        }

    def sync(self) -> None:
        """Add what each counter gained since the last call."""
        for family in self._registry.collect():
            if family.name not in self._counters:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue  # prometheus_client also exposes `_created` timestamps
                key = (family.name, tuple(sorted(sample.labels.items())))
                gained = sample.value - self._seen.get(key, 0.0)
                if gained > 0:
                    self._counters[family.name].inc(gained, tags=dict(sample.labels))
                    self._seen[key] = sample.value

    async def run(self) -> None:
        """Sync every `MIRROR_INTERVAL_S` until cancelled."""
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            self.sync()
