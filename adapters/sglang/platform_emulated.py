"""The maca SRTPlatform on the emulated device: SGLang on CPU tensors.

``platform_plugin.activate`` names this class when ``resolve().kind`` is
``emulated`` (``MACA_INFER_DEVICE=emulated``, no accelerator); on a MetaX GPU
or the CUDA stand-in it names :class:`~maca_infer.adapters.sglang.platform.
MacaSRTPlatform`, which this class extends with what differs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from sglang.srt.platforms.device_mixin import DeviceCapability

from maca_infer.adapters.sglang import compat
from maca_infer.adapters.sglang.compat import PlatformCapabilities
from maca_infer.adapters.sglang.platform import (
    EMULATED_DEFAULT_MAX_TOTAL_TOKENS,
    MacaSRTPlatform,
    _host_ram_bytes,
    _process_rss_bytes,
    cpu_binding_for_ranks,
)
from maca_infer.common import envs
from maca_infer.common.log import get_logger

logger = get_logger(__name__)


class MacaEmulatedSRTPlatform(MacaSRTPlatform):
    """The maca platform with the CPU playing the device: tensors on ``cpu``.

    Every other framework sees the emulated maca device through the torch.cuda
    emulation (``common/device/emulation``: ``torch.cuda.*`` and
    ``device="cuda"`` answered on the CPU). SGLang does not, by choice:
    SGLang's in-tree ``is_cuda()`` is ``torch.cuda.is_available() and
    torch.version.cuda``, and where it is true dozens of SGLang modules import
    ``sgl_kernel`` / ``flashinfer`` (CUDA-only wheels) at import time. So in
    SGLang processes ``platform_plugin`` switches the emulation off before
    those modules load, and this platform runs SGLang on plain CPU tensors
    through SGLang's platform seam:

    - device ``"cpu"``, collectives on gloo, no pinned memory;
    - no Triton and no graph capture (capabilities all off; compile backend
      ``eager``); our ops dispatch to their torch references;
    - memory: the budget ``MACA_INFER_EMU_MEMORY_GB`` (default a quarter of
      host RAM), used = this process's RSS;
    - server-arg defaults SGLang would otherwise size from host RAM or route
      to CUDA-only code (never over a user's value);
    - the emulated-device runtime fixes of ``patching.py`` (flags and kernels
      SGLang picks for CUDA unless its own CPU engine is on), applied through
      the one patch helper's ledger next to the device fixes.
    """

    emulated = True

    # -- capabilities ---------------------------------------------------------

    @property
    def capabilities(self) -> PlatformCapabilities:  # type: ignore[override]
        # CPU tensors: no Triton launch, no stream capture, no NCCL
        return PlatformCapabilities()

    # -- device identity and memory --------------------------------------------

    def get_device(self, device_id: int = 0) -> str:
        return "cpu"

    def set_device(self, device) -> None:
        pass  # one host: nothing to select

    def get_device_uuid(self, device_id: int = 0) -> str:
        return f"maca-emulated-{device_id}"

    def get_device_capability(self, device_id: int = 0) -> Optional[DeviceCapability]:
        return None

    def get_device_total_memory(self, device_id: int = 0) -> int:
        budget = envs.emu_memory_bytes()
        return budget if budget is not None else _host_ram_bytes() // 4

    def get_current_memory_usage(self, device=None) -> float:
        # the emulated device's memory is this process's RAM
        return float(_process_rss_bytes())

    def get_available_memory(self, device_id: int = 0) -> tuple[int, int]:
        total = self.get_device_total_memory(device_id)
        return max(0, total - _process_rss_bytes()), total

    def empty_cache(self) -> None:
        pass

    def synchronize(self) -> None:
        pass  # CPU ops run synchronously

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    # -- distributed -----------------------------------------------------------

    def get_torch_distributed_backend_str(self) -> str:
        return "gloo"

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    # -- subsystems --------------------------------------------------------------

    def get_graph_runner_cls(self):
        return None  # graph_capture is off: SGLang never asks

    def get_compile_backend(self, mode: str | None = None) -> str:
        return "eager"

    # -- lifecycle ---------------------------------------------------------------

    def apply_server_args_defaults(self, server_args) -> None:
        """The device's defaults, then the emulated ones (never over a user's choice)."""
        super().apply_server_args_defaults(server_args)
        if getattr(server_args, "enable_dp_attention", False):
            compat.require("emulated_dp_attention")
        server_args.disable_cuda_graph = True
        if getattr(server_args, "max_total_tokens", None) is None:
            server_args.max_total_tokens = EMULATED_DEFAULT_MAX_TOTAL_TOKENS
        if getattr(server_args, "sampling_backend", None) is None:
            server_args.sampling_backend = "pytorch"
        ranks = 1
        for name in ("tp_size", "pp_size", "dp_size"):
            ranks *= int(getattr(server_args, name, 1) or 1)
        if ranks > 1 and envs.external("SGLANG_CPU_OMP_THREADS_BIND") is None:
            # SGLang binds each CPU rank's OpenMP threads to one NUMA node and
            # refuses more ranks than nodes unless told which cores each rank
            # gets (its own variable); spawned ranks inherit it.
            binding = cpu_binding_for_ranks(ranks)
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = binding
            logger.info("SGLANG_CPU_OMP_THREADS_BIND=%s (%d CPU ranks on the emulated device)", binding, ranks)

    def init_backend(self) -> None:
        super().init_backend()
        logger.info("SGLang runs on the emulated maca device (CPU tensors, torch reference ops)")

    def register_runtime_fixes(self) -> None:
        """The device fixes, then those only the emulated device needs (patching.py)."""
        from maca_infer.adapters.sglang import patching

        super().register_runtime_fixes()
        patching.register_emulated_device_fixes()
