"""The model: 3D ViT, connectors (HILT and the paper's ablations), the LLM with LoRA/QLoRA, export.

Built from the typed presets of ``model.config``; ``mllm.build_model(cfg)`` assembles the whole.
"""
