"""Training, on top of the engine and the model store: EAGLE/MSD draft heads by self-distillation
(`draft_head/`, the `specserve train-draft` command) and tiny-vlm's own recipe (`tiny_vlm/`)."""
