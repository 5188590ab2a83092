"""tiny-vlm: the built-in default vision-language model (LLaVA architecture).

A small CLIP vision tower trained from scratch on easy-vqa, an MLP projector and SmolLM2-135M-Instruct
with a small merged LoRA. `data` builds the training samples, `model` the configs, processor and
model, `lora` the adapter, `train` the two-stage recipe, `evaluate` the quality check and `assemble`
the loadable HF folder (the model store's entry point).
"""
