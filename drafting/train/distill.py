"""Online distillation of an EAGLE/MSD head: teacher pass, drafter batch, loss and top-1 accuracy.

Per example, drafter entry k consumes token x_j (j = its source, see `eagle_inputs`) and is trained
to output the teacher's feature h_j (SmoothL1) and the teacher's next-token distribution at j
(cross-entropy against softmax(LM head(h_j)), weight 0.1, as EAGLE/MSD), on answer tokens only:
entries whose j + 1 is an answer position. Pooled visual entries (source -1) are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..eagle_head import EagleHead
from ..eagle_inputs import prompt_entries
from .data import Example


@dataclass(frozen=True)
class TeacherPass:
    ids: torch.Tensor  # [B, T] right-padded token ids
    lengths: list[int]
    hidden: torch.Tensor  # [B, T, H] final-norm hidden states (teacher dtype)
    inputs_embeds: torch.Tensor  # [B, T, H] with the visual embeddings at image slots
    image_mask: torch.Tensor  # [B, T] bool


@dataclass(frozen=True)
class DraftBatch:
    inputs: torch.Tensor  # [B, n, H] float32 drafter inputs, zero-padded
    loss_mask: torch.Tensor  # [B, n] bool
    feature_targets: torch.Tensor  # [M, H] teacher features h_j at the loss entries (M = loss_mask.sum())


@torch.no_grad()
def teacher_pass(target, examples: list[Example]) -> TeacherPass:
    """One batched forward of the target. Right padding needs no attention mask: with causal
    attention no real token sees a pad after it."""
    lengths = [len(e.token_ids) for e in examples]
    ids = torch.zeros(len(examples), max(lengths), dtype=torch.long, device=target.device)
    for row, example in enumerate(examples):
        ids[row, : lengths[row]] = torch.tensor(example.token_ids)
    embeds = target.embed_tokens(ids)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        features = target.adapter.image_features(torch.cat(pixels).to(target.device, target.dtype))
        image_mask = ids == target.adapter.image_token_id
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
    hidden = target.adapter.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return TeacherPass(ids, lengths, hidden, embeds, image_mask)


def draft_batch(
    head: EagleHead, embed_tokens, teacher: TeacherPass, examples: list[Example], noise: float,
    generator: torch.Generator | None,
) -> DraftBatch:
    """The drafter's entries for every example, padded into one batch, with its loss targets.

    EAGLE's feature noise (uniform in [-noise, noise]) goes on the features the drafter *reads*,
    so it learns to cope with its own imprecise features inside the tree; targets stay clean."""
    rows, masks, targets = [], [], []
    for b, example in enumerate(examples):
        length = teacher.lengths[b]
        clean = teacher.hidden[b, :length].float()
        jitter = (torch.rand(clean.shape, generator=generator, device=clean.device) * 2 - 1) * noise
        entries = prompt_entries(
            head, embed_tokens, teacher.ids[b, :length], clean + jitter,
            teacher.inputs_embeds[b, :length].float(), teacher.image_mask[b, :length],
        )
        src = entries.sources
        mask = (src >= example.answer_start - 1) & (src <= length - 2)  # j + 1 is an answer token
        rows.append(entries.inputs)
        masks.append(mask)
        targets.append(clean[src[mask]])
    width = max(len(r) for r in rows)
    inputs = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
    loss_mask = torch.stack([F.pad(m, (0, width - len(m))) for m in masks])
    return DraftBatch(inputs, loss_mask, torch.cat(targets))


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """[1, 1, n, n] additive float32 causal mask (right padding needs nothing more)."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar, differentiable
    feature: float
    cross_entropy: float
    correct: int  # loss entries whose draft top-1 equals the teacher's top-1
    count: int


def distill_loss(
    head: EagleHead, batch: DraftBatch, weight: torch.Tensor, softcap: float | None, ce_weight: float
) -> LossParts:
    """SmoothL1(features) + ce_weight x CE(teacher distribution, draft distribution) on loss entries.

    weight: [K, H] the rows of the target's (frozen) LM head for the draft vocabulary (all V rows if
    it has none); both distributions are taken over these K tokens, the ones the head can draft.
    The weight is used in its own dtype: in bf16 the vocabulary projection, the costliest matmul
    here, runs ~2.5x faster on this CPU."""
    n = batch.inputs.shape[1]
    positions = torch.arange(n, device=batch.inputs.device).expand(len(batch.inputs), n)
    features = head(batch.inputs, positions, causal_mask(n, batch.inputs.device))[batch.loss_mask]
    feature_loss = F.smooth_l1_loss(features, batch.feature_targets)
    draft_logits = project(features, weight, softcap)
    with torch.no_grad():
        teacher_logits = project(batch.feature_targets, weight, softcap)
        teacher_probs = teacher_logits.softmax(-1)
    cross_entropy = -(teacher_probs * draft_logits.log_softmax(-1)).sum(-1).mean()
    correct = int((draft_logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
    loss = feature_loss + ce_weight * cross_entropy
    return LossParts(loss, feature_loss.item(), cross_entropy.item(), correct, len(features))


def project(features: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits of `features` [M, H] over the rows of `weight` [K, H] (soft-capped if needed)."""
    logits = (features.to(weight.dtype) @ weight.T).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def top1_accuracy(head: EagleHead, target, examples: list[Example], batch_size: int) -> float:
    """Held-out draft top-1 accuracy: the share of answer entries whose drafted top-1 token equals the
    teacher's argmax over its *whole* vocabulary at the same position (teacher forcing, one step
    ahead); a teacher token outside the draft vocabulary counts as a miss."""
    full = target.lm_head.weight
    vocab = head.draft_vocab
    rows = full if vocab is None else full[vocab]
    correct = count = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = draft_batch(head, target.embed_tokens, teacher_pass(target, chunk), chunk, 0.0, None)
        n = batch.inputs.shape[1]
        positions = torch.arange(n).expand(len(batch.inputs), n)
        features = head(batch.inputs, positions, causal_mask(n, batch.inputs.device))[batch.loss_mask]
        drafted = project(features, rows, target.softcap).argmax(-1)
        drafted = drafted if vocab is None else vocab[drafted]
        wanted = project(batch.feature_targets, full, target.softcap).argmax(-1)
        correct, count = correct + int((drafted == wanted).sum()), count + len(wanted)
    return correct / max(count, 1)
