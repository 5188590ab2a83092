"""EAGLE/MSD draft heads trained by online self-distillation on the target's own answers
(`specserve train-draft`): prompts, cached examples, the distillation loss and the training loop."""
