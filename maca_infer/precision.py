"""``maca-infer precision``: layer-by-layer accuracy of a Transformers LLM on the maca device.

MetaX's MacaPrecision does this for ONNX models; this is the same idea for the
PyTorch models maca-infer serves. Two copies of one checkpoint run the same
input ids:

- baseline: the stock Hugging Face model in float64 on the CPU (float32 with
  ``--baseline-float32``);
- candidate: the same weights on the maca device at ``--dtype``, with our
  kernels swapped in by ``adapters.hf.enable()`` and the op tier forced by
  ``--impl`` (MACA_INFER_OPS_IMPL).

Forward hooks capture the output of every decoder layer and of each module
our kernels replace (norms, attention, MLP / MoE blocks, routers, experts),
the embedding, the rotary-applied q and k of every attention layer (taken
where Transformers hands them to the attention function, through a probe
registered in its AttentionInterface), and the logits. Each captured pair is
compared in float64: SNR (dB), cosine, MSE, max abs.

Full mode compares the logits first and walks the layers only when they fail
or ``--all-layers`` asks (like MacaPrecision); ``--layers a,b`` compares the
named modules only; ``--batch N`` holds at most N captured pairs at once (one
forward of each model per batch). The first module whose SNR drops by
``jump_db`` or more below every point before it (in execution order) is named
the first divergent one: that is where an error enters, wherever it ends up.
The exit status is 1 when the logits fail. ``--generate N`` runs N greedy
steps on both sides and reports the first step whose tokens differ with the
baseline's top-2 margin there, to tell a near-tie from a bug.

Usage:
    maca-infer precision MODEL_DIR|KIND [--impl auto|reference|triton|vendor]
        [--dtype bfloat16|float16|float32]
        [--metric snr|cosine|mse|all] [--layers a,b | --batch N] [--prompt TEXT | --tokens N]
        [--all-layers] [--generate N] [--json FILE]  (FILE.png beside it: SNR by layer)
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

IMPLS = ("auto", "reference", "triton", "vendor")
DTYPES = ("bfloat16", "float16", "float32")
METRICS = ("snr", "cosine", "mse", "all")
LOGITS = "logits"
Q_ROTARY, K_ROTARY = "q_rotary", "k_rotary"  # pseudo-modules under each attention module
# modules captured in full mode: what our kernels replace, plus the decoder layers
_CAPTURED_CLASS = re.compile(r"(RMSNorm|LayerNorm|Attention|MLP|Experts|Moe|MoE|MoeBlock|Router|DecoderLayer)$")


class PrecisionError(Exception):
    """Bad input: the command prints this one line and exits 2."""


@dataclass(frozen=True)
class Thresholds:
    """Pass limits of one candidate dtype (the logits and every layer)."""

    snr_db: float      # SNR at or above this passes
    mse: float         # MSE at or below this passes (absolute: depends on the model's scale)
    jump_db: float     # an SNR this far below every earlier point's names the first divergent module
    ceiling_db: float  # SNRs are capped here before drops are taken (an exact copy reads as +inf)

    @property
    def cosine(self) -> float:
        # the cosine of a pair at exactly the SNR limit (1 - cos = noise/signal / 2 for small noise)
        return 1.0 - 0.5 * 10.0 ** (-self.snr_db / 10.0)


# Clean runs of the tiny zoo kinds and SmolLM2 stay well inside these on every
# layer (tests/tools/test_precision.py); ceiling: about the SNR of rounding to the dtype.
THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(snr_db=80.0, mse=1e-8, jump_db=20.0, ceiling_db=130.0),
    "float16": Thresholds(snr_db=35.0, mse=1e-3, jump_db=15.0, ceiling_db=68.0),
    "bfloat16": Thresholds(snr_db=20.0, mse=1e-2, jump_db=15.0, ceiling_db=48.0),
}


@dataclass
class Point:
    """One compared module output."""

    name: str
    shape: list[int]
    snr_db: float
    cosine: float
    mse: float
    max_abs: float
    passed: bool
    drop_db: float | None = None  # SNR below the worst SNR of the points before it (capped SNRs)
    routing_flips: int | None = None  # routers: tokens whose chosen experts differ from the baseline's
    note: str = ""


@dataclass
class Generation:
    steps: int
    first_diff_step: int | None     # 0-based; None: every token agreed
    baseline_token: int | None = None
    candidate_token: int | None = None
    baseline_margin: float | None = None   # baseline top-1 minus top-2 logit at that step
    tie_tolerance: float | None = None     # a margin this small may flip within the dtype's pass limit
    near_tie: bool | None = None


@dataclass
class Report:
    model: str
    dtype: str
    impl: str
    device: str
    baseline: str
    metric: str
    thresholds: dict
    tokens: int
    mode: str                       # full | named
    logits: Point | None = None
    points: list[Point] = field(default_factory=list)
    walked: bool = False
    first_divergent: str | None = None
    generation: Generation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.logits is None or self.logits.passed

    def as_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out


# ------------------------------------------------------------------ metrics


def compare(reference, candidate) -> tuple[float, float, float, float]:
    """(SNR dB, cosine, MSE, max abs) of ``candidate`` against ``reference``, in float64 on the CPU.

    SNR = 10 log10(sum ref^2 / sum (cand - ref)^2): +inf for an exact copy.
    """
    import torch

    ref = reference.detach().to("cpu", torch.float64).reshape(-1)
    cand = candidate.detach().to("cpu", torch.float64).reshape(-1)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: baseline {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    if ref.numel() == 0:
        return math.inf, 1.0, 0.0, 0.0
    noise = cand - ref
    signal_power, noise_power = float(ref.square().sum()), float(noise.square().sum())
    snr = math.inf if noise_power == 0 else (-math.inf if signal_power == 0 else 10 * math.log10(signal_power / noise_power))
    norms = float(ref.norm()) * float(cand.norm())
    cosine = (1.0 if noise_power == 0 else 0.0) if norms == 0 else float(ref.dot(cand)) / norms
    return snr, cosine, noise_power / ref.numel(), float(noise.abs().max())


def _verdict(snr: float, cosine: float, mse: float, metric: str, limits: Thresholds) -> bool:
    checks = {"snr": snr >= limits.snr_db, "cosine": cosine >= limits.cosine, "mse": mse <= limits.mse}
    return all(checks.values()) if metric == "all" else checks[metric]


def first_divergent(points: list[Point], limits: Thresholds) -> str | None:
    """Fill each point's ``drop_db`` and name where the error enters.

    The first point whose (capped) SNR falls ``jump_db`` or more below the
    worst SNR of the points before it (error amplified beyond what the
    earlier layers carried); when no single step jumps, the first point that
    fails. Against the worst earlier SNR rather than the previous point: the
    residual stream's SNR rises and falls layer by layer (massive
    activations in real models), the accumulated error only grows.
    A router that passes but picks other experts for some tokens met a
    near-tie of its scores: the jump (or failure) that this causes in its own
    MoE block is noted, not counted.
    """
    worst = None
    flipped_block = None
    for point in points:
        snr = min(point.snr_db, limits.ceiling_db)
        point.drop_db = None if worst is None else round(worst - snr, 2)
        worst = snr if worst is None else min(worst, snr)
        if point.routing_flips and point.passed:
            flipped_block = point.name.rsplit(".", 1)[0]
            point.note = f"{point.routing_flips} token(s) routed to other experts (near-tied scores)"
        elif flipped_block and point.name.startswith(flipped_block + ".") or point.name == flipped_block:
            if not point.passed or (point.drop_db or 0) >= limits.jump_db:
                point.note = "routing flip, not counted"
                point.passed = True
    for point in points:
        if point.drop_db is not None and point.drop_db >= limits.jump_db and not point.note:
            return point.name
    return next((p.name for p in points if not p.passed), None)


# ------------------------------------------------------------------ models


def resolve_model(model: str) -> tuple[Path, list[str]]:
    """A model directory (or a model-zoo kind, built or taken from the cache) -> (folder, notes).

    Quantized model-zoo checkpoints are swapped for their float reference
    (the dequantized weights): Transformers loads AWQ/GPTQ only through
    gptqmodel/optimum, and the HF adapter has no W4A16 path.
    """
    notes: list[str] = []
    path = Path(model)
    if not path.exists():
        from maca_infer.modelzoo import get

        try:
            path = Path(get(model))
        except ValueError as exc:
            raise PrecisionError(f"{model}: no such model directory, and not a model-zoo kind ({exc})") from None
        notes.append(f"model-zoo kind {model}: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PrecisionError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise PrecisionError(f"{config_file}: not valid JSON ({exc})") from None
    quant = config.get("quantization_config")
    if quant:
        from maca_infer.modelzoo import MANIFEST, QUANTIZED_KINDS, dequant_kind, get

        manifest = path / MANIFEST
        info = json.loads(manifest.read_text()) if manifest.is_file() else {}
        method = quant.get("quant_method", "?")
        if info.get("kind") not in QUANTIZED_KINDS:
            raise PrecisionError(
                f"{path}: a {method} quantized checkpoint; the HF adapter cannot run it (Transformers loads it "
                "only through gptqmodel/optimum, and maca-infer's W4A16 kernels serve LMDeploy/SGLang): "
                "compare its dequantized float copy instead"
            )
        reference = dequant_kind(info["kind"])
        path = Path(get(reference, seed=int(info.get("seed", 0))))
        if quant.get("quant_dtype") == "int8" or method == "compressed-tensors":  # W8A8: int8 activations too
            notes.append(f"{info['kind']} is {method} INT8 W8A8: the HF adapter cannot load it, so both sides run "
                         f"its float reference {reference} (the exactly dequantized weights; the per-token int8 "
                         "activation quantization is not part of this comparison)")
        else:
            notes.append(f"{info['kind']} is {method} int4: the HF adapter cannot load it, so both sides run "
                         f"its float reference {reference} (the exactly dequantized weights)")
    return path, notes


def _load(path: Path, dtype, device_map=None):
    from transformers import AutoModelForCausalLM

    from maca_infer.adapters.hf._compat import dtype_kwargs

    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **dtype_kwargs(dtype))
    except Exception as exc:  # noqa: BLE001 - any load failure is one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrecisionError(f"{path}: does not load as a Transformers causal LM: {type(exc).__name__}: {first}") from None
    return model.eval()


def _enable_kernels(model, notes: list[str]) -> None:
    """Our kernels into the candidate; model types without kernel swaps (MLA) get the maca attention only."""
    import maca_infer.adapters.hf as maca_hf
    from maca_infer.adapters.hf import transformers_kernels

    model_type = getattr(model.config, "model_type", "?")
    if model_type in transformers_kernels.ARCHITECTURES:
        maca_hf.enable(model)
        return
    maca_hf.activate()
    if transformers_kernels.can_use_maca_attention(model):
        transformers_kernels.enable_attention_only(model)
        notes.append(f"{model_type}: no norm/MLP/rotary kernels in the HF adapter for this model type; "
                     "the candidate runs the stock modules at the chosen dtype with attn_implementation=maca")
    else:
        notes.append(f"{model_type}: no kernels of the HF adapter apply; the candidate runs the stock model")


def _disable_kernels(model) -> None:
    from maca_infer.adapters.hf import transformers_kernels

    if transformers_kernels.is_enabled(model):
        import maca_infer.adapters.hf as maca_hf

        maca_hf.disable(model)


def _stock_experts_loop(model) -> None:
    """Routed experts of the baseline through Transformers' per-expert loop: its grouped_mm takes no float64."""
    from maca_infer.adapters.hf import transformers_experts

    if transformers_experts.interface_available() and transformers_experts.has_experts(model):
        model.set_experts_implementation("eager")


def _check_dtype_on_device(dtype_name: str, device) -> None:
    import torch

    if device.type == "cuda":
        if dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f"--dtype bfloat16: the maca device here ({torch.cuda.get_device_name(device)}) "
                                 "has no bfloat16 support; use --dtype float16")
    elif device.type != "cpu":
        raise PrecisionError(f"--dtype {dtype_name}: unsupported maca device type {device.type!r}")


# ------------------------------------------------------------------ capture


def capturable(model) -> list[str]:
    """Names of the points full mode captures (before ordering): modules, q/k rotary, logits."""
    names = []
    embed = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embed or (name and _CAPTURED_CLASS.search(type(module).__name__)):
            names.append(name)
            if type(module).__name__.endswith("Attention"):
                names += [f"{name}.{Q_ROTARY}", f"{name}.{K_ROTARY}"]
    return names + [LOGITS]


def known_names(model) -> list[str]:
    """Everything ``--layers`` accepts: every named module, the q/k rotary points, logits."""
    names = [name for name, _ in model.named_modules() if name]
    names += [f"{name}.{p}" for name, m in model.named_modules() if type(m).__name__.endswith("Attention")
              for p in (Q_ROTARY, K_ROTARY)]
    return names + [LOGITS]


_PROBE_SINKS: dict[int, Callable] = {}  # id(attention module) -> receives (query, key)


def _probe_name(inner: str) -> str:
    """Register (once) an attention implementation that hands q/k to _PROBE_SINKS, then runs ``inner``."""
    import sys as _sys

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = f"maca_precision_probe_{inner}"
    if name in AttentionInterface._global_mapping:
        return name

    def probe(module, query, key, value, attention_mask, *args, **kwargs):
        sink = _PROBE_SINKS.get(id(module))
        if sink is not None:
            sink(module, query, key)
        if inner == "eager":
            function = _sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = ALL_ATTENTION_FUNCTIONS[inner]
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(name, probe)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _first_tensor(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return getattr(output, "last_hidden_state", None)


def _routes(output):
    """The chosen expert ids of a router's (logits, scores, indices) output, else None."""
    import torch

    if isinstance(output, (tuple, list)) and len(output) > 1:
        last = output[-1]
        if isinstance(last, torch.Tensor) and not last.is_floating_point() and last.dim() == 2:
            return last
    return None


class Capture:
    """Forward hooks on ``wanted`` points of one model for one forward pass.

    ``store``: False records only the order in which points fire (and their
    shapes); True also keeps a float64 CPU copy of each output.
    A module that runs more than once per forward keeps its first output.
    """

    def __init__(self, model, wanted: set[str], *, store: bool) -> None:
        self.model, self.wanted, self.store = model, wanted, store
        self.order: list[str] = []
        self.shapes: dict[str, list[int]] = {}
        self.tensors: dict = {}
        self.routes: dict = {}  # router name -> [tokens, k] expert ids, sorted per token
        self._handles: list = []
        self._attention: list = []
        self._previous_impl: str | None = None

    def _keep(self, name: str, tensor, routes=None) -> None:
        import torch

        if tensor is None or name in self.shapes:
            return
        if routes is not None and self.store:
            self.routes[name] = routes.detach().to("cpu").sort(dim=-1).values
        self.order.append(name)
        self.shapes[name] = list(tensor.shape)
        if self.store:
            self.tensors[name] = tensor.detach().to("cpu", torch.float64)

    def __enter__(self) -> "Capture":
        for name, module in self.model.named_modules():
            if name in self.wanted or (not name and "" in self.wanted):
                self._handles.append(module.register_forward_hook(
                    lambda _m, _a, out, _n=name: self._keep(_n, _first_tensor(out), _routes(out))))
            rotary = [p for p in (Q_ROTARY, K_ROTARY) if f"{name}.{p}" in self.wanted]
            if rotary:
                _PROBE_SINKS[id(module)] = lambda _m, q, k, _n=name, _r=tuple(rotary): [
                    self._keep(f"{_n}.{p}", t) for p, t in zip((Q_ROTARY, K_ROTARY), (q, k)) if p in _r]
                self._attention.append(module)
        if self._attention:
            self._previous_impl = self.model.config._attn_implementation
            self.model.set_attn_implementation(_probe_name(self._previous_impl))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._attention:
            _PROBE_SINKS.pop(id(module), None)
        if self._previous_impl is not None:
            self.model.set_attn_implementation(self._previous_impl)

    def run(self, input_ids):
        import torch

        device = next(self.model.parameters()).device
        with self, torch.no_grad():
            logits = self.model(input_ids=input_ids.to(device), use_cache=False).logits
        self._keep(LOGITS, logits if LOGITS in self.wanted else None)
        return self


# ------------------------------------------------------------------ the run


def _input_ids(path: Path, config, prompt: str | None, tokens: int, seed: int):
    import torch

    if prompt is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            raise PrecisionError(f"{path}: --prompt needs the model's tokenizer, which does not load ({exc})") from None
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if ids.numel() == 0:
            raise PrecisionError("--prompt: the prompt encodes to no tokens")
        return ids
    if tokens < 1:
        raise PrecisionError(f"--tokens {tokens}: must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (1, tokens), generator=generator)


def _point(name: str, shape, ref, cand, metric: str, limits: Thresholds) -> Point:
    snr, cosine, mse, max_abs = compare(ref, cand)
    return Point(name, list(shape), snr, cosine, mse, max_abs, _verdict(snr, cosine, mse, metric, limits))


def _compare_batch(baseline, candidate, input_ids, names: list[str], metric, limits) -> list[Point]:
    wanted = set(names)
    ref = Capture(baseline, wanted, store=True).run(input_ids)
    cand = Capture(candidate, wanted, store=True).run(input_ids)
    points = []
    for name in names:
        if name not in ref.tensors or name not in cand.tensors:
            continue  # did not run for this input (e.g. an expert no token was routed to)
        points.append(_point(name, ref.shapes[name], ref.tensors[name], cand.tensors[name], metric, limits))
        if name in ref.routes and name in cand.routes and ref.routes[name].shape == cand.routes[name].shape:
            points[-1].routing_flips = int((ref.routes[name] != cand.routes[name]).any(dim=-1).sum())
    return points


def _generate(baseline, candidate, input_ids, steps: int, limits: Thresholds) -> Generation:
    import torch

    sequences, scores = [], []
    for model in (baseline, candidate):
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                do_sample=False, max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, temperature=None, top_p=None, top_k=None,
            )
        sequences.append(out.sequences[0, input_ids.shape[1]:].cpu())
        scores.append([step[0].detach().to("cpu", torch.float64) for step in out.logits])
    ref_tokens, cand_tokens = sequences
    report = Generation(steps=steps, first_diff_step=None)
    for step, (a, b) in enumerate(zip(ref_tokens.tolist(), cand_tokens.tolist())):
        if a != b:
            logits = scores[0][step]
            top2 = logits.topk(2).values
            report.first_diff_step, report.baseline_token, report.candidate_token = step, a, b
            report.baseline_margin = float(top2[0] - top2[1])
            # noise at the dtype's SNR limit has RMS rms(logits) * 10^(-snr/20); two logits each off
            # by twice that may swap: a margin below 4x is a near-tie a correct candidate may part at
            rms = float(logits.square().mean().sqrt())
            report.tie_tolerance = 4 * rms * 10 ** (-limits.snr_db / 20)
            report.near_tie = report.baseline_margin <= report.tie_tolerance
            break
    return report


def check(model: str, *, impl: str = "auto", dtype: str = "bfloat16", metric: str = "snr",
        layers: list[str] | None = None, batch: int | None = None, prompt: str | None = None,
        tokens: int = 16, all_layers: bool = False, generate: int = 0, baseline_float32: bool = False,
        seed: int = 0, candidate_hook: Callable | None = None) -> Report:
    """Compare the candidate (maca device, our kernels) with the baseline; see the module docstring.

    ``candidate_hook(model)``, when given, is called on the candidate after our
    kernels are in (tests use it to plant a fault). Raises PrecisionError on bad input.
    """
    import torch

    if impl == "vendor":
        from maca_infer.common.ops import vendor

        if not any(vendor.available().values()):
            raise PrecisionError("--impl vendor: none of MetaX's vendor libraries imports here (flash_attn, "
                                 "flash_mla, mcoplib._C); use --impl auto|triton|reference")
    if impl not in IMPLS or dtype not in DTYPES or metric not in METRICS:
        raise PrecisionError(f"impl={impl!r} dtype={dtype!r} metric={metric!r}: choose from {IMPLS}, {DTYPES}, {METRICS}")
    if batch is not None and batch < 1:
        raise PrecisionError(f"--batch {batch}: must be >= 1")
    if layers is not None and batch is not None:
        raise PrecisionError("--layers and --batch exclude each other")
    from maca_infer.common import envs

    path, notes = resolve_model(model)
    limits = THRESHOLDS[dtype]
    import maca_infer.adapters.hf as maca_hf

    maca_hf.activate()
    device = maca_hf.device()
    _check_dtype_on_device(dtype, device)
    with envs.temporarily(MACA_INFER_OPS_IMPL=impl):
        baseline = _load(path, torch.float32 if baseline_float32 else torch.float64)
        _stock_experts_loop(baseline)
        candidate = _load(path, getattr(torch, dtype), device_map=maca_hf.device_map())
        _enable_kernels(candidate, notes)
        try:
            if candidate_hook is not None:
                with torch.no_grad():
                    candidate_hook(candidate)
            report = Report(
                model=str(path), dtype=dtype, impl=impl, device=str(device),
                baseline=f"stock Transformers, {'float32' if baseline_float32 else 'float64'}, cpu",
                metric=metric, thresholds=asdict(limits) | {"cosine": limits.cosine}, tokens=0,
                mode="named" if layers else "full", notes=notes,
            )
            input_ids = _input_ids(path, baseline.config, prompt, tokens, seed)
            report.tokens = int(input_ids.shape[1])
            if layers:
                known = known_names(baseline)
                for name in layers:
                    if name not in known:
                        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
                        hint = f"; close matches: {', '.join(close)}" if close else "; none is close (see --list)"
                        raise PrecisionError(f"--layers: no module named {name!r} in {path.name}{hint}")
                wanted = list(dict.fromkeys(layers + [LOGITS]))
            else:
                wanted = capturable(baseline)
            # one pass that keeps nothing but the order, then the logits
            order = Capture(baseline, set(wanted), store=False).run(input_ids).order
            report.logits = _compare_batch(baseline, candidate, input_ids, [LOGITS], metric, limits)[0]
            inner = [name for name in order if name != LOGITS]
            if layers or all_layers or not report.logits.passed:
                report.walked = True
                step = batch or len(inner) or 1
                for start in range(0, len(inner), step):
                    report.points += _compare_batch(baseline, candidate, input_ids, inner[start:start + step],
                                                    metric, limits)
                report.first_divergent = first_divergent(report.points + [report.logits], limits)
            if generate:
                report.generation = _generate(baseline, candidate, input_ids, generate, limits)
        finally:
            # the enabled modeling modules are process-wide (rotary patch): leave none behind
            _disable_kernels(candidate)
    return report


# ------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return format("-", ">" + spec.split(".")[0])
    if math.isinf(value):
        return format("inf" if value > 0 else "-inf", ">" + spec.split(".")[0])
    return format(value, spec)


def format_table(report: Report) -> str:
    limits = THRESHOLDS[report.dtype]
    lines = [
        f"model:     {report.model}",
        f"candidate: {report.dtype} on {report.device}, ops tier {report.impl}, maca kernels on",
        f"baseline:  {report.baseline};  {report.tokens} input tokens",
        f"pass ({report.metric}): SNR >= {limits.snr_db:g} dB, cosine >= {limits.cosine:.6f}, MSE <= {limits.mse:g};"
        f" an SNR >= {limits.jump_db:g} dB below all earlier ones (drop) names the first divergent module",
    ]
    lines += [f"note: {note}" for note in report.notes]
    rows = report.points + ([report.logits] if report.logits else [])
    width = max([len("module")] + [len(p.name) for p in rows])
    header = (f"{'module':<{width}}  {'shape':<16} {'SNR dB':>8} {'drop':>7} {'cosine':>10} {'MSE':>10} "
              f"{'max abs':>10}  verdict")
    lines += ["", header, "-" * len(header)]
    for p in rows:
        verdict = ("pass" if p.passed else "FAIL") + (f" ({p.note})" if p.note else "")
        if p.name == report.first_divergent:
            verdict += "  <- first divergent"
        lines.append(
            f"{p.name:<{width}}  {str(p.shape).replace(' ', ''):<16} {_fmt(p.snr_db, '8.2f')} "
            f"{_fmt(p.drop_db, '7.2f')} {_fmt(p.cosine, '10.7f')} {_fmt(p.mse, '10.3e')} "
            f"{_fmt(p.max_abs, '10.3e')}  {verdict}"
        )
    lines.append("")
    if report.logits is not None and not report.walked:
        lines.append("logits agree: layers not walked (--all-layers walks them anyway)")
    if report.walked:
        lines.append(f"first divergent module: {report.first_divergent or 'none'}")
    g = report.generation
    if g is not None:
        if g.first_diff_step is None:
            lines.append(f"greedy: all {g.steps} tokens agree")
        else:
            kind = ("a near-tie: noise within the dtype's pass limit can swap them" if g.near_tie
                    else "too wide for the dtype's noise: look for a bug")
            lines.append(f"greedy: first differing step {g.first_diff_step} of {g.steps}: baseline token "
                         f"{g.baseline_token}, candidate {g.candidate_token}; baseline top-2 margin "
                         f"{g.baseline_margin:.4g} (near-tie below {g.tie_tolerance:.3g}): {kind}")
    lines.append(f"final output: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def plot_snr(report: Report, path: Path) -> str | None:
    """PNG of SNR by compared point, with the dtype's limit; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG plot: matplotlib is not installed (pip install matplotlib)"
    limits = THRESHOLDS[report.dtype]
    rows = report.points + ([report.logits] if report.logits else [])
    values = [min(p.snr_db, limits.ceiling_db) for p in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5))
    ax.plot(range(len(rows)), values, marker="o", markersize=3, label="SNR (dB, capped at the dtype's rounding)")
    ax.axhline(limits.snr_db, color="red", linestyle="--", label=f"pass limit {limits.snr_db:g} dB")
    for i, p in enumerate(rows):
        if p.name == report.first_divergent:
            ax.plot([i], [values[i]], "rx", markersize=12, label=f"first divergent: {p.name}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([p.name for p in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SNR dB")
    ax.set_title(f"{Path(report.model).name}: {report.dtype}, ops {report.impl} vs {report.baseline}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("model", metavar="MODEL_DIR", help="Hugging Face model folder (or a model-zoo kind, e.g. llama)")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="op tier of the candidate (vendor: MetaX's flash_attn/mcoplib)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="candidate dtype")
    p.add_argument("--metric", choices=METRICS, default="snr", help="what decides pass/fail (the table shows all)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", help="compare only these modules (comma-separated names; q/k: NAME.q_rotary)")
    which.add_argument("--batch", "-b", type=int, help="hold at most N captured pairs at once (one forward each per N)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--prompt", help="input text (the model's tokenizer)")
    inputs.add_argument("--tokens", type=int, default=16, help="random input ids of this length (default 16)")
    p.add_argument("--all-layers", action="store_true", help="walk the layers even when the logits agree")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also N greedy steps on both sides")
    p.add_argument("--baseline-float32", action="store_true", help="float32 baseline instead of float64")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input ids")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON, and FILE.png (SNR by layer)")
    p.add_argument("--list", action="store_true", help="print the names --layers accepts and exit")


def _jsonable(value):
    """inf / nan as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _list_names(model: str) -> int:
    import torch

    path, _ = resolve_model(model)
    print("\n".join(known_names(_load(path, torch.float32))))
    return 0


def run(args: argparse.Namespace) -> int:
    from maca_infer.cli import require

    require("transformers")
    try:
        if args.list:
            return _list_names(args.model)
        layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers is not None else None
        if layers is not None and not layers:
            raise PrecisionError("--layers: no module names given")
        report = check(args.model, impl=args.impl, dtype=args.dtype, metric=args.metric, layers=layers,
                     batch=args.batch, prompt=args.prompt, tokens=args.tokens, all_layers=args.all_layers,
                     generate=args.generate, baseline_float32=args.baseline_float32, seed=args.seed)
    except PrecisionError as exc:
        print(f"maca-infer precision: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        out = Path(args.json)
        out.write_text(json.dumps(_jsonable(report.as_dict()), indent=2) + "\n")
        png = out.with_suffix(".png")
        why_not = plot_snr(report, png) if report.points or report.logits else None
        print(f"wrote {out}" + (f" and {png}" if why_not is None else f"; {why_not}"))
    return 0 if report.passed else 1

