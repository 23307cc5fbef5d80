"""``maca-infer doctor``: what this host offers the maca device, and what is missing.

Reports, as a table or ``--json``:
- device: the resolved kind (maca / cuda-standin / emulated) and why;
- versions: torch, triton and the frameworks, each against its supported range;
- toolkit: MACA_PATH, the toolkit dirs found, mx-smi and what it lists;
  on a MetaX host, whether torch/triton are MetaX's builds (a warning, on
  stderr too, when a PyPI build slipped in);
- env: MetaX's knobs and the visible-device mapping, with the value in
  effect and who set it (user / maca-infer / would be set by activate());
- adapters: which framework adapters would activate here.

Exit status 1 when something required is missing (torch in a supported
range; on a MACA host the toolkit), each with its fix; 0 otherwise. Nothing
here imports a framework.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

from maca_infer.common import envs, versions

# adapter -> (import path, distributions that must be installed and in range: all of / any of)
ADAPTERS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "lmdeploy": ("maca_infer.adapters.lmdeploy", ("lmdeploy", "transformers"), ()),
    "sglang": ("maca_infer.adapters.sglang", ("sglang",), ()),
    "hf": ("maca_infer.adapters.hf", (), ("transformers", "diffusers")),
}
ENV_FRAMEWORKS = ("lmdeploy", "sglang", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--graph-mode", action="store_true",
        help="report env knobs as for CUDA-graph capture (adds MACA_GRAPH_LAUNCH_MODE)",
    )


def _device_section(problems: list[dict]) -> tuple[dict[str, Any], str | None]:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        problems.append({
            "what": f"torch is not importable ({exc})",
            "fix": f"pip install 'torch{versions.SUPPORTED['torch'][0]}' (MetaX hosts: MetaX's mcPyTorch wheel)",
            "required": True,
        })
        return {"kind": None, "reason": "torch is not importable", "error": str(exc)}, None
    from maca_infer.common.device import emulation, resolve
    from maca_infer.common.device._patch import PATCHES

    try:
        resolution = resolve(refresh=True)
    except (ValueError, RuntimeError) as exc:
        problems.append({
            "what": str(exc).split(". ")[0],
            "fix": "set MACA_INFER_DEVICE to auto (or emulated), or fix the host as the message says",
            "required": True,
        })
        return {"kind": None, "reason": str(exc), "error": str(exc)}, None
    section: dict[str, Any] = {
        "kind": resolution.kind,
        "reason": resolution.reason,
        "torch_device": resolution.torch_device,
        "device_name": resolution.device_name,
        "emulation_active": emulation.is_installed(),
        "runtime_patches": len(PATCHES.records()),
    }
    if resolution.evidence is not None:
        section["evidence"] = {
            "torch_version_maca": resolution.evidence.torch_version_maca,
            "cuda_available": resolution.evidence.cuda_available,
            "cuda_device_count": resolution.evidence.cuda_device_count,
        }
    if resolution.kind == "emulated":
        section["emulated_memory_bytes"] = (
            emulation.memory_tracker().budget if emulation.is_installed() else emulation.default_memory_budget()
        )
    return section, resolution.kind


def _versions_section(problems: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for status in versions.report():
        rows.append({
            "name": status.name,
            "installed": status.installed,
            "supported": status.supported,
            "in_range": status.ok,
            "message": status.message,
        })
        if status.name == "torch" and not status.ok:
            problems.append({
                "what": status.message,
                "fix": f"pip install 'torch{status.supported}' (MetaX hosts: MetaX's mcPyTorch wheel)",
                "required": True,
            })
        elif status.installed is not None and not status.ok:
            problems.append({
                "what": status.message,
                "fix": f"pip install '{status.name}{status.supported}'",
                "required": False,
            })
    return rows


def _toolkit_section(kind: str | None, problems: list[dict]) -> dict[str, Any]:
    from maca_infer.common.device.detect import find_mx_smi, maca_path
    from maca_infer.common.device.env import maca_visible_devices, toolkit_paths

    root = maca_path()
    section: dict[str, Any] = {
        "maca_path": root,
        "maca_path_exists": os.path.isdir(root),
        "dirs": toolkit_paths(root) if os.path.isdir(root) else {"PATH": [], "LD_LIBRARY_PATH": []},
        "mx_smi": find_mx_smi(root),
        "devices": [],
        "visible_devices_order": None,
        # the device list the user set (MACA_VISIBLE_DEVICES wins over the guide's singular spelling)
        "visible_devices": None,
    }
    user_list = maca_visible_devices()
    if user_list is not None:
        section["visible_devices"] = {"variable": user_list[0], "value": user_list[1]}
    if section["mx_smi"]:
        from maca_infer.common.device import mxsmi

        report, topo = mxsmi.query(section["mx_smi"])
        if report is not None:
            section["smi_version"] = report.smi_version
            section["driver_version"] = report.driver_version
            section["maca_version"] = report.maca_version
            section["devices"] = [
                {"index": d.index, "name": d.name, "bus_id": d.bus_id,
                 "memory_used_mib": d.memory_used_mib, "memory_total_mib": d.memory_total_mib, "state": d.state}
                for d in report.devices
            ]
        if topo is not None:
            section["visible_devices_order"] = ",".join(str(g) for g in mxsmi.device_order(topo))
    if kind == "maca":
        if not section["maca_path_exists"]:
            problems.append({
                "what": f"the MACA toolkit is not at MACA_PATH={root}",
                "fix": "install MetaX's MACA SDK, or export MACA_PATH=<its install dir>",
                "required": True,
            })
        if section["mx_smi"] is None:
            problems.append({
                "what": "mx-smi is not on PATH nor under $MACA_PATH/bin",
                "fix": "install MetaX's driver tools (mx-smi) or add their bin dir to PATH",
                "required": False,
            })
    return section


def _vendor_builds(kind: str | None, device: dict[str, Any], toolkit: dict[str, Any], problems: list[dict]) -> None:
    """On a MetaX host, torch and triton must be MetaX's builds (a PyPI build slipped in sees no device).

    A MetaX host: the device resolved to maca, or the MACA toolkit and mx-smi are
    here (a PyPI torch on a MetaX host resolves to emulated: that is the case
    this catches). torch is MetaX's when ``torch.version.maca`` is set or its
    version carries ``+metax``/``maca``; triton by its version string.
    """
    from maca_infer.setup import is_metax_build

    host = kind == "maca" or bool(toolkit["maca_path_exists"] and toolkit["mx_smi"])
    builds: dict[str, Any] = {}
    for name in ("torch", "triton"):
        version = versions.installed_version(name)
        metax = version is not None and is_metax_build(version)
        if name == "torch" and (device.get("evidence") or {}).get("torch_version_maca"):
            metax = True
        builds[name] = {"version": version, "metax_build": metax}
        if not host or metax:
            continue
        if version is None:
            what = f"{name} is not installed on this MetaX host"
        else:
            what = f"{name} {version} is not MetaX's build: a PyPI build does not see the MetaX device"
        problems.append({
            "what": what,
            "fix": f"put MetaX's {name} wheel (+metax, MetaX's index) in its place;"
                   " maca-infer setup then keeps it",
            "required": False,
            "warn": True,
        })
    toolkit["metax_host"] = host
    toolkit["vendor_builds"] = builds


def _env_section(kind: str | None, graph_mode: bool, problems: list[dict]) -> dict[str, Any]:
    """Per framework: each variable activate() handles, its value and status.

    status: "set by the user" (kept: never overwritten), "set by maca-infer"
    (activate() already ran in this process, e.g. from the autoload hook),
    "would set" (activate() sets it here), "MetaX hosts only" (a vendor knob
    activate() applies only when the device resolves to maca).
    """
    from maca_infer.common.device.env import applied_env, plan_env, recommended_knobs

    vendor = kind == "maca"
    section: dict[str, Any] = {"vendor_knobs_apply": vendor, "graph_mode": graph_mode, "frameworks": {}}
    for framework in ENV_FRAMEWORKS:
        try:
            plan = plan_env(framework, graph_mode, vendor_knobs=True)
        except ValueError as exc:  # MACA_/CUDA_VISIBLE_DEVICES disagree
            problems.append({"what": str(exc), "fix": "unset one of MACA_VISIBLE_DEVICES (or MACA_VISIBLE_DEVICE) / CUDA_VISIBLE_DEVICES",
                             "required": True})
            return section
        knob_names = {k.name for k in recommended_knobs(framework, graph_mode)}
        ours = applied_env()
        rows = []
        for change in plan:
            if not change.applied:
                status = "set by maca-infer" if ours.get(change.name) == change.value else "set by the user"
            elif change.name in knob_names and not vendor:
                status = "MetaX hosts only"
            else:
                status = "would set"
            rows.append({"name": change.name, "value": change.value, "in_effect": envs.external(change.name),
                         "status": status, "why": change.why})
        section["frameworks"][framework] = rows
    return section


def _adapters_section() -> list[dict[str, Any]]:
    rows = []
    for name, (module, all_of, any_of) in ADAPTERS.items():
        statuses = {n: versions.status(n) for n in all_of + any_of}
        ok_all = all(statuses[n].ok for n in all_of)
        ok_any = not any_of or any(statuses[n].ok for n in any_of)
        try:
            present = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            present = False
        reasons = [statuses[n].message for n in all_of if not statuses[n].ok]
        if any_of and not ok_any:
            reasons.append("none of " + ", ".join(any_of) + " is installed in range")
        if not present:
            reasons.append(f"{module} is not part of this build")
        rows.append({
            "adapter": name,
            "would_activate": bool(ok_all and ok_any and present),
            "why_not": "; ".join(reasons) or None,
        })
    return rows


def _runtime_patches_section() -> list[dict[str, Any]]:
    """Per owner: runtime patches declared, and applied in this process (the full list: `patches list --runtime`)."""
    from maca_infer.patches_cli import runtime_ledger

    counts: dict[str, dict[str, Any]] = {}
    for row in runtime_ledger():
        entry = counts.setdefault(row["owner"], {"owner": row["owner"], "declared": 0, "applied_here": 0})
        entry["declared"] += 1
        entry["applied_here"] += row.get("applied_parts") or int(row["applied"])
    return list(counts.values())


def _ops_section(kind: str | None) -> dict[str, Any]:
    """Which tier the ops run on here, the launch table, and every kernel failure that fell back."""
    from maca_infer.common import envs
    from maca_infer.common.ops import _dispatch, _launch

    forced = envs.ops_impl()
    if forced != "auto":
        tier = forced
    elif kind in ("maca", "cuda-standin"):
        tier = "triton" if _dispatch.triton_available() else "reference (triton is not importable)"
    else:
        tier = "reference"
    vendor_libs = None
    if kind == "maca" or forced == "vendor":
        from maca_infer.common.ops import vendor

        vendor_libs = vendor.available()  # library -> importable
        if forced == "auto" and any(vendor_libs.values()):
            found = ", ".join(name for name, ok in vendor_libs.items() if ok)
            tier = f"vendor ({found}) where it serves the call, else {tier}"
    return {
        "impl": forced,
        "tier": tier,
        "vendor_libraries": vendor_libs,
        "fallback_allowed": envs.ops_fallback_allowed(),
        "launch_family": _launch.family() if kind else None,
        "ran": _dispatch.tiers(),  # op -> tier, for the ops this process ran
        "fallbacks": _dispatch.fallbacks(),
    }


def collect(graph_mode: bool = False) -> dict[str, Any]:
    """Everything the doctor reports, as one JSON-able dict."""
    problems: list[dict] = []
    device, kind = _device_section(problems)
    report: dict[str, Any] = {"device": device}
    report["versions"] = _versions_section(problems)
    report["toolkit"] = _toolkit_section(kind, problems)
    _vendor_builds(kind, device, report["toolkit"], problems)
    report["env"] = _env_section(kind, graph_mode, problems)
    report["adapters"] = _adapters_section()
    # beside the emulation's count: every owner's declared / applied runtime patches
    report["device"]["runtime_patches_by_owner"] = _runtime_patches_section()
    report["device"]["ops"] = _ops_section(kind)
    report["problems"] = problems
    report["ok"] = not any(p["required"] for p in problems)
    return report


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    text_rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in text_rows]
    return "\n".join(out)


def render(report: dict[str, Any]) -> str:
    parts = []
    device = report["device"]
    parts.append("== maca device ==")
    rows = [["kind", device.get("kind") or "(unresolved)"], ["why", device.get("reason")]]
    if device.get("kind"):
        rows += [["torch device", device.get("torch_device")], ["device name", device.get("device_name")]]
    if "emulated_memory_bytes" in device:
        rows.append(["emulated memory", f"{device['emulated_memory_bytes'] / (1 << 30):.1f} GiB"])
        active = "yes" if device.get("emulation_active") else "no (activate() or MACA_INFER_DEVICE=emulated installs it)"
        rows.append(["emulation installed", active])
    parts.append(_table(["item", "value"], rows))
    parts.append("\n== versions ==")
    parts.append(_table(
        ["package", "installed", "supported", "in range"],
        [[v["name"], v["installed"] or "not installed", v["supported"], "yes" if v["in_range"] else "no"]
         for v in report["versions"]],
    ))
    tk = report["toolkit"]
    parts.append("\n== MACA toolkit ==")
    rows = [["MACA_PATH", f"{tk['maca_path']} ({'found' if tk['maca_path_exists'] else 'missing'})"],
            ["PATH dirs", ", ".join(tk["dirs"]["PATH"]) or "-"],
            ["LD_LIBRARY_PATH dirs", ", ".join(tk["dirs"]["LD_LIBRARY_PATH"]) or "-"],
            ["mx-smi", tk["mx_smi"] or "not found"]]
    for d in tk["devices"]:
        memory = f"{d['memory_used_mib']}/{d['memory_total_mib']} MiB"
        rows.append([f"GPU {d['index']}", f"{d['name']} {d['bus_id']} {memory} {d['state'] or ''}".rstrip()])
    if tk.get("visible_devices"):
        rows.append(["visible devices", f"{tk['visible_devices']['value']} (from {tk['visible_devices']['variable']})"])
    if tk.get("visible_devices_order"):
        rows.append(["MACA_VISIBLE_DEVICES (topo order)", tk["visible_devices_order"]])
    parts.append(_table(["item", "value"], rows))
    parts.append("\n== env knobs ==")
    rows = []
    for framework, knobs in report["env"]["frameworks"].items():
        for k in knobs:
            rows.append([framework, k["name"], k["value"], k["status"], k["why"]])
    parts.append(_table(["framework", "variable", "value", "status", "why"], rows))
    parts.append("\n== adapters ==")
    parts.append(_table(
        ["adapter", "would activate", "why not"],
        [[a["adapter"], "yes" if a["would_activate"] else "no", a["why_not"] or ""] for a in report["adapters"]],
    ))
    parts.append("\n== runtime patches (all of them: maca-infer patches list --runtime) ==")
    parts.append(_table(
        ["owner", "declared", "applied in this process"],
        [[r["owner"], r["declared"], r["applied_here"]] for r in report["device"]["runtime_patches_by_owner"]],
    ))
    ops = device.get("ops")
    if ops:
        parts.append("\n== ops ==")
        rows = [["tier (MACA_INFER_OPS_IMPL=" + ops["impl"] + ")", ops["tier"]],
                ["launch table", ops["launch_family"] or "-"],
                ["fallback to reference", "allowed (MACA_INFER_OPS_FALLBACK=1)" if ops["fallback_allowed"]
                 else "off on a device: a failing kernel raises (MACA_INFER_OPS_FALLBACK=1 allows it)"]]
        for lib, ok in (ops.get("vendor_libraries") or {}).items():
            rows.append([f"vendor library: {lib}", "importable" if ok else "missing (its ops run on triton)"])
        rows += [[f"ran: {op}", tier] for op, tier in ops["ran"].items()]
        rows += [[f"FELL BACK: {f['op']}", f"{f['reason']} [{f['shapes']}]"] for f in ops["fallbacks"]]
        parts.append(_table(["item", "value"], rows))
    if report["problems"]:
        parts.append("\n== problems ==")
        parts.append(_table(
            ["required", "problem", "fix"],
            [["yes" if p["required"] else "no", p["what"], p["fix"]] for p in report["problems"]],
        ))
    parts.append("\nstatus: " + ("OK" if report["ok"] else "MISSING REQUIRED PIECES (see problems)"))
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    report = collect(graph_mode=getattr(args, "graph_mode", False))
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(render(report))
    for p in report["problems"]:
        if p.get("warn"):
            print(f"maca-infer doctor: warning: {p['what']}; fix: {p['fix']}", file=sys.stderr)
    if not report["ok"]:
        for p in report["problems"]:
            if p["required"]:
                print(f"maca-infer doctor: {p['what']}; fix: {p['fix']}", file=sys.stderr)
        return 1
    return 0
