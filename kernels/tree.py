"""Draft trees: the ancestor closure, the tree attention mask, position ids and root-to-leaf paths;
`LayerMasks`, how a decoder whose layers attend differently (full / sliding window) takes its masks.

Conventions every caller relies on:

- node 0 is the ROOT, the last emitted token, which is not yet in the KV cache;
- nodes 1..N-1 are draft tokens in topological order: ``parents[b, i] < i`` and ``parents[b, 0] == -1``;
- a leading batch dimension B; trees of different sizes are padded to one N with PADDING nodes
  (token ``PAD_TOKEN`` = -1, parent 0), which acceptance never accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

PAD_TOKEN = -1


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class DraftTree:
    """A batch of draft trees of N nodes each (see the module docstring for the conventions).

    Build it with `from_parents` (or `chain_tree`), which computes `depths` and `ancestors`.
    """

    tokens: Tensor  # [B, N] long, PAD_TOKEN on padding nodes
    parents: Tensor  # [B, N] long, -1 at the root
    depths: Tensor  # [B, N] long, root 0
    ancestors: Tensor  # [B, N, N] bool, [b, i, j] = node j is node i or one of its ancestors

    @classmethod
    def from_parents(cls, tokens: Tensor, parents: Tensor) -> DraftTree:
        """Validate the parent pointers and close them into the ancestor relation.

        Pointer jumping: after step k, ``reach[i]`` holds the ancestors of i at distance < 2**k, so
        ceil(log2(N)) batched gathers replace any python loop over nodes.

        Example (B=1, N=5)::

            tokens  = [[7, 3, 9, 4, 5]]
            parents = [[-1, 0, 0, 1, 1]]        # 0 -> {1, 2}, 1 -> {3, 4}
            depths  = [[0, 1, 1, 2, 2]]
            ancestors[0] = [[1,0,0,0,0],        # row i = ancestors-or-self of node i
                            [1,1,0,0,0],
                            [1,0,1,0,0],
                            [1,1,0,1,0],
                            [1,1,0,0,1]]
        """
        _validate(tokens, parents)
        batch, n = tokens.shape
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        reach = eye.expand(batch, n, n).clone()
        # The root points to itself so jumps past it stay at the root.
        jump = parents.clamp(min=0)
        for _ in range((n - 1).bit_length()):  # ceil(log2(n)) doublings cover depth n - 1
            reach = reach | reach.gather(1, jump[:, :, None].expand(batch, n, n))
            jump = jump.gather(1, jump)
        depths = reach.sum(-1) - 1
        return cls(tokens=tokens, parents=parents, depths=depths, ancestors=reach)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def max_depth(self) -> int:
        """Depth of the deepest node over the batch (padding nodes count as depth 1).

        One host sync the first time, then cached; acceptance uses it to size its outputs.
        """
        return int(self.depths.max())

    def attention_mask(self, prefix_len: int | Tensor, dtype: torch.dtype, width: int | None = None,
                       window: int | None = None) -> Tensor:
        """Additive mask [B, 1, N, width] for verifying the tree after a cached prefix.

        prefix_len: an int, or [B] long when every row has its own prefix (a batch of sequences);
        width: the key length the forward attends over (default prefix_len + N; with per-row prefixes
        it must be at least max(prefix_len) + N). Row b's nodes see keys [0, prefix_len[b]) and their
        own ancestors-or-self at prefix_len[b] + j; every other key (another row's longer prefix,
        stale slots) is masked. 0.0 where allowed, ``finfo(dtype).min`` elsewhere (not -inf, so a
        fully masked row cannot turn into NaN). Pass it to a HF model as ``attention_mask`` with
        `position_ids`.

        window: a sliding-window layer's mask: a node also loses the keys `window` or more tokens before
        it, counted in plain decoding's order (prefix key k sits at k, ancestor j at prefix_len + depth j,
        the node itself at prefix_len + its depth), as transformers' sliding masks count.

        Example (one row, prefix_len 2, width 6, tree 0 -> 1, 0 -> 2): allowed keys per node
            node 0: [1 1 | 1 0 0 | 0]
            node 1: [1 1 | 1 1 0 | 0]
            node 2: [1 1 | 1 0 1 | 0]
        with window 2, node 0 (at 2) loses key 0, nodes 1 and 2 (at 3) lose keys 0 and 1:
            node 0: [0 1 | 1 0 0 | 0]
            node 1: [0 0 | 1 1 0 | 0]
            node 2: [0 0 | 1 0 1 | 0]
        """
        batch, n = self.tokens.shape
        device = self.tokens.device
        if isinstance(prefix_len, int):
            width = prefix_len + n if width is None else width
            prefix_len = torch.full((batch,), prefix_len, dtype=torch.long, device=device)
        keys = torch.arange(width, device=device)
        allowed = (keys < prefix_len[:, None]).expand(n, batch, width).transpose(0, 1).clone()  # [B, N, W]
        slots = (prefix_len[:, None] + torch.arange(n, device=device))[:, None, :].expand(batch, n, n)
        allowed.scatter_(2, slots, self.ancestors)
        if window is not None:
            # each key's place in plain decoding: its index in the prefix, prefix + depth in the tree
            places = keys.expand(batch, width).clone()
            places.scatter_(1, slots[:, 0], prefix_len[:, None] + self.depths)
            queries = prefix_len[:, None] + self.depths  # [B, N]
            allowed &= places[:, None, :] > queries[:, :, None] - window
        return additive_mask(allowed, dtype)

    def position_ids(self, prefix_len: int | Tensor) -> Tensor:
        """[B, N] = prefix_len + depth (prefix_len an int or [B]): a node sits right after its
        ancestors, as in plain decoding."""
        if isinstance(prefix_len, Tensor):
            return self.depths + prefix_len[:, None]
        return self.depths + prefix_len

    def packing(self, one_call: bool = False) -> Packing | None:
        """The batch without its padding nodes, for a packed forward (`kv_cache` module docstring); None
        unless padding is worth leaving out (`worth_packing`; `one_call`: attention takes the packed
        batch in one call). Padding ends a row (`stack_trees`).

        Example: tokens [[5, 6, 7], [8, -1, -1]] -> index [0, 1, 2, 3], counts [3, 1] (4 real of 6)."""
        real = self.tokens != PAD_TOKEN
        counts = real.sum(1)
        if not torch.equal(real, torch.arange(self.num_nodes, device=real.device) < counts[:, None]):
            raise ValueError("padding nodes must end their rows")
        counts = counts.tolist()
        if not worth_packing(sum(counts), self.tokens.numel(), one_call):
            return None
        return Packing(real.flatten().nonzero().squeeze(1), counts)

    def path_to(self, nodes: Tensor, width: int) -> Tensor:
        """Root-to-node paths as node indices.

        nodes: [...]; a tensor of node indices, one per batch row ([B]) or several per row ([B, L]).
        Returns [..., width] with the node at depth d in column d, -1 after the node's depth
        (width must exceed the nodes' depths).

        Example (the tree of `from_parents`)::

            nodes = [[3, 2]], width 3  ->  [[[0, 1, 3], [0, 2, -1]]]
        """
        batch, n = self.tokens.shape
        flat = nodes.reshape(batch, -1)  # [B, L]
        anc = self.ancestors.gather(1, flat[:, :, None].expand(-1, -1, n))  # [B, L, N]
        # Each ancestor j lands in column depth[j]; non-ancestors go to a spare column that is dropped.
        column = torch.where(anc, self.depths[:, None, :], width)
        node_ids = torch.arange(n, device=nodes.device).expand_as(column)
        paths = torch.full((*flat.shape, width + 1), -1, dtype=torch.long, device=nodes.device)
        paths.scatter_(2, column, node_ids)
        return paths[..., :width].reshape(*nodes.shape, width)


def worth_packing(real: int, padded: int, one_call: bool = False) -> bool:
    """Whether a batch of `padded` nodes of which `real` are real runs packed. Where attention takes the
    packed batch in one call (`one_call`: the CPU kernel, `cpu_attention`) any padding is worth leaving
    out. Where it attends row by row, an SDPA call per row costs about what a third of padding saves in
    the linear layers (SmolLM2 bf16, 8 rows: `benchmarks/results/profile-step-smollm2-135m-bf16-packed.md`
    and, for one call, `profile-step-smollm2-135m-bf16-kernel.md`)."""
    return real < padded if one_call else 3 * real <= 2 * padded


@dataclass(frozen=True)
class Packing:
    """A batch of trees as one row of its real nodes (`DraftTree.packing`)."""

    index: Tensor  # [T] long: flat indices (row * N + node) of the real nodes, row by row
    counts: list[int]  # real nodes per row: row b's first counts[b] nodes


def stack_trees(trees: list[DraftTree]) -> DraftTree:
    """One batch from single-row trees of different sizes, padded to the largest with padding nodes
    (token PAD_TOKEN, parent 0), which acceptance never accepts and the mask keeps to themselves."""
    n = max(t.num_nodes for t in trees)
    device = trees[0].tokens.device
    tokens = torch.full((len(trees), n), PAD_TOKEN, dtype=torch.long, device=device)
    parents = torch.zeros((len(trees), n), dtype=torch.long, device=device)
    for row, tree in enumerate(trees):
        tokens[row, : tree.num_nodes] = tree.tokens[0]
        parents[row, : tree.num_nodes] = tree.parents[0]
    parents[:, 0] = -1
    return DraftTree.from_parents(tokens, parents)


def chain_tree(tokens: Tensor) -> DraftTree:
    """A chain: tokens [B, K + 1] = root followed by K draft tokens, node i the parent of node i + 1."""
    batch, n = tokens.shape
    parents = torch.arange(-1, n - 1, device=tokens.device).expand(batch, n).contiguous()
    return DraftTree.from_parents(tokens, parents)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask [B, N, S] (or [N, S]) -> additive [B, 1, N, S] (or [1, 1, N, S]) in `dtype`: 0.0 where
    allowed, ``finfo(dtype).min`` elsewhere (not -inf, so a fully masked row cannot turn into NaN)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None] if allowed.dim() == 2 else mask[:, None]


FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' `config.layer_types` names


@dataclass(frozen=True)
class LayerMasks:
    """The `attention_mask` a decoder takes when some of its layers see only a sliding window.

    transformers' decoders take either one 4D mask for every layer or, where the config lists
    `layer_types`, a dict of 4D masks keyed by layer type. Every cached row stays in the slot cache;
    a sliding-window layer's mask hides the rows `window` or more tokens before the query.
    """

    window: int | None = None  # the sliding layers' window; None: no layer slides
    layer_types: tuple[str, ...] = ()  # the config's layer types; (): every layer alike

    @classmethod
    def of(cls, config) -> LayerMasks:
        """From a text config: a `sliding_window` applies to the "sliding_attention" layers of its
        `layer_types`, or to every layer when it lists none (Mistral, Mixtral, Phi-3, Starcoder2)."""
        types = tuple(sorted(set(getattr(config, "layer_types", None) or ())))
        window = getattr(config, "sliding_window", None)
        if not window or (types and SLIDING not in types):
            return cls()
        return cls(int(window), types)

    def __call__(self, mask: Callable[[int | None], Tensor]) -> Tensor | dict[str, Tensor]:
        """`mask(window)` -> an additive 4D mask whose keys lie less than `window` tokens before their
        query (None: no limit), as the decoder's `attention_mask`."""
        if self.window is None:
            return mask(None)
        if not self.layer_types:
            return mask(self.window)
        return {kind: mask(self.window if kind == SLIDING else None) for kind in self.layer_types}


def _validate(tokens: Tensor, parents: Tensor) -> None:
    """Raise ValueError unless the shapes and parent pointers follow the conventions (one host sync)."""
    if tokens.dim() != 2 or tokens.shape != parents.shape or tokens.shape[1] < 1:
        shapes = f"{tuple(tokens.shape)} and {tuple(parents.shape)}"
        raise ValueError(f"tokens and parents must both be [B, N>=1], got {shapes}")
    if tokens.dtype != torch.long or parents.dtype != torch.long:
        raise ValueError(f"tokens and parents must be torch.long, got {tokens.dtype} and {parents.dtype}")
    index = torch.arange(tokens.shape[1], device=parents.device)
    bad_root = parents[:, 0] != -1
    bad_child = (parents[:, 1:] < 0) | (parents[:, 1:] >= index[1:])
    if bool(bad_root.any() | bad_child.any()):
        raise ValueError("parents must be -1 at node 0 and satisfy 0 <= parents[:, i] < i for i >= 1")
