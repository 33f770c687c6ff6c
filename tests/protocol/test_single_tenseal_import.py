"""House rules the code keeps: one module imports TenSEAL (protocol/ckks.py),
the two apps do not import each other, no module over 400 lines."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATTERN = re.compile(r"^\s*(import\s+tenseal|from\s+tenseal\b)", re.MULTILINE)


def test_only_protocol_ckks_imports_tenseal():
    """Scan every Python file of the product packages for a tenseal import."""
    importers = sorted(
        str(p.relative_to(ROOT))
        for pkg in ("protocol", "coordinator", "participants", "deploy", "benchmarks")
        for p in (ROOT / pkg).rglob("*.py")
        if PATTERN.search(p.read_text())
    )
    assert importers == ["protocol/ckks.py"]


def test_packages_do_not_import_each_other():
    """The coordinator never imports participants, nor the reverse."""
    for pkg, other in (
        ("coordinator", "participants"),
        ("participants", "coordinator"),
    ):
        for p in (ROOT / pkg).rglob("*.py"):
            text = p.read_text()
            assert not re.search(
                rf"^\s*(from|import)\s+{other}\b", text, re.MULTILINE
            ), p


def test_size_rule_no_module_over_400_lines_and_a_short_readme():
    """The house's size rule (issue 26): no module of the product packages over
    400 lines, and the README stays a user's document of at most 400."""
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in ("protocol", "coordinator", "participants", "benchmarks")
        for p in (ROOT / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400
