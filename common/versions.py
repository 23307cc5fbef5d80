"""The one place that knows which framework versions maca-infer supports.

Reads installed versions with ``importlib.metadata`` (never imports the
framework). Adapters call ``require(name)`` at activation; the doctor calls
``report()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# distribution name -> (supported range, why this range)
SUPPORTED: dict[str, tuple[str, str]] = {
    "torch": (">=2.6,<2.16", "tested with 2.14.1 (sglang's pin) on CPU"),
    "triton": (">=3.0,<3.10", "tested with 3.8.0 (interpreter on CPU)"),
    "lmdeploy": (">=0.18.0,<0.19", "dlinfer interface and op-backend fix written against 0.18.0"),
    "sglang": (">=0.5.17,<0.6", "sglang.srt.platforms as in 0.5.17 (the last torch 2.11 pin) on; "
               "differences in adapters/sglang/compat.py; tested with 0.5.17 and 0.5.23"),
    "transformers": (">=4.46,<6", "AttentionInterface from 4.48, the attention classes before it; "
                     "tested with 4.46.3 and 5.19.0"),
    "diffusers": (">=0.31,<0.50", "AttnProcessor2_0 everywhere, the attention dispatcher from 0.35; "
                  "tested with 0.31.0 and 0.42.1"),
}


@dataclass(frozen=True)
class VersionStatus:
    name: str
    installed: str | None
    supported: str
    ok: bool

    @property
    def message(self) -> str:
        if self.installed is None:
            return f"{self.name} is not installed (supported: {self.supported})"
        if not self.ok:
            return f"{self.name} {self.installed} is outside the supported range {self.supported}"
        return f"{self.name} {self.installed} (supported: {self.supported})"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def status(name: str) -> VersionStatus:
    spec, _ = SUPPORTED[name]
    found = installed_version(name)
    ok = False
    if found is not None:
        # local tags (2.14.1+cpu) and dev builds count as their release
        release = Version(found).base_version
        ok = Version(release) in SpecifierSet(spec)
    return VersionStatus(name, found, spec, ok)


def require(name: str) -> str:
    """Installed version of ``name``; RuntimeError naming the range otherwise."""
    st = status(name)
    if not st.ok:
        raise RuntimeError(
            f"maca-infer: {st.message}. Install a supported release, e.g. "
            f"pip install '{name}{st.supported}'."
        )
    return st.installed  # type: ignore[return-value]


def range_of(name: str) -> str:
    """``"lmdeploy >=0.18.0,<0.19"``: how runtime patches state the versions they were written for."""
    return f"{name} {SUPPORTED[name][0]}"


def report() -> list[VersionStatus]:
    return [status(n) for n in SUPPORTED]
