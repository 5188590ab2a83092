"""Online distillation of an EAGLE/MSD head: teacher pass, drafter batch, loss and top-1 accuracy.

Per example, drafter entry i consumes token x_j (j = its source, see `eagle_inputs`) and is trained
to output the teacher's feature h_j (SmoothL1) and the teacher's next-token distribution at j
(cross-entropy against softmax(LM head(h_j)), weight 0.1, as EAGLE/MSD), on answer tokens only:
entries whose j + 1 is an answer position. Pooled visual entries (source -1) are never trained on.

Inside a draft tree the head reads its *own* features, so one teacher-forced pass trains only the
first tree level. `passes` > 1 unrolls the tree during training (the "training-time test" of
HASS / EAGLE-3): pass k re-runs every entry as a depth-k tree node, i.e. fused with the feature that
pass k-1 predicted for the entry before it, attending to exactly what the node would see at
inference: teacher-forced entries up to its root (pass 0) and its own ancestors (passes 1..k).
Worked example of the pass-2 mask row of entry i (root i-2): pass 0 keys <= i-2, pass 1 key i-1,
pass 2 key i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ....drafting.eagle_head import EagleHead
from ....drafting.eagle_inputs import prompt_entries
from ...engine.batch_inputs import batch_inputs
from ...engine.outputs import PromptInput
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
    inputs: torch.Tensor  # [B, n, H] drafter inputs in the head's dtype, zero-padded
    token_embeds: torch.Tensor  # [B, n, H] the token side of fc, for re-fusing with drafted features
    fused: torch.Tensor  # [B, n] bool: entries that go through fc
    loss_mask: torch.Tensor  # [B, n] bool
    feature_targets: torch.Tensor  # [M, H] teacher features h_j at the loss entries (M = loss_mask.sum())


@torch.no_grad()
def teacher_pass(target, examples: list[Example]) -> TeacherPass:
    """One batched forward of the target over right-padded rows, each token as the engine serves it
    (`engine.batch_inputs`): the prompt as prefilled (its images, M-RoPE positions, bidirectional image
    blocks, deepstack features), the answer as decoded causally after it. Only prompt tokens are image
    slots: an answer token equal to the placeholder is text, as in serving."""
    lengths = [len(e.token_ids) for e in examples]
    ids = torch.zeros(len(examples), max(lengths), dtype=torch.long, device=target.device)
    for row, example in enumerate(examples):
        ids[row, : lengths[row]] = torch.tensor(example.token_ids)
    prompts = [target.embed(PromptInput(e.token_ids[: e.answer_start], e.images)) for e in examples]
    embeds = target.embed_tokens(ids)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (example, prompt) in enumerate(zip(examples, prompts)):
        embeds[row, : example.answer_start] = prompt.embeds[0]  # visual embeddings at its image slots
        image_mask[row, : example.answer_start] = prompt.image_mask[0]
    inputs = batch_inputs(prompts, lengths)
    hidden = target.adapter.decoder(inputs_embeds=embeds, use_cache=False, **inputs).last_hidden_state
    return TeacherPass(ids, lengths, hidden, embeds, image_mask)


def draft_batch(
    head: EagleHead, embed_tokens, teacher: TeacherPass, examples: list[Example], noise: float,
    generator: torch.Generator | None,
) -> DraftBatch:
    """The drafter's entries for every example, padded into one batch, with its loss targets.

    EAGLE's feature noise (uniform in [-noise, noise]) goes on the features the drafter *reads*,
    so it learns to cope with its own imprecise features inside the tree; targets stay clean."""
    rows, targets = [], []
    dtype = head.fc.weight.dtype  # float32 in training: the teacher's bf16 features are upcast
    for b, example in enumerate(examples):
        length = teacher.lengths[b]
        clean = teacher.hidden[b, :length].to(dtype)
        jitter = (torch.rand(clean.shape, generator=generator, device=clean.device) * 2 - 1) * noise
        entries = prompt_entries(
            head, embed_tokens, teacher.ids[b, :length], clean + jitter,
            teacher.inputs_embeds[b, :length].to(dtype), teacher.image_mask[b, :length],
        )
        src = entries.sources
        mask = (src >= example.answer_start - 1) & (src <= length - 2)  # j + 1 is an answer token
        rows.append((entries.inputs, entries.token_embeds, entries.fused, mask))
        targets.append(clean[src[mask]])
    width = max(len(r[0]) for r in rows)

    def padded(column: int, pad: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([F.pad(r[column], pad + (0, width - len(r[column]))) for r in rows])

    return DraftBatch(padded(0, (0, 0)), padded(1, (0, 0)), padded(2, ()), padded(3, ()), torch.cat(targets))


def pass_mask(n: int, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, n, (k + 1) n] additive mask of unrolled pass k (see the module docstring), in the
    head's dtype (SDPA does not mask reliably with a mask of another dtype): query i sees pass-0
    keys <= i - k and, for m = 1..k, the pass-m key i - k + m."""
    query = torch.arange(n, device=device)[:, None]
    key = torch.arange(n, device=device)[None, :]
    blocks = [key <= query - k] + [key == query - k + m for m in range(1, k + 1)]
    allowed = torch.cat(blocks, dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def unrolled_features(head: EagleHead, batch: DraftBatch, passes: int) -> list[torch.Tensor]:
    """Predicted features at the loss entries, one [M, H] tensor per pass (pass 0 = teacher-forced)."""
    size, n, _ = batch.inputs.shape
    positions = torch.arange(n, device=batch.inputs.device).expand(size, n)
    cache = DynamicCache()  # holds every pass's keys, so pass k attends to passes 0..k
    inputs, found = batch.inputs, []
    for k in range(passes):
        out = head(inputs, positions, pass_mask(n, k, inputs.device, inputs.dtype), cache)
        found.append(out[batch.loss_mask])
        previous = F.pad(out[:, :-1], (0, 0, 1, 0))  # entry i reads what entry i - 1 predicted
        inputs = torch.where(batch.fused[..., None], head.fuse(batch.token_embeds, previous), batch.inputs)
    return found


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar, differentiable
    feature: float
    cross_entropy: float
    correct: list[int]  # per pass: loss entries whose draft top-1 equals the teacher's top-1
    count: int


def distill_loss(
    head: EagleHead, batch: DraftBatch, weight: torch.Tensor, softcap: float | None, ce_weight: float,
    passes: int,
) -> LossParts:
    """Mean over passes of SmoothL1(features) + ce_weight x CE(teacher distribution, draft's).

    weight: [K, H] the rows of the target's (frozen) LM head for the draft vocabulary (all V rows if
    it has none); both distributions are taken over these K tokens, the ones the head can draft.
    The weight is used in its own dtype: in bf16 the vocabulary projection, the costliest matmul
    here, runs ~2.5x faster on this CPU."""
    with torch.no_grad():
        teacher_logits = project(batch.feature_targets, weight, softcap)
        teacher_probs = teacher_logits.softmax(-1)
        teacher_top = teacher_logits.argmax(-1)
    feature_loss = cross_entropy = 0.0
    correct = []
    for features in unrolled_features(head, batch, passes):
        feature_loss = feature_loss + F.smooth_l1_loss(features, batch.feature_targets) / passes
        draft_logits = project(features, weight, softcap)
        cross_entropy = cross_entropy - (teacher_probs * draft_logits.log_softmax(-1)).sum(-1).mean() / passes
        correct.append(int((draft_logits.argmax(-1) == teacher_top).sum()))
    loss = feature_loss + ce_weight * cross_entropy
    return LossParts(loss, feature_loss.item(), cross_entropy.item(), correct, len(teacher_top))


def project(features: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits of `features` [M, H] over the rows of `weight` [K, H] (soft-capped if needed)."""
    logits = (features.to(weight.dtype) @ weight.T).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def top1_accuracy(head: EagleHead, target, examples: list[Example], batch_size: int, passes: int) -> list[float]:
    """Held-out draft top-1 accuracy per tree depth (pass): the share of answer entries whose drafted
    top-1 token equals the teacher's argmax over its *whole* vocabulary at the same position, with
    the previous depth's own drafted features as input; a token outside the draft vocabulary misses."""
    full, vocab = target.lm_head.weight, head.draft_vocab
    rows = full if vocab is None else full[vocab]
    correct, count = [0] * passes, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = draft_batch(head, target.embed_tokens, teacher_pass(target, chunk), chunk, 0.0, None)
        wanted = project(batch.feature_targets, full, target.softcap).argmax(-1)
        for k, features in enumerate(unrolled_features(head, batch, passes)):
            drafted = project(features, rows, target.softcap).argmax(-1)
            drafted = drafted if vocab is None else vocab[drafted]
            correct[k] += int((drafted == wanted).sum())
        count += len(wanted)
    return [c / max(count, 1) for c in correct]
