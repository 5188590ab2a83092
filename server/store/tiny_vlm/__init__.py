"""tiny-vlm: the built-in default vision-language model (LLaVA architecture).

A small CLIP vision tower trained from scratch on easy-vqa, an MLP projector and SmolLM2-135M-Instruct
with a small merged LoRA. `model` builds the configs, processor and model, `lora` the adapter and
`assemble` the loadable HF folder (the model store's entry point). The recipe that trained the
committed assets and its quality check live in `server/training/tiny_vlm/`.
"""
