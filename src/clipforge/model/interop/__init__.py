"""Adapters between clipforge's parameter names and other implementations' checkpoints.

- ``openai``: OpenAI / OpenCLIP state dicts (names, architecture inference, open_clip configs)
- ``hf``: Hugging Face ``CLIPModel`` (names, q/k/v split, config.json, preprocessor_config.json)
- ``torchscript``: reads OpenAI's TorchScript archives without running them

Each maps names and shapes one to one and raises ``CheckpointError`` on anything unmapped;
file reading and dispatch live in ``clipforge.model.checkpoints``.
"""
