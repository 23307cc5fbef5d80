"""Reading ``mx-smi``, MetaX's nvidia-smi: devices, memory, link topology.

``mx-smi`` (default table) lists each GPU as two table rows; two layouts are
in the field (both parsed; samples in ``tests/device/data``)::

    mx-smi 2.2.4                                  mx-smi 2.2.9
    | GPU  NAME       | Bus-id       | Util |     | Board  Name      | GPU  Persist-M | Bus-id       | Util sGPU-M |
    | Temp Pwr:U/Cap  | Memory-Usage | State|     | Pwr:Usage/Cap    | Temp   Perf    | Memory-Usage | GPU-State   |
    | 0    MetaX C550 | 0000:0f:00.0 | 0%   |     | 0  MetaX C500    | 0      Off     | 0000:0e:00.0 | 0%  Disabled|
    | 29C  53W / 450W | 858/65536 MiB| Avail|     | 57W / 350W       | 35C    P0      | 826/65536 MiB| Available   |

``mx-smi topo -m`` prints a link matrix (``X`` self, ``MX`` MetaXLink, then
PCIe levels ``PIX``/``PXB``/``PHB``/``NODE``/``SYS``), optionally followed by
NUMA/CPU affinity columns. :func:`device_order` turns it into the order
MetaX's guide asks for in ``MACA_VISIBLE_DEVICES``: GPUs joined by MetaXLink
next to each other, so a tensor-parallel group of consecutive ranks talks
over MetaXLink instead of PCIe.

The binary belongs to MetaX: :func:`run_mx_smi` calls it only when present.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

from maca_infer.common.device.detect import find_mx_smi

_BUS_ID = re.compile(r"\b[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-9a-fA-F]\b")
_MEMORY = re.compile(r"\b(\d+)\s*/\s*(\d+)\s*MiB\b")
_POWER = re.compile(r"\b(\d+(?:\.\d+)?)W\s*/\s*(\d+(?:\.\d+)?)W\b")
_TEMP = re.compile(r"\b(\d+)C\b")
_LEADING_INDEX = re.compile(r"^\s*(\d+)\s+(.*?)\s*$")

# Link kinds, best first. NA (unknown) sorts last.
LINK_RANK = {"X": 0, "MX": 1, "PIX": 2, "PXB": 3, "PHB": 4, "NODE": 5, "SYS": 6, "ETH": 7, "NA": 8}


@dataclass(frozen=True)
class MxSmiDevice:
    index: int
    name: str
    bus_id: str
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None
    state: str | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_cap_w: float | None = None

    @property
    def memory_free_mib(self) -> int | None:
        if self.memory_used_mib is None or self.memory_total_mib is None:
            return None
        return self.memory_total_mib - self.memory_used_mib


@dataclass(frozen=True)
class MxSmiReport:
    smi_version: str | None
    driver_version: str | None
    maca_version: str | None
    attached_gpus: int | None
    devices: tuple[MxSmiDevice, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Topology:
    """``mx-smi topo -m``: ``links[i][j]`` is the link kind between GPU i and j."""

    gpus: tuple[int, ...]
    links: tuple[tuple[str, ...], ...]
    numa_affinity: tuple[str | None, ...] = ()
    cpu_affinity: tuple[str | None, ...] = ()

    def link(self, a: int, b: int) -> str:
        return self.links[self.gpus.index(a)][self.gpus.index(b)]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _header_value(text: str, label: str) -> str | None:
    match = re.search(rf"{label}\s*:?\s*([0-9][0-9.]*)", text)
    return match.group(1) if match else None


def parse_smi(text: str) -> MxSmiReport:
    """Parse the default ``mx-smi`` table (either layout).

    Raises ``ValueError`` when the text has no device rows and does not say
    ``Attached GPUs : 0`` (not mx-smi output, or a layout we do not know).
    """
    attached = re.search(r"Attached GPUs\s*:\s*(\d+)", text)
    attached_gpus = int(attached.group(1)) if attached else None
    devices: list[MxSmiDevice] = []
    pending: dict | None = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        cells = _cells(line)
        if "Process" in line and pending is None:
            break
        bus = _BUS_ID.search(line)
        if bus:
            if pending is not None:
                devices.append(MxSmiDevice(**pending))
            match = _LEADING_INDEX.match(cells[0])
            if not match:
                raise ValueError(f"mx-smi: cannot read a GPU index and name from row {line.strip()!r}")
            index, name = int(match.group(1)), match.group(2)
            pending = {"index": index, "name": name, "bus_id": bus.group(0)}
            continue
        memory = _MEMORY.search(line)
        if memory and pending is not None:
            pending["memory_used_mib"] = int(memory.group(1))
            pending["memory_total_mib"] = int(memory.group(2))
            power = _POWER.search(line)
            if power:
                pending["power_w"] = float(power.group(1))
                pending["power_cap_w"] = float(power.group(2))
            temp = _TEMP.search(line)
            if temp:
                pending["temperature_c"] = int(temp.group(1))
            last = cells[-1] if cells else ""
            pending["state"] = last or None
            devices.append(MxSmiDevice(**pending))
            pending = None
    if pending is not None:
        devices.append(MxSmiDevice(**pending))
    if not devices and attached_gpus != 0:
        raise ValueError("mx-smi: no GPU rows found (expected rows with a PCI bus id like 0000:0e:00.0)")
    return MxSmiReport(
        smi_version=_header_value(text, r"MX-SMI") or _header_value(text, r"mx-smi\s+version"),
        driver_version=_header_value(text, r"Kernel Mode Driver Version"),
        maca_version=_header_value(text, r"MACA Version"),
        attached_gpus=attached_gpus,
        devices=tuple(devices),
    )


def parse_topo(text: str) -> Topology:
    """Parse ``mx-smi topo -m``; NIC rows and columns (``topo -n``) are dropped.

    Raises ``ValueError`` when there is no GPU matrix, or a row is not square.
    """
    header: list[str] | None = None
    rows: dict[int, list[str]] = {}
    numa: dict[int, str | None] = {}
    cpus: dict[int, str | None] = {}
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if header is None and tokens[0].startswith("GPU") and tokens[0][3:].isdigit() and line[:1].isspace():
            # the column header is the first line that starts with blanks then GPU0
            header = tokens
            continue
        if header is not None and re.fullmatch(r"GPU\d+", tokens[0]):
            gpu_columns = [i for i, name in enumerate(header) if re.fullmatch(r"GPU\d+", name)]
            values = tokens[1:]
            if len(values) < len(gpu_columns):
                raise ValueError(f"mx-smi topo: row {line.strip()!r} has fewer links than GPU columns")
            index = int(tokens[0][3:])
            rows[index] = [values[i] for i in gpu_columns]
            # after the GPU (and, for topo -n, NIC) link columns: NUMA node, CPU list
            link_columns = [n for n in header if re.fullmatch(r"(GPU|NIC)\d+", n)]
            extra = values[len(link_columns):]
            numa[index] = extra[0] if len(extra) >= 1 else None
            cpus[index] = extra[1] if len(extra) >= 2 else None
    if header is None or not rows:
        raise ValueError("mx-smi topo: no GPU link matrix found (expected a header line 'GPU0 GPU1 ...')")
    gpus = tuple(sorted(rows))
    column_gpus = [int(n[3:]) for n in header if re.fullmatch(r"GPU\d+", n)]
    if sorted(column_gpus) != list(gpus):
        raise ValueError(f"mx-smi topo: GPU rows {list(gpus)} do not match GPU columns {column_gpus}")
    order = [column_gpus.index(g) for g in gpus]
    links = tuple(tuple(rows[g][c] for c in order) for g in gpus)
    for g, row in zip(gpus, links):
        if row[gpus.index(g)] != "X":
            raise ValueError(f"mx-smi topo: GPU{g} is not marked X (self) on the diagonal")
    return Topology(gpus, links, tuple(numa[g] for g in gpus), tuple(cpus[g] for g in gpus))


def metaxlink_groups(topo: Topology) -> list[list[int]]:
    """GPUs connected through MetaXLink (``MX``), each group sorted, groups by first GPU."""
    parent = {g: g for g in topo.gpus}

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, a in enumerate(topo.gpus):
        for j, b in enumerate(topo.gpus):
            if i != j and topo.links[i][j] == "MX":
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for g in topo.gpus:
        groups.setdefault(find(g), []).append(g)
    return sorted((sorted(v) for v in groups.values()), key=lambda grp: grp[0])


def device_order(topo: Topology) -> list[int]:
    """GPU order for ``MACA_VISIBLE_DEVICES``: MetaXLink groups kept together.

    Groups come in order of their lowest GPU; after the first group, the next
    is the one with the best link (by ``LINK_RANK``) to the GPUs already
    placed (ties: lowest GPU), so PCIe neighbours also stay close.
    """
    groups = metaxlink_groups(topo)
    order: list[int] = list(groups.pop(0))
    while groups:
        def distance(group: list[int]) -> tuple[int, int]:
            best = min(LINK_RANK.get(topo.link(a, b), len(LINK_RANK)) for a in order for b in group)
            return best, group[0]

        nearest = min(groups, key=distance)
        groups.remove(nearest)
        order.extend(nearest)
    return order


def run_mx_smi(*args: str, path: str | None = None, timeout: float = 10.0) -> str | None:
    """stdout of ``mx-smi ARGS``; None when mx-smi is absent or fails."""
    binary = path or find_mx_smi()
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout


def query(path: str | None = None) -> tuple[MxSmiReport | None, Topology | None]:
    """Device table and topology from the host's mx-smi (None where unavailable)."""
    report = topo = None
    table = run_mx_smi(path=path)
    if table:
        try:
            report = parse_smi(table)
        except ValueError:
            report = None
    matrix = run_mx_smi("topo", "-m", path=path)
    if matrix:
        try:
            topo = parse_topo(matrix)
        except ValueError:
            topo = None
    return report, topo
