"""maca_infer.common.device: what the maca device is on this host.

Public API (stable; adapters and ops rely on it):
    resolve() -> Resolution        cached; kind in {"maca", "cuda-standin", "emulated"}
    torch_device() -> torch.device  "cuda" on a device, "cpu" when emulated
    is_emulated() -> bool
    activate() -> Resolution       env setup + emulation when emulated; idempotent
"""
