"""Mutation testing: plant known bugs one at a time and check the fast tests catch each.

    python tools/mutants.py                 # all mutants (make mutants)
    python tools/mutants.py --list          # names, files, test selections
    python tools/mutants.py --only a,b      # some of them
    python tools/mutants.py --no-baseline   # skip the unmutated run of the selections

Each mutant is (file, exact original snippet, replacement, the fast tests that
must fail). The repository is copied once to a scratch directory; a mutant is
written into the copy, the selection runs there (``pytest -x -m "not slow"``),
and the file is restored. ``import maca_infer`` must reach the copy, not the
editable install of the checkout: the copy's ``maca_infer/`` gets links to the
package-dir folders (common, adapters, ...) and ``PYTHONPATH`` points at the
copy, so Python's path finder answers before the editable finder (which
setuptools appends to ``sys.meta_path``). Before each run a fresh interpreter
checks that the mutated module resolves inside the copy and holds the
mutation (an error, not a survivor, when it does not).

A mutant is killed when its selection fails, survives when it passes. The
report is a table; the exit status is 1 when any mutant survives or errs.
Before the mutants, the union of all selections runs unmutated (the
baseline): a failing baseline would make every mutant look killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml's [tool.setuptools] package-dir (tests/tools/test_mutants.py keeps them in step)
PACKAGE_DIRS = {"common": "common", "adapters": "adapters", "bench": "bench", "patches": "patches"}
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", "*.egg-info", "build")
RUN_TIMEOUT_S = 900  # a mutant that hangs its selection this long counts as killed

# test selections (pytest arguments, always run with -x -m "not slow")
ATTENTION = ("tests/ops/test_attention.py",)
HELPERS = ("tests/ops/test_triton_helpers.py",)
MOE = ("tests/ops/test_moe.py",)
NORM = ("tests/ops/test_norm.py",)
MLA = ("tests/ops/test_mla.py",)
ROTARY = ("tests/ops/test_rotary.py",)
KV_CACHE = ("tests/ops/test_kv_cache.py",)
ACTIVATION = ("tests/ops/test_activation.py",)
QUANT = ("tests/ops/test_quant.py",)
SGLANG = ("tests/sglang/test_backend_parity.py", "tests/sglang/test_platform.py")
SGLANG_ROUTING = ("tests/sglang/test_noaux_tc_routing.py",)
SGLANG_MOE_SCALING = ("tests/sglang/test_routed_scaling.py",)
LMDEPLOY = ("tests/lmdeploy/test_dlinfer_interface.py", "tests/lmdeploy/test_activation.py")
LMDEPLOY_ROUTING = ("tests/lmdeploy/test_noaux_tc_router.py",)
HF = ("tests/hf/test_transformers.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # repository-relative file
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]
    why: str


M = Mutant
MUTANTS: tuple[Mutant, ...] = (
    # ---- common/ops, Triton: shared helpers ----
    M("helper-online-softmax-sum-not-rescaled", "common/ops/_triton_helpers.py",
      "    l_new = l_i * alpha + tl.sum(p, axis=1)",
      "    l_new = l_i + tl.sum(p, axis=1)",
      ATTENTION + HELPERS, "running sum keeps the old max's scale"),
    M("helper-online-softmax-no-max", "common/ops/_triton_helpers.py",
      "    m_new = tl.maximum(m_i, tl.max(s, axis=1))\n    m_shift = tl.where(m_new == float(\"-inf\"), 0.0, m_new)",
      "    m_new = tl.zeros_like(m_i)\n    m_shift = m_new",
      ATTENTION + HELPERS, "Triton attention softmax without max subtraction: exact until exp2 overflows"),
    M("helper-window-off-by-one", "common/ops/_triton_helpers.py",
      "        visible = visible & (rel > -sliding_window)",
      "        visible = visible & (rel >= -sliding_window)",
      ATTENTION + HELPERS, "sliding window shows W + 1 keys"),
    M("helper-attention-scale-3pct", "common/ops/_triton_helpers.py",
      "        s = qk * (scale * LOG2E)",
      "        s = qk * (scale * 1.03 * LOG2E)",
      ATTENTION + HELPERS, "Triton attention scale off by 3%"),
    M("helper-merge-equal-weights", "common/ops/_triton_helpers.py",
      "    weight = tl.exp(lse_parts - m_shift)",
      "    weight = tl.where(lse_parts == float(\"-inf\"), 0.0, 1.0)",
      ATTENTION + HELPERS, "split-KV merge ignores each split's log-sum-exp"),
    M("helper-int4-default-zero-7", "common/ops/_triton_helpers.py",
      "        zero = tl.zeros_like(scale) + 8.0",
      "        zero = tl.zeros_like(scale) + 7.0",
      QUANT, "symmetric int4 without zero points centred at 7"),
    # ---- common/ops, Triton: attention kernels ----
    M("decode-bf16-no-rescale", "common/ops/attention.py",
      "            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)\n\n    # A row (or split)",
      "            acc = acc + tl.dot(p.to(v.dtype), v)\n\n    # A row (or split)",
      ATTENTION, "online-softmax rescale dropped in the bf16/fp16 (device) decode branch"),
    M("decode-fp32-no-rescale", "common/ops/attention.py",
      "            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=\"ieee\")\n        else:\n"
      "            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)\n\n    # A row (or split)",
      "            acc = acc + tl.dot(p, v, input_precision=\"ieee\")\n        else:\n"
      "            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)\n\n    # A row (or split)",
      ATTENTION, "online-softmax rescale dropped in the fp32 decode branch"),
    M("prefill-bf16-no-rescale", "common/ops/attention.py",
      "            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)\n\n    out, _ = online_softmax_finish",
      "            acc = acc + tl.dot(p.to(v.dtype), v)\n\n    out, _ = online_softmax_finish",
      ATTENTION, "online-softmax rescale dropped in the bf16/fp16 (device) prefill branch"),
    M("helper-causal-sees-next-key", "common/ops/_triton_helpers.py",
      "        visible = visible & (rel <= 0)",
      "        visible = visible & (rel <= 1)",
      ATTENTION + HELPERS, "causal mask shows each query the next key"),
    # ---- common/ops, reference: attention ----
    M("reference-attention-softmax-no-max", "common/ops/attention.py",
      "        scores.masked_fill_(~visible[:, None, None], float(\"-inf\"))\n        row_max = scores.amax(dim=-1, keepdim=True)\n",
      "        scores.masked_fill_(~visible[:, None, None], float(\"-inf\"))\n        row_max = torch.zeros_like(scores[..., :1])\n",
      ATTENTION, "attention reference softmax without max subtraction: exact until exp overflows"),
    M("reference-attention-chunks-skipped", "common/ops/attention.py",
      "    for start in range(0, lq, chunk):",
      "    for start in range(0, lq, 2 * chunk):",
      ATTENTION, "chunked score path skips every other chunk of queries"),
    M("reference-attention-scale-5pct", "common/ops/attention.py",
      "        scores = scores.view(n, hk, group, c, hi - lo).mul_(scale)",
      "        scores = scores.view(n, hk, group, c, hi - lo).mul_(scale * 1.05)",
      ATTENTION, "attention reference scale off by 5%"),
    M("attention-default-scale-2pct", "common/ops/attention.py",
      "        scale = 1.0 / math.sqrt(head_dim)",
      "        scale = 1.02 / math.sqrt(head_dim)",
      ATTENTION, "default 1/sqrt(D) off by 2%"),
    # ---- common/ops: MoE ----
    M("topk-softmax-kernel-no-max", "common/ops/moe.py",
      "    p = tl.exp(logits - row_max[:, None])",
      "    p = tl.exp(logits)",
      MOE, "top-k softmax kernel without max subtraction: exact until exp overflows"),
    M("grouped-topk-kernel-softmax-no-max", "common/ops/moe.py",
      "        p = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])",
      "        p = tl.exp(shifted)",
      MOE + LMDEPLOY_ROUTING, "grouped top-k kernel softmax without max subtraction"),
    M("grouped-topk-kernel-weight-biased", "common/ops/moe.py",
      "        weight = tl.sum(tl.where(picked, scores, 0.0), axis=1)  # the unbiased score",
      "        weight = tl.sum(tl.where(picked, choice, 0.0), axis=1)",
      MOE, "noaux_tc weights include e_score_correction_bias"),
    M("grouped-topk-kernel-group-best-only", "common/ops/moe.py",
      "            best = best + second",
      "            best = best + 0.0 * second",
      MOE, "noaux_tc group score = best expert instead of the two best"),
    M("grouped-topk-kernel-no-scaling-factor", "common/ops/moe.py",
      "    top_w = top_w * routed_scaling_factor",
      "    top_w = top_w * 1.0",
      MOE, "routed_scaling_factor dropped"),
    M("grouped-topk-reference-group-best-only", "common/ops/moe.py",
      "choice.view(num_tokens, num_expert_group, -1).topk(2, dim=-1).values.sum(dim=-1)",
      "choice.view(num_tokens, num_expert_group, -1).topk(1, dim=-1).values.sum(dim=-1)",
      MOE, "reference noaux_tc group score = best expert only"),
    M("fused-moe-bf16-up-reads-gate", "common/ops/moe.py",
      "            acc_up += tl.dot(a, w_up.to(a.dtype))",
      "            acc_up += tl.dot(a, w_gate.to(a.dtype))",
      MOE, "up GEMM reads the gate weights in the bf16/fp16 (device) fused-MoE branch"),
    M("fused-moe-fp32-up-reads-gate", "common/ops/moe.py",
      "            acc_up += tl.dot(a32, w_up.to(tl.float32), input_precision=\"ieee\")",
      "            acc_up += tl.dot(a32, w_gate.to(tl.float32), input_precision=\"ieee\")",
      MOE, "up GEMM reads the gate weights in the fp32 fused-MoE branch"),
    M("fused-moe-router-weight-dropped", "common/ops/moe.py",
      "    acc = acc * routed[:, None]",
      "    acc = acc * 1.0",
      MOE, "down GEMM ignores the router weight"),
    M("moe-reference-up-is-gate", "common/ops/moe.py",
      "_activation_fp32(activation, gate_up[:, :inter_size]) * gate_up[:, inter_size:]",
      "_activation_fp32(activation, gate_up[:, :inter_size]) * gate_up[:, :inter_size]",
      MOE, "MoE reference multiplies by the gate instead of up"),
    # ---- common/ops: norm ----
    # (the kernel's row loop lives in _triton_helpers: residual_add_tile, rms_scale_tile, rms_normed_tile)
    M("rmsnorm-drops-gemma", "common/ops/_triton_helpers.py",
      "    if GEMMA:\n        w = w + 1.0\n    return x * inv_rms[:, None] * w[None, :]",
      "    return x * inv_rms[:, None] * w[None, :]",
      NORM, "RMSNorm (single-block and chunked) drops Gemma's 1 + w"),
    M("rmsnorm-chunked-normalizes-x", "common/ops/_triton_helpers.py",
      "    if HAS_RESIDUAL:\n        x = tl.load(res_rows + offs[None, :]",
      "    if HAS_RESIDUAL:\n        x = tl.load(x_rows + offs[None, :]",
      NORM, "chunked (hidden > 8192) add+RMSNorm normalizes x instead of x + residual"),
    M("rmsnorm-residual-not-written", "common/ops/_triton_helpers.py",
      "        tl.store(res_rows + offs[None, :], s, mask=mask)\n",
      "",
      NORM, "add+RMSNorm kernel normalizes x + residual but leaves the residual stream un-updated"),
    M("rmsnorm-reference-residual-not-added", "common/ops/norm.py",
      "        residual.copy_(x.float() + residual.float())",
      "        residual.copy_(residual.float())",
      NORM, "reference add+RMSNorm skips the residual add"),
    # ---- common/ops: MLA, rotary, cache, activation ----
    M("mla-decode-no-rescale", "common/ops/mla.py",
      "        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)",
      "        acc = acc + tl.dot(p.to(c.dtype), c)",
      MLA, "MLA decode kernel drops the online-softmax rescale"),
    M("mla-decode-reference-drops-rope", "common/ops/mla.py",
      "        scores = scale * (q_nope[b].float() @ c.t() + q_rope[b].float() @ k_pe.t())  # [H, kv_len]",
      "        scores = scale * (q_nope[b].float() @ c.t())  # [H, kv_len]",
      MLA, "MLA decode reference ignores the rope part of the score"),
    M("rotary-kernel-sign", "common/ops/rotary.py",
      "        tl.store(dst + second[None, :], (x2 * cos + x1 * sin).to(q_dst.dtype.element_ty), mask=mask)",
      "        tl.store(dst + second[None, :], (x2 * cos - x1 * sin).to(q_dst.dtype.element_ty), mask=mask)",
      ROTARY, "rotary kernel rotates q's second half the wrong way"),
    M("kv-cache-padding-written", "common/ops/kv_cache.py",
      "    valid = slot >= 0  # padding tokens write nothing",
      "    valid = slot >= -1",
      KV_CACHE, "slot -1 (padding) writes into the cache"),
    M("silu-kernel-is-sigmoid", "common/ops/activation.py",
      "        act = gate / (1.0 + tl.exp(-gate))",
      "        act = 1.0 / (1.0 + tl.exp(-gate))",
      ACTIVATION, "SiLU kernel computes sigmoid"),
    # ---- adapters/sglang ----
    M("sglang-decode-ignores-window", "adapters/sglang/attention_backend.py",
      "            scale=layer.scaling, sliding_window=_window_for_ops(layer), logit_softcap=_softcap_for_ops(layer),",
      "            scale=layer.scaling, sliding_window=None, logit_softcap=_softcap_for_ops(layer),",
      SGLANG, "SGLang decode ignores the sliding window"),
    M("sglang-window-convention", "adapters/sglang/attention_backend.py",
      "    return size + 1\n",
      "    return size\n",
      SGLANG, "SGLang's window W (W + 1 keys) passed as the ops' W"),
    M("sglang-extend-scale-10pct", "adapters/sglang/attention_backend.py",
      "            scale=layer.scaling, causal=True,\n            sliding_window=_window_for_ops(layer)",
      "            scale=layer.scaling * 1.1, causal=True,\n            sliding_window=_window_for_ops(layer)",
      SGLANG, "SGLang prefill attention scale off by 10%"),
    M("sglang-rmsnorm-skips-residual", "adapters/sglang/fused_ops.py",
      "    return ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon)",
      "    return ops.rms_norm(x, self.weight, self.variance_epsilon), residual",
      SGLANG, "SGLang fused RMSNorm forward drops the residual add"),
    M("sglang-rotary-always-neox", "adapters/sglang/fused_ops.py",
      "            \"neox\" if self.is_neox_style else \"gptj\")",
      "            \"neox\")",
      SGLANG, "SGLang rotary forward ignores is_neox_style"),
    M("sglang-noaux-tc-scaling-always", "adapters/sglang/fused_ops.py",
      "    scaling = cfg.routed_scaling_factor if cfg.apply_routed_scaling_factor_on_output else 1.0",
      "    scaling = cfg.routed_scaling_factor",
      SGLANG_ROUTING, "routed_scaling_factor applied in top-k although SGLang applies it on the MoE output"),
    M("sglang-experts-scale-off-cuda-too", "adapters/sglang/fused_ops.py",
      "    if sglang_runner._is_cuda or sglang_runner._is_musa:\n        out.mul_(scale)",
      "    if True:\n        out.mul_(scale)",
      SGLANG_MOE_SCALING, "maca MoE experts apply routed_scaling_factor off CUDA too (DeepSeek then squares it)"),
    M("sglang-experts-scale-over-fused-topk", "adapters/sglang/fused_ops.py",
      "    if scale is None or scale == 1.0 or getattr(layer, \"should_fuse_routed_scaling_factor_in_topk\", False):",
      "    if scale is None or scale == 1.0:",
      SGLANG_MOE_SCALING, "maca MoE experts scale again weights the router already scaled"),
    M("sglang-noaux-tc-padding-routed", "adapters/sglang/fused_ops.py",
      "        ids.masked_fill_((rows >= num_token_non_padded_r)[:, None], -1)",
      "        ids.masked_fill_((rows > num_token_non_padded_r)[:, None], -1)",
      SGLANG_ROUTING, "the first CUDA-graph padding row is routed to experts"),
    # ---- adapters/lmdeploy ----
    M("lmdeploy-noaux-tc-no-bias", "adapters/lmdeploy/lmdeploy_patches.py",
      "            renormalize=self.renormalize, scoring=self.scoring_func, correction_bias=bias,",
      "            renormalize=self.renormalize, scoring=self.scoring_func, correction_bias=None,",
      LMDEPLOY_ROUTING, "noaux_tc router ignores e_score_correction_bias"),
    M("lmdeploy-rotary-gptj", "adapters/lmdeploy/dlinfer_ops.py",
      "    q_out, k_out = mops.apply_rotary(q, k, cos_half, sin_half, style=\"neox\")",
      "    q_out, k_out = mops.apply_rotary(q, k, cos_half, sin_half, style=\"gptj\")",
      LMDEPLOY, "dlinfer rotary uses the interleaved layout"),
    M("lmdeploy-decode-drops-alibi", "adapters/lmdeploy/dlinfer_ops.py",
      "scale=softmax_scale, alibi_slopes=alibi_slopes,\n                                         plan=plan)",
      "scale=softmax_scale, alibi_slopes=None,\n                                         plan=plan)",
      LMDEPLOY, "dlinfer paged decode drops ALiBi slopes"),
    M("lmdeploy-fused-moe-no-renormalize", "adapters/lmdeploy/dlinfer_ops.py",
      "    if renormalize:\n        weights = weights / weights.sum(dim=-1, keepdim=True)\n"
      "    return mops.fused_moe(",
      "    return mops.fused_moe(",
      LMDEPLOY, "dlinfer fused_moe ignores renormalize"),
    M("lmdeploy-gating-renormalizes", "adapters/lmdeploy/dlinfer_ops.py",
      "    return mops.moe_topk_softmax(router_logits, int(topk), renormalize)",
      "    return mops.moe_topk_softmax(router_logits, int(topk), True)",
      LMDEPLOY, "dlinfer gating renormalizes although LMDeploy does it in fused_moe"),
    # ---- adapters/hf ----
    M("hf-rmsnorm-drops-gemma", "adapters/hf/transformers_kernels.py",
      "    return rms_norm(hidden_states, self.weight, eps, gemma=self._maca_gemma_norm)",
      "    return rms_norm(hidden_states, self.weight, eps, gemma=False)",
      HF, "HF RMSNorm swap ignores Gemma's 1 + w"),
    M("hf-attention-ignores-window", "adapters/hf/transformers_attention.py",
      "                sliding_window=sliding_window, logit_softcap=softcap,",
      "                sliding_window=None, logit_softcap=softcap,",
      HF, "HF attention ignores the sliding window"),
)


# --------------------------------------------------------------------------
# scratch copy
# --------------------------------------------------------------------------
def make_scratch(root: Path) -> Path:
    """Copy the repository to ``root/repo`` and make its maca_infer/ hold the package-dir folders."""
    repo = root / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=COPY_IGNORE, symlinks=True)
    for name, folder in PACKAGE_DIRS.items():
        (repo / "maca_infer" / name).symlink_to(Path("..") / folder, target_is_directory=True)
    return repo


def scratch_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACA_INFER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated file of the same size and mtime must not reuse a .pyc
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["TRITON_INTERPRET"] = "1"
    return env


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(("maca_infer",) + parts if parts[0] in PACKAGE_DIRS else parts)


def check_resolves(repo: Path, env: dict[str, str], mutant: Mutant) -> str | None:
    """None when the mutated module resolves inside the copy and holds the mutation, else why not."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.find_spec({module_name(mutant.path)!r})\n"
        "import maca_infer.common.ops as ops\n"
        "print(spec.origin); print(ops.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        return f"import check failed: {proc.stderr.strip()[-300:]}"
    for origin in proc.stdout.split():
        if not Path(origin).is_relative_to(repo):
            return f"imports {origin}, outside the scratch copy {repo}"
    origin = Path(proc.stdout.split()[0])
    if origin.resolve() != (repo / mutant.path).resolve():
        return f"{mutant.path} resolves to {origin}"
    if origin.read_text() == (REPO_ROOT / mutant.path).read_text():
        return f"{origin} does not hold the mutation"
    return None


def run_pytest(repo: Path, env: dict[str, str], tests: tuple[str, ...]) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, f"timeout after {RUN_TIMEOUT_S}s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" - ")[0] for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    return proc.returncode, time.monotonic() - start, "; ".join(failed[:3] + [summary])


def apply(repo: Path, mutant: Mutant) -> str:
    """Write the mutant into the copy; returns the original text for restoring."""
    target = repo / mutant.path
    text = target.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise ValueError(f"{mutant.name}: the original snippet occurs {count} times in {mutant.path} (want 1)")
    target.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def check_snippets(mutants) -> list[str]:
    problems = []
    for m in mutants:
        count = (REPO_ROOT / m.path).read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: snippet occurs {count} times in {m.path}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    mutants = list(MUTANTS)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.name for m in mutants}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.name in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.name:42s} {m.path:40s} {' '.join(m.tests)}\n    {m.why}")
        return 0
    problems = check_snippets(mutants)
    if problems:
        print("stale mutants (the code moved on; update tools/mutants.py):\n  " + "\n  ".join(problems))
        return 2

    root = Path(tempfile.mkdtemp(prefix="maca-mutants-"))
    try:
        repo = make_scratch(root)
        env = scratch_env(repo)
        if not args.no_baseline:
            selection = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            rc, secs, tail = run_pytest(repo, env, selection)
            print(f"baseline ({len(selection)} test files, unmutated): rc={rc} in {secs:.0f}s: {tail}", flush=True)
            if rc != 0:
                print("the baseline fails: fix the tests before judging mutants")
                return 2
        rows = []
        for m in mutants:
            original = apply(repo, m)
            try:
                problem = check_resolves(repo, env, m)
                if problem:
                    rows.append((m, "ERROR", 0.0, problem))
                else:
                    rc, secs, tail = run_pytest(repo, env, m.tests)
                    # 1: a test failed; < 0: the run crashed (a signal) or timed out; 2-5: pytest could not run
                    status = "survived" if rc == 0 else "killed" if rc == 1 or rc < 0 else "ERROR"
                    rows.append((m, status, secs, tail if status != "ERROR" else f"rc={rc}: {tail}"))
            finally:
                (repo / m.path).write_text(original)
            print(f"{rows[-1][1]:9s} {m.name} ({rows[-1][2]:.0f}s): {rows[-1][3]}", flush=True)
    finally:
        if args.keep:
            print(f"scratch kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"| {'mutant':42s} | {'file':38s} | result   | seconds |")
    print(f"|{'-' * 44}|{'-' * 40}|----------|---------|")
    for m, status, secs, _ in rows:
        print(f"| {m.name:42s} | {m.path:38s} | {status:8s} | {secs:7.0f} |")
    killed = sum(1 for r in rows if r[1] == "killed")
    bad = [r for r in rows if r[1] != "killed"]
    print(f"\n{killed}/{len(rows)} killed")
    for m, status, _, tail in bad:
        print(f"  {status}: {m.name} ({m.why}) -- {tail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
