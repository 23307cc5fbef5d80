"""maca_infer.adapters.sglang: SGLang on the maca device.

Entry points (declared in pyproject.toml):
    sglang.srt.platforms: maca -> platform_plugin:activate   (MacaSRTPlatform)
    sglang.srt.plugins:   maca -> plugin:register            (attention backend
                                                              "maca", fused ops,
                                                              moe_wna16)
Launch as MetaX's users do:
    SGLANG_PLATFORM=maca python -m sglang.launch_server --model-path M --attention-backend maca
On a host with no accelerator, ``MACA_INFER_DEVICE=emulated`` runs the same
launch on the emulated maca device (CPU tensors, torch reference ops).

Nothing here imports SGLang at package import time.
"""
