"""The draft LM's vocabulary against the target's: log-probs fitted to the target's width, and the
refusal of a draft LM that cannot read the target tokenizer's tokens."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specserve.drafting.draft_model import check_draft_vocabulary, fit_width


def test_fit_width_cuts_and_renormalises_or_pads():
    log_probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert fit_width(log_probs, None) is log_probs and fit_width(log_probs, 4) is log_probs
    cut = fit_width(log_probs, 2)  # the last two rows are padding, not tokens
    assert torch.allclose(cut.exp(), torch.tensor([[2 / 3, 1 / 3]]))
    padded = fit_width(log_probs, 6)
    assert padded.shape == (1, 6) and torch.equal(padded[:, :4], log_probs)
    assert padded[0, 4:].tolist() == [-math.inf, -math.inf]


def test_a_draft_lm_must_read_every_token():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    check_draft_vocabulary(model, 40)
    check_draft_vocabulary(model, 32)  # a padded draft vocabulary reads every token
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        check_draft_vocabulary(model, 41)
