"""Framework-free core: device resolution and kernels.

Nothing under ``maca_infer.common`` imports lmdeploy, sglang, transformers or
diffusers.
"""
