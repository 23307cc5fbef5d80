"""mx-smi parsing against recorded output (tests/device/data/README.md says where each is from)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from maca_infer.common.device import mxsmi

DATA = Path(__file__).parent / "data"
SMI_FILES = ["mx-smi_2.2.9_c500x8.txt", "mx-smi_2.2.4_c550x8.txt"]
TOPO_FILES = ["mx-smi_topo-m_2.2.9_node.txt", "mx-smi_topo-m_sys.txt"]


def _rows_by_bus_id(text: str) -> dict[str, tuple[str, str]]:
    """Independent reading: each bus-id row and the row under it, as raw text."""
    lines = text.splitlines()
    rows = {}
    for i, line in enumerate(lines):
        match = re.search(r"\d{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d", line)
        if match:
            rows[match.group(0)] = (line, lines[i + 1])
    return rows


@pytest.mark.parametrize("name", SMI_FILES)
def test_device_table_both_layouts(name):
    text = (DATA / name).read_text()
    report = mxsmi.parse_smi(text)
    rows = _rows_by_bus_id(text)
    assert report.attached_gpus == len(rows) == len(report.devices)
    assert [d.index for d in report.devices] == list(range(len(rows)))
    for device in report.devices:
        first, second = rows[device.bus_id]
        assert first.split("|")[1].split()[0] == str(device.index)
        assert device.name.startswith("MetaX C5") and device.name in first
        memory_cell = next(c for c in second.split("|") if c.strip().endswith("MiB"))
        used, total = memory_cell.split()[0].split("/")
        assert (device.memory_used_mib, device.memory_total_mib) == (int(used), int(total))
        assert device.memory_free_mib == int(total) - int(used)
        assert device.state == "Available"
        assert f"{device.temperature_c}C" in second
        assert f"{int(device.power_w)}W / {int(device.power_cap_w)}W" in second


def test_header_versions():
    report = mxsmi.parse_smi((DATA / "mx-smi_2.2.9_c500x8.txt").read_text())
    assert (report.smi_version, report.driver_version, report.maca_version) == ("2.2.9", "3.4.4", "3.3.0.15")
    old = mxsmi.parse_smi((DATA / "mx-smi_2.2.4_c550x8.txt").read_text())
    assert (old.smi_version, old.driver_version, old.maca_version) == ("2.2.4", "2.15.9", "2.32.0.6")


def test_not_mx_smi_output_is_an_error():
    with pytest.raises(ValueError, match="no GPU rows"):
        mxsmi.parse_smi("NVIDIA-SMI 550.90.07\nno devices here\n")


@pytest.mark.parametrize("name", TOPO_FILES)
def test_topology_matrix(name):
    text = (DATA / name).read_text()
    topo = mxsmi.parse_topo(text)
    matrix_rows = [line.split() for line in text.splitlines() if re.match(r"GPU\d+\s", line)]
    assert topo.gpus == tuple(range(len(matrix_rows)))
    for i, row in enumerate(matrix_rows):
        assert list(topo.links[i]) == row[1 : 1 + len(matrix_rows)]
        assert topo.link(i, i) == "X"
    # symmetric, as a link matrix must be
    for a in topo.gpus:
        for b in topo.gpus:
            assert topo.link(a, b) == topo.link(b, a)
    # both recordings: two MetaXLink quads
    assert mxsmi.metaxlink_groups(topo) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mxsmi.device_order(topo) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_affinity_columns():
    topo = mxsmi.parse_topo((DATA / "mx-smi_topo-m_2.2.9_node.txt").read_text())
    assert topo.numa_affinity == ("0",) * 8
    assert topo.cpu_affinity == ("0-31,64-95",) * 8
    bare = mxsmi.parse_topo((DATA / "mx-smi_topo-m_sys.txt").read_text())
    assert bare.numa_affinity == (None,) * 8


def _matrix_text(links: list[list[str]]) -> str:
    # built in the recorded layout (no recording shows interleaved MetaXLink pairs)
    n = len(links)
    lines = ["Attached GPUs                                     : %d" % n, "Device link type matrix"]
    lines.append("        " + "".join(f"GPU{i:<5d}" for i in range(n)))
    for i, row in enumerate(links):
        lines.append(f"GPU{i:<5d}" + "".join(f"{v:<8s}" for v in row))
    lines += ["", "Legend:", "  X    = Self", "  MX   = Connection traversing MetaXLink"]
    return "\n".join(lines) + "\n"


def test_order_keeps_metaxlink_pairs_together():
    # GPU0<->GPU2 and GPU1<->GPU3 are MetaXLink pairs; the pairs meet over PIX/SYS
    links = [
        ["X", "PIX", "MX", "SYS"],
        ["PIX", "X", "SYS", "MX"],
        ["MX", "SYS", "X", "PIX"],
        ["SYS", "MX", "PIX", "X"],
    ]
    topo = mxsmi.parse_topo(_matrix_text(links))
    assert mxsmi.metaxlink_groups(topo) == [[0, 2], [1, 3]]
    order = mxsmi.device_order(topo)
    assert order == [0, 2, 1, 3]
    # every consecutive pair of ranks (a TP=2 group) talks over MetaXLink
    for a, b in zip(order[0::2], order[1::2]):
        assert topo.link(a, b) == "MX"


def test_order_prefers_the_nearest_next_group():
    # three singleton groups: GPU2 is PIX-close to GPU0, GPU1 is SYS-far
    links = [
        ["X", "SYS", "PIX"],
        ["SYS", "X", "SYS"],
        ["PIX", "SYS", "X"],
    ]
    assert mxsmi.device_order(mxsmi.parse_topo(_matrix_text(links))) == [0, 2, 1]


def test_malformed_topology_is_an_error():
    with pytest.raises(ValueError, match="no GPU link matrix"):
        mxsmi.parse_topo("Attached GPUs : 0\n")
    bad_diagonal = _matrix_text([["MX", "MX"], ["MX", "X"]])
    with pytest.raises(ValueError, match="GPU0 is not marked X"):
        mxsmi.parse_topo(bad_diagonal)


def test_query_runs_the_binary_when_present(fake_maca_host):
    report, topo = mxsmi.query()
    assert report is not None and len(report.devices) == 8
    assert report.devices[0].name == "MetaX C500"
    assert topo is not None and mxsmi.metaxlink_groups(topo) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_absent_binary_gives_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("MACA_PATH", str(tmp_path / "none"))
    assert mxsmi.run_mx_smi() is None
    assert mxsmi.query() == (None, None)
