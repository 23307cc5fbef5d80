"""The maca SRTPlatform: SGLang's out-of-tree platform for MetaX MACA GPUs.

SGLang resolves ``current_platform`` once per process (scheduler, detokenizer,
DP controller included) from the ``sglang.srt.platforms`` entry point;
``platform_plugin.activate`` names one of two classes from what
``maca_infer.common.device.resolve()`` found:

===========================  ======================  ===========================
question                     ``MacaSRTPlatform``     ``MacaEmulatedSRTPlatform``
                             (real MACA / CUDA)      (emulated: CPU plays maca)
===========================  ======================  ===========================
torch device of tensors      ``cuda:<rank>``         ``cpu``
torch.distributed backend    ``nccl`` (MetaX mccl)   ``gloo``
Triton kernels               yes                     no (torch references)
decode graph capture         DecodeCudaGraphRunner   no (eager)
default attention backend    ``maca``                ``maca``
fused ops (RMSNorm, SiLU)    maca_infer.common.ops   maca_infer.common.ops
runtime fixes (patching.py)  device fixes            + emulated-device fixes
===========================  ======================  ===========================

The emulated class lives in ``platform_emulated.py`` and overrides only what
differs; this module holds the real-device class and the helpers both use.

The dispatch key is ``maca`` (not ``cpu``) so SGLang's ``forward_cpu``
paths, which need a CPU build of sgl_kernel, are never picked; our OOT
forwards come first and ``forward_native`` is the fallback.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from sglang.srt.platforms.device_mixin import DeviceCapability, PlatformEnum
from sglang.srt.platforms.interface import SRTPlatform

from maca_infer.adapters.sglang.compat import LegacyPlatformHooks, PlatformCapabilities
from maca_infer.common import envs
from maca_infer.common.device import resolve
from maca_infer.common.log import get_logger, log_once

logger = get_logger(__name__)

DISPATCH_KEY = "maca"
# KV tokens the emulated device reserves when the user sets no
# --max-total-tokens: SGLang sizes the pool from "free device memory", which on
# a CPU host is the machine's RAM (the probe saw 72% of it taken).
EMULATED_DEFAULT_MAX_TOTAL_TOKENS = 16384

# MetaX's guide has users type `--attention-backend flashinfer` (and, for
# DeepSeek, `--enable-flashinfer-mla`). SGLang 0.5.23's FlashInfer backend
# needs flashinfer_python >= 0.7.2 (engine.py asserts it at start-up with a
# "please reinstall" message); MetaX ships flashinfer 0.2.6+metax. When the
# installed one cannot serve SGLang here, the maca backend runs instead.
FLASHINFER_DIST = "flashinfer_python"
FLASHINFER_MIN_VERSION = "0.7.2"
ATTENTION_BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def flashinfer_unusable_reason(emulated: bool) -> str | None:
    """Why SGLang's flashinfer backend cannot run on this maca device (None: it can)."""
    if emulated:
        return "the emulated maca device has no GPU for flashinfer's kernels"
    from importlib import metadata

    from packaging.version import Version

    try:
        installed = metadata.version(FLASHINFER_DIST)
    except metadata.PackageNotFoundError:
        return "MetaX's flashinfer is not installed"
    if Version(installed).release < Version(FLASHINFER_MIN_VERSION).release:
        return f"the installed flashinfer {installed} is older than the {FLASHINFER_MIN_VERSION} this SGLang needs"
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # a broken build fails in many ways
        return f"flashinfer {installed} does not import ({type(exc).__name__}: {exc})"
    return None


def map_flashinfer_to_maca(server_args, *, emulated: bool) -> list[str]:
    """``--*attention-backend flashinfer`` -> ``maca`` when flashinfer cannot run here; returns the fields changed."""
    asked = [f for f in ATTENTION_BACKEND_FIELDS if getattr(server_args, f, None) == "flashinfer"]
    if not asked:
        return []
    reason = flashinfer_unusable_reason(emulated)
    if reason is None:
        return []
    for name in asked:
        setattr(server_args, name, "maca")
    flags = ", ".join("--" + f.replace("_", "-") for f in asked)
    log_once(logger, logging.WARNING, "%s flashinfer: %s; running maca-infer's 'maca' attention backend instead",
             flags, reason)
    return asked


def _host_ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is optional for us
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def cpu_binding_for_ranks(ranks: int, cpus: list[int] | None = None) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND value giving ``ranks`` CPU ranks the usable cores.

    Cores are split into contiguous groups, one per rank ("0-3|4-7"); with
    fewer cores than ranks, ranks share cores round-robin ("0|1|0|1").
    """
    if ranks < 1:
        raise ValueError(f"ranks={ranks} must be >= 1")
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    groups = []
    if len(cpus) >= ranks:
        per = len(cpus) // ranks
        for r in range(ranks):
            chunk = cpus[r * per:(r + 1) * per]
            groups.append(f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else str(chunk[0]))
    else:
        groups = [str(cpus[r % len(cpus)]) for r in range(ranks)]
    return "|".join(groups)


class MacaSRTPlatform(LegacyPlatformHooks, SRTPlatform):
    """SRTPlatform for a real maca device: a MetaX GPU, or an NVIDIA GPU standing in.

    Tensors live on ``cuda:<rank>`` (mcPyTorch's name for the MetaX GPU),
    collectives run on nccl (MetaX's mccl), Triton kernels and SGLang's decode
    graph capture are available. The emulated device is
    :class:`~maca_infer.adapters.sglang.platform_emulated.MacaEmulatedSRTPlatform`,
    a subclass that overrides what differs; ``platform_plugin.activate`` picks
    one of the two from the device resolution, once per process, so nothing
    here asks which device it is on.
    """

    _enum = PlatformEnum.OOT
    device_name = "maca"
    supported_quantization = ["moe_wna16", "awq", "gptq", "w8a8_int8", "compressed-tensors"]
    # which of the two classes this is (for code outside the class, e.g. logs);
    # behaviour that differs lives in the subclass, never behind this flag
    emulated = False

    def __init__(self) -> None:
        super().__init__()
        self.resolution = resolve()
        # torch's device type for this process's tensors
        self.device_type = self.resolution.torch_device

    # -- capabilities ---------------------------------------------------------

    @property
    def capabilities(self) -> PlatformCapabilities:  # type: ignore[override]
        return PlatformCapabilities(supports_triton=True, graph_capture=True)

    # -- device identity and memory --------------------------------------------

    def get_device(self, device_id: int = 0) -> str:
        # SGLang formats this into server args: a string, never torch.device
        return "cuda" if device_id is None else f"cuda:{device_id}"

    def set_device(self, device) -> None:
        torch.cuda.set_device(device)

    def get_device_name(self, device_id: int = 0) -> str:
        return self.resolution.device_name

    def get_device_uuid(self, device_id: int = 0) -> str:
        return str(torch.cuda.get_device_properties(device_id).uuid)

    def get_device_capability(self, device_id: int = 0) -> Optional[DeviceCapability]:
        major, minor = torch.cuda.get_device_capability(device_id)
        return DeviceCapability(major, minor)

    def get_device_total_memory(self, device_id: int = 0) -> int:
        return int(torch.cuda.get_device_properties(device_id).total_memory)

    def get_current_memory_usage(self, device=None) -> float:
        return float(torch.cuda.max_memory_allocated(device))

    def get_available_memory(self, device_id: int = 0) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device_id)
        return int(free), int(total)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def is_pin_memory_available(self, device=None) -> bool:
        return True

    # -- distributed -----------------------------------------------------------

    def get_torch_distributed_backend_str(self) -> str:
        return "nccl"

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank)

    # -- subsystems --------------------------------------------------------------

    def get_default_attention_backend(self) -> str:
        return "maca"

    def get_graph_runner_cls(self):
        # SGLang's own decode graph runner: it captures through torch.cuda graphs,
        # which mcPyTorch provides on a MACA device
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

        return DecodeCudaGraphRunner

    def get_kv_pool_cls(self, *, kind):
        # SGLang's pools allocate on the platform device and need no change:
        # our kernels read their flat buffers as paged caches (attention_backend.py).
        from sglang.srt.mem_cache import memory_pool

        if kind == "mha":
            return memory_pool.MHATokenToKVPool
        if kind == "mla":
            return memory_pool.MLATokenToKVPool
        # "dsa" (DeepSeek sparse attention) has no maca backend; SGLang asks for
        # every kind while configuring, so answer "no opinion" instead of failing.
        return None

    def get_quantization_config(self, quantization: str):
        # moe_wna16: SGLang's loader, our W4A16 fused MoE / linear (moe_wna16.py);
        # w8a8_int8 / compressed-tensors INT8 W8A8: our per-token quant, int8 GEMM, fused MoE (w8a8_int8.py)
        from maca_infer.adapters.sglang import moe_wna16, w8a8_int8

        return moe_wna16.quantization_config_for(quantization) or w8a8_int8.quantization_config_for(quantization)

    def get_compile_backend(self, mode: str | None = None) -> str:
        return "inductor"

    def get_dispatch_key_name(self) -> str:
        return DISPATCH_KEY

    # -- lifecycle ---------------------------------------------------------------

    def apply_server_args_defaults(self, server_args) -> None:
        """Defaults for flags the user left unset (never overrides a user's choice, except
        ``flashinfer`` where it cannot run: see :func:`map_flashinfer_to_maca`)."""
        if getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = "maca"
        map_flashinfer_to_maca(server_args, emulated=self.emulated)

    def init_backend(self) -> None:
        from maca_infer.adapters.sglang.plugin import register

        register()

    def register_runtime_fixes(self) -> None:
        """Apply this device's ledgered SGLang fixes (patching.py); ``plugin.register()`` calls it."""
        from maca_infer.adapters.sglang import patching

        patching.register_device_fixes()
