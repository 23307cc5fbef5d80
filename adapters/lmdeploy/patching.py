"""The runtime patches of LMDeploy, declared in the one patch helper's ledger.

Each patch is a record of ``maca_infer.common.patching.LEDGER`` (target, why,
how, versions, remove-when), declared here when this module is imported
(no LMDeploy import, so ``maca-infer patches list --runtime`` lists them
anywhere) and applied by ``lmdeploy_patches.py`` when LMDeploy itself imports
the patched module (see ``import_hooks.py``), in every LMDeploy process.

``apply`` / ``patch`` / ``is_patched`` / ``revert`` / ``revert_all`` /
``ledger`` are this adapter's short names for the helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maca_infer.common.log import get_logger
from maca_infer.common.patching import LEDGER, RuntimePatch, object_path
from maca_infer.common.versions import range_of

logger = get_logger(__name__)

OWNER = "lmdeploy"
VERSIONS = f"{range_of('lmdeploy')} (checked on 0.18.0)"

# the LMDeploy modules whose import applies the patches (import_hooks.py hooks them)
MACA_OP_BACKEND = "lmdeploy.pytorch.backends.dlinfer.maca.op_backend"
ZMQ_ENGINE = "lmdeploy.pytorch.engine.mp_engine.zmq_engine"
BASE_WORKER = "lmdeploy.pytorch.engine.executor.base_worker"
WEIGHT_LOADER = "lmdeploy.pytorch.weight_loader.model_weight_loader"


def _declare(target: str, *, why: str, how: str, remove_when: str) -> RuntimePatch:
    return LEDGER.declare(target, owner=OWNER, why=why, how=how, versions=VERSIONS, remove_when=remove_when)


UPDATE_STEP_CONTEXT = _declare(
    f"{MACA_OP_BACKEND}.MacaOpsBackend.update_step_context",
    why="0.18.0 passes max_q_seq_len= to DlinferAttentionMetadata, which now wants max_q_seqlen, "
        "cu_seqlens_q, cu_seqlens_q_cpu and kv_seqlens_cpu: TypeError at the first step on every maca host",
    how="classmethod lmdeploy_patches.maca_update_step_context builds the complete 0.18 metadata "
        "(vectorised cache-slot computation, one host sync per step) and a single-rank MoeMetadata "
        "(LMDeploy's dlinfer W8A8 MoE raises without one; only its Ascend backend builds it)",
    remove_when="LMDeploy's MacaOpsBackend.update_step_context fills the 0.18 DlinferAttentionMetadata fields",
)
BUILD_GRAPH_RUNNER = _declare(
    f"{MACA_OP_BACKEND}.MacaOpsBackend.build_graph_runner",
    why="the CUDA graph runner's buffer filling runs a CUDA-only Triton kernel and drops dlinfer's "
        "kv_start_indices/host length tensors, so maca decode graphs cannot be captured",
    how="LMDeploy's CUDAGraphRunner subclassed: captured decode graphs get maca buffers "
        "(lmdeploy_patches.make_buffers_maca / fill_buffers_maca); fake capture on the emulated device",
    remove_when="LMDeploy ships maca cudagraph buffer handling (dlinfer's maca_cudagraph equivalent) "
                "for the 0.18 graph runner",
)
CCL_BACKEND = _declare(
    f"{MACA_OP_BACKEND}.MacaOpsBackend.ccl_backend",
    why="tensor parallelism on the emulated maca device: LMDeploy's default 'nccl' cannot run on host "
        "tensors; gloo can (a real MACA device keeps upstream's choice)",
    how="staticmethod answering 'gloo' on the emulated device, upstream's answer otherwise",
    remove_when="never for the emulated device (it is maca-infer's); on devices nothing changes",
)
SUPPORT_RAY = _declare(
    f"{MACA_OP_BACKEND}.MacaOpsBackend.support_ray",
    why="MacaOpsBackend.support_ray() is True, so --tp 2 picks the ray executor; on the emulated device "
        "the ranks are local processes and ray is neither needed nor installed (mp executor instead)",
    how="staticmethod answering False on the emulated device, upstream's answer otherwise",
    remove_when="never for the emulated device; on devices nothing changes",
)
BUILD_OP = _declare(
    f"{MACA_OP_BACKEND}.MacaOpsBackend.build_op",
    why="two ops the dlinfer backends inherit from LMDeploy's torch defaults: (1) a request's random_seed "
        "(OpenAI seed) reaches the sampler as per-sequence seeds and offsets, which only the cuda backend's "
        "Triton multinomial kernel reads; DefaultMultinomialSamplingImpl (torch.multinomial on the global "
        "RNG) made two identical seeded requests differ on maca; (2) DeepSeek-V3's noaux_tc router "
        "(DefaultRouterNoauxTCImpl) is a chain of torch ops where maca-infer has one kernel; (3) a W8A8 "
        "(smooth-quant) module maca cannot run (FP8 quant_dtype, NN weight layout, expert parallelism) "
        "would fail only at the first forward, deep in a kernel",
    how="MacaOpsBackend.build_op first refuses such W8A8 specs with one ValueError while the model is "
        "built (lmdeploy_patches.check_w8a8_spec), then answers MultinomialSamplingBuildSpec with "
        "lmdeploy_patches.MacaSeededMultinomialSampling (maca_infer.common.ops.seeded_multinomial: "
        "tl.rand(seed, offset) in torch, the same draw as the cuda kernel) and RouterNoauxTCBuildSpec "
        "(grouped, router_n_groups off) with lmdeploy_patches.MacaRouterNoauxTC "
        "(maca_infer.common.ops.moe_grouped_topk); every other op as upstream",
    remove_when="LMDeploy's dlinfer backend builds a seed-aware multinomial sampling op and a fused "
                "noaux_tc router served by dlinfer, and checks W8A8 specs against the vendor's ops",
)
LOAD_MODEL_WEIGHTS = _declare(
    f"{WEIGHT_LOADER}.ModelWeightLoader.load_model_weights",
    why="LMDeploy copies each checkpoint tensor into its parameter with copy_: a smooth-quant (W8A8) "
        "checkpoint with a float weight where int8 is expected, a mis-shaped scale, or int8 experts in a "
        "model that builds float experts (Qwen2-MoE, DeepSeek v1) loads silently wrong or fails deep in a kernel",
    how="with the maca backend, a smooth_quant checkpoint's safetensors headers are checked first "
        "(w8a8_checkpoint.check_smooth_quant_layout): one ValueError naming the tensor and the expected "
        "layout; then upstream loads as before",
    remove_when="LMDeploy's W8A8 loaders check dtype and shape, and its MoE models without a W8A8 path "
                "refuse smooth_quant checkpoints",
)
MP_PROC = _declare(
    f"{ZMQ_ENGINE}.ZMQMPEngine._mp_proc",
    why="race at api_server start: the parent shuts its mp.Manager down right after reading the engine's "
        "RPC port while the engine child is still releasing the manager Condition -> EOFError kills the "
        "engine (seen under CPU load on every device type)",
    how="upstream _mp_proc run with a Condition whose final release tolerates a manager already gone "
        "(same qualified name, so the spawned child resolves the wrapper)",
    remove_when="LMDeploy keeps the Manager alive until the engine child has left `with condition:` "
                "(or stops using a Manager Condition for the port hand-off)",
)
INIT_PROCESS_GROUP = _declare(
    f"{BASE_WORKER}.WorkerWrapperBase.init_process_group",
    why="tp>1 workers create the default process group with get_backend() of the default device "
        "context ('cuda' -> 'nccl'), ignoring MacaOpsBackend.ccl_backend(); the emulated device needs gloo",
    how="maca workers run upstream init_process_group inside a maca DeviceContext, so get_backend() "
        "answers with MacaOpsBackend.ccl_backend()",
    remove_when="LMDeploy's dist_utils.init_process_group uses the worker's device_type backend",
)


@dataclass(frozen=True)
class PatchRecord:
    """An applied LMDeploy patch as this adapter's callers read it."""

    target: str            # dotted path of the patched object
    attr: str              # attribute replaced on it
    why: str
    upstream_versions: str
    remove_when: str

    @property
    def key(self) -> str:
        return f"{self.target}.{self.attr}"


def patch(target: Any, attr: str, new: Any, *, why: str, upstream_versions: str, remove_when: str,
          how: str | None = None) -> RuntimePatch:
    """Replace ``target.attr`` with ``new`` under a record declared on the spot.

    Raises RuntimeError when it is already patched, ValueError for an empty
    explanation. The adapter's own patches use :func:`apply` with the records
    declared above.
    """
    key = f"{object_path(target)}.{attr}"
    record = LEDGER.declare(key, owner=OWNER, why=why, how=how or f"{attr} replaced by maca-infer",
                            versions=upstream_versions, remove_when=remove_when)
    LEDGER.set_attr(record, target, attr, new)
    logger.debug("patched %s (%s)", record.target, record.why)
    return record


def apply(record: RuntimePatch, target: Any, attr: str, new: Any) -> None:
    """Apply a declared patch: ``target.attr = new`` (see common/patching.py)."""
    if not record.target.endswith(f".{attr}"):
        raise ValueError(f"{record.target} does not patch attribute {attr!r}")
    LEDGER.set_attr(record, target, attr, new)
    logger.debug("patched %s (%s)", record.target, record.why)


def is_patched(target: Any, attr: str) -> bool:
    return LEDGER.attr_target(target, attr) is not None


def ledger() -> list[PatchRecord]:
    """The LMDeploy patches in effect, in the order they were applied."""
    rows = []
    for record in LEDGER.applied(OWNER):
        owner_path, _, attr = record.target.rpartition(".")
        rows.append(PatchRecord(owner_path, attr, record.why, record.versions, record.remove_when))
    return rows


def revert(target: Any, attr: str) -> None:
    """Restore one patched attribute."""
    key = LEDGER.attr_target(target, attr)
    if key is None:
        raise KeyError(f"{object_path(target)}.{attr} is not patched by maca-infer")
    LEDGER.undo(key)


def revert_all() -> int:
    """Restore every LMDeploy patch (tests); returns how many."""
    return LEDGER.undo_all(OWNER)
