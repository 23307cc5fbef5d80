"""maca-infer: LMDeploy, SGLang and Hugging Face inference on MetaX MACA GPUs.

Import map (layers, call flows, where to add things: docs/architecture.md):
    maca_infer.common.device   what the maca device is here; env; emulation
    maca_infer.common.ops      kernels + torch references + dispatch
    maca_infer.adapters.*      lmdeploy / sglang / hf glue (import lazily)
"""

__version__ = "0.1.0"
