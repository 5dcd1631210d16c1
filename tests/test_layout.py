"""The package's architecture rules (docs/design.md §2), checked on the source itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "igrpn"
#: Longest module allowed (docs/design.md §2: "about 600 lines").
MAX_MODULE_LINES = 650


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported igrpn module, at top level?) for every import statement of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top) for target in targets if target in modules and target != name]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_import_checker_sees_a_cycle_and_a_late_import(tmp_path, monkeypatch):
    package = tmp_path / "igrpn"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from igrpn import b\n")
    (package / "b.py").write_text("def f():\n    from igrpn.a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    modules = _modules()
    assert _imports("igrpn.b", modules["igrpn.b"], modules) == [("igrpn.a", False)]
    assert "igrpn.a" in _reachable(_graph(), "igrpn.a")


def test_imports_are_at_the_top_of_every_module():
    modules = _modules()
    late = [f"{name} imports {target}" for name, path in modules.items()
            for target, at_top in _imports(name, path, modules) if not at_top]
    assert late == []


def test_no_import_cycle():
    graph = _graph()
    assert [name for name in graph if name in _reachable(graph, name)] == []


@pytest.mark.parametrize("side", ["igrpn.detect", "igrpn.evaluation.report", "igrpn.evaluation.runs",
                                  "igrpn.viz", "igrpn.checkpoint"])
def test_inference_evaluation_and_figures_never_reach_training(side):
    reached = _reachable(_graph(), side)
    assert sorted(m for m in reached if m.startswith("igrpn.training") or m in ("igrpn.train", "igrpn.experiment")) == []


def test_importing_the_detector_loads_no_training_code():
    code = ("import sys, igrpn.detect; "
            "print(sorted(m for m in sys.modules if m.startswith(('igrpn.training', 'igrpn.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_one_module_holds_mkstemp():
    holders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "mkstemp" in p.read_text(encoding="utf-8")]
    assert holders == ["igrpn/io.py"]


def test_no_module_is_much_longer_than_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _cited_sections() -> dict[str, set[str]]:
    """"docs/design.md §n" (or §n.m) -> the files citing it, in the library, tests, notebooks, Makefile."""
    cited: dict[str, set[str]] = {}
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb"),
             ROOT / "Makefile", ROOT / "README.md"]
    for path in files:
        for section in re.findall(r"docs/design\.md (§\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
            cited.setdefault(section, set()).add(str(path.relative_to(ROOT)))
    return cited


def test_every_cited_design_section_exists_and_the_old_citations_are_gone():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(encoding="utf-8"),
                              flags=re.M))
    cited = _cited_sections()
    assert len(cited) >= 5  # the library cites the design throughout
    missing = {section: sorted(files) for section, files in cited.items() if section[1:] not in headings}
    assert missing == {}
    old = [str(p.relative_to(ROOT)) for p in [*PACKAGE.rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]
           if "DESIGN §" in p.read_text(encoding="utf-8")]
    assert old == []
