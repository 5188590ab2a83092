"""Logits processing (logit bias and banned end tokens, temperature, top-k, top-p), seeded sampling
and OpenAI-style logprobs.

Every sampling parameter may be a python number (one request) or a tensor of shape [B] (one value
per batch row), broadcast over the trailing dimensions of logits [B, ..., V], so one batch can mix
requests. Randomness comes from a `Generators` value: None (torch's default generator), one
`torch.Generator`, or a sequence of one generator (or None) per batch row so that each seeded
request draws from its own stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator | None] | None


@dataclass(frozen=True)
class LogitsParams:
    """What turns one request's logits into its sampling distribution (`process_logits`)."""

    temperature: float = 0.0  # 0 = greedy: the argmax, no distribution
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # top-k filtering, 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(
    logits: Tensor,  # [B, ..., V]
    temperature: Tensor | float,  # > 0, python number or [B]
    top_p: Tensor | float = 1.0,  # in (0, 1], 1 = off; python number or [B]
    top_k: Tensor | int = 0,  # 0 = off; python number or [B]
) -> Tensor:
    """Target distribution [B, ..., V] after temperature, then top-k, then top-p, renormalised.

    Nucleus: keep the smallest set of most likely tokens (after top-k) whose mass reaches top_p;
    the most likely token is always kept. The result is float32, or float64 for float64 logits.
    Temperature 0 (greedy) is not handled here: greedy decoding takes the argmax of the logits.

    Example (V=4, temperature 1, top_k 3, top_p 0.6)::

        softmax(logits) = [0.1, 0.4, 0.3, 0.2]
        top_k=3 keeps tokens 1, 2, 3      -> [0, 0.444, 0.333, 0.222]
        top_p=0.6: mass before token 2 is 0.444 < 0.6, before token 3 it is 0.778 -> drop token 3
        result                            = [0, 0.571, 0.429, 0]
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(dtype) / _per_row(temperature, logits)
    if _is_off(top_p, 1.0) and _is_off(top_k, 0):
        return torch.softmax(scaled, dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = _per_row(top_k, logits)
    keep = (k <= 0) | (rank < k)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # A token stays if the mass strictly before it is below top_p: this keeps the smallest
    # reaching set, and always the first token. top_p >= 1 keeps all (cumsum rounding aside).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    p = _per_row(top_p, logits)
    keep = keep & ((mass_before < p) | (p >= 1))
    sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)


def constrain_logits(
    logits: Tensor,  # [B, N, V]: the target's logits at every node of a batch of trees
    depths: Tensor,  # [B, N]: each node's depth in its tree (the root is 0)
    bias: Tensor | None = None,  # [B, V]: added to every node's logits (OpenAI's logit_bias), or None
    end_ids: Tensor | None = None,  # [E]: the tokens that end a sequence (EOS)
    end_banned: Tensor | None = None,  # [B]: a node at depth < end_banned[b] may not be followed by an end token
    allowed: Tensor | None = None,  # [B, N, V] bool: the tokens a grammar allows after each node, or None
) -> Tensor:
    """The logits a request's constraints leave, before temperature and sampling (so greedy decoding,
    acceptance and the bonus token all see them). Returns `logits` itself when there is nothing to do.

    `end_banned` carries `min_tokens`: the node at depth d predicts the sequence's (emitted + d)-th
    token, so with `min_tokens` m a row bans end tokens below depth m - emitted. Example: a row that
    has emitted 3 tokens with min_tokens 5 gets end_banned 2: the root (depth 0) and depth-1 nodes
    cannot be followed by EOS, depth 2 and deeper can.

    `allowed` carries a response format's grammar: every other token gets -inf at that node.
    """
    if bias is None and allowed is None and (end_banned is None or not bool((end_banned > 0).any())):
        return logits
    out = logits.clone()
    if bias is not None:
        out += bias[:, None, :].to(out.dtype)
    if end_banned is not None and end_ids is not None and len(end_ids):
        banned = depths < end_banned[:, None]  # [B, N]
        ends = out[..., end_ids]
        out[..., end_ids] = ends.masked_fill(banned[..., None], float("-inf"))
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    return out


def sample(probs: Tensor, generator: Generators = None) -> Tensor:
    """One token id per distribution: probs [..., V] (need not be normalised) -> [...] long.

    Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i / sum(p),
    for any number of leading dimensions, with no host sync. All-zero rows give token 0.
    """
    noise = random_exponential(probs.shape, generator, probs.device)
    return race(probs, noise)


def race(weights: Tensor, noise: Tensor) -> Tensor:
    """argmax(weights / noise) over the last dim: the sample `sample` draws, given its Exp(1) noise."""
    return (weights / noise).argmax(dim=-1)


def random_uniform(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """float32 uniforms in [0, 1) of `shape`; a generator sequence draws row b of dim 0 from its b-th entry."""
    return _draw(shape, generator, device, lambda t, g: t.uniform_(generator=g))


def random_exponential(shape: Sequence[int], generator: Generators, device: torch.device) -> Tensor:
    """float32 Exp(1) draws of `shape`, strictly positive, with the same generator rules as `random_uniform`."""
    noise = _draw(shape, generator, device, lambda t, g: t.exponential_(generator=g))
    # exponential_ may return exactly 0; 0 / 0 would be NaN and argmax would pick it.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True, eq=False)
class TokenLogprobs:
    """OpenAI `logprobs` material for a set of positions."""

    chosen: Tensor  # [...] float32, log-probability of the emitted token (NaN where the id is -1)
    top_values: Tensor  # [..., k] float32, descending
    top_ids: Tensor  # [..., k] long


def logprobs_topk(logits: Tensor, chosen: Tensor, k: int) -> TokenLogprobs:
    """Log-probabilities of the chosen tokens and the k most likely alternatives.

    logits: [..., V] raw model logits; chosen: [...] long token ids (-1 = padding).
    These are log_softmax of the RAW logits, i.e. the model's own distribution before temperature,
    top-k and top-p (vLLM's default), so they do not depend on the request's sampling settings and
    a token cut by top-p still gets a finite log-probability.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, chosen.clamp(min=0)[..., None])[..., 0]
    picked = picked.masked_fill(chosen < 0, float("nan"))
    top = logp.topk(k, dim=-1)
    return TokenLogprobs(chosen=picked, top_values=top.values, top_ids=top.indices)


def _per_row(value: Tensor | float, like: Tensor) -> Tensor | float:
    """A python number as is; a [B] tensor reshaped to [B, 1, ..., 1] to broadcast over `like`."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    return value.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


def _is_off(value: Tensor | float, off: float) -> bool:
    """True only for a python number equal to the no-op value (a tensor would cost a host sync)."""
    return not isinstance(value, Tensor) and value == off


def _draw(shape, generator: Generators, device: torch.device, fill) -> Tensor:
    """Fill a float32 tensor of `shape` with `fill(tensor, generator)`, per row for a generator sequence."""
    if generator is None or isinstance(generator, torch.Generator):
        return fill(torch.empty(tuple(shape), dtype=torch.float32, device=device), generator)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} rows")
    rows = [fill(torch.empty(tuple(shape[1:]), dtype=torch.float32, device=device), g) for g in generator]
    return torch.stack(rows)
