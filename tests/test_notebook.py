"""Static checks of experiments/colab_demo.ipynb: valid nbformat 4, code that compiles, config flags that exist.

No notebook engine and no network: the notebook is read as JSON, IPython `!cmd` / `%magic` lines become `pass`.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import ml_collections
import pytest

from configs import base

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "colab_demo.ipynb"

FIELD_FLAG = re.compile(r"--config\.([A-Za-z_][\w.]*)=")
FILE_FLAG = re.compile(r"--config=([\w./-]*\w)")
RUN_PY = re.compile(r"^\s*!\s*python3?\s+run\.py\b(.*)$", re.M)
MAGIC = re.compile(r"^(\s*)[!%]")


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def code_cells(nb: dict) -> list[str]:
    return [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]


def as_python(source: str) -> str:
    """IPython `!cmd`, `%magic` and `%%cell magic` lines become `pass` at the same indentation."""
    return "\n".join(MAGIC.sub(r"\1pass  # ", line) if MAGIC.match(line) else line for line in source.split("\n"))


def missing_fields(text: str, config: ml_collections.ConfigDict) -> list[str]:
    """The dotted fields of every `--config.<field>=` flag in `text` that `config` does not have."""
    missing = []
    for dotted in FIELD_FLAG.findall(text):
        node = config
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                missing.append(dotted)
                break
            node = node[part]
    return missing


def missing_config_files(text: str) -> list[str]:
    return [path for path in FILE_FLAG.findall(text) if not (ROOT / path).is_file()]


def string_assignments(sources: list[str]) -> dict[str, str]:
    """Module-level `NAME = "..."`, `NAME = [<str>, ...]` and `NAME = "<sep>".join(OTHER)` of the code cells, as
    the text IPython substitutes for `{NAME}` in a `!` line (lists joined by spaces)."""
    values: dict[str, str] = {}
    for source in sources:
        for node in ast.parse(as_python(source)).body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            name, value = node.targets[0].id, node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "join"
                    and isinstance(value.func.value, ast.Constant) and len(value.args) == 1
                    and isinstance(value.args[0], ast.Name) and value.args[0].id in values):
                values[name] = values[value.args[0].id].replace(" ", value.func.value.value)
                continue
            try:
                literal = ast.literal_eval(value)
            except ValueError:
                continue
            if isinstance(literal, str):
                values[name] = literal
            elif isinstance(literal, (list, tuple)) and all(isinstance(x, str) for x in literal):
                values[name] = " ".join(literal)
    return values


def run_py_commands(sources: list[str]) -> list[list[str]]:
    """The argument lists of every `!python run.py ...` line, with `{NAME}` expanded from the notebook's own
    assignments (an unresolvable `{...}` fails: the checks below must see every flag)."""
    values = string_assignments(sources)
    commands = []
    for source in sources:
        for args in RUN_PY.findall(source):
            def expand(match: re.Match) -> str:
                assert match.group(1) in values, f"cannot resolve {match.group(0)} in `python run.py{args}`"
                return values[match.group(1)]
            commands.append(shlex.split(re.sub(r"\{(\w+)\}", expand, args)))
    return commands


@pytest.fixture(scope="module")
def nb() -> dict:
    return load_notebook()


def test_valid_nbformat4_without_outputs(nb):
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["kernelspec"].get("display_name")
    assert nb["cells"], "empty notebook"
    ids = [c.get("id") for c in nb["cells"]]
    if nb["nbformat_minor"] >= 5:
        assert all(isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids), ids
        assert len(set(ids)) == len(ids), "cell ids must be unique"
    for n, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("markdown", "code"), (n, cell["cell_type"])
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list)) and cell_source(cell).strip(), f"cell {n} is empty"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {n} has stored outputs"
            assert cell["execution_count"] is None, f"cell {n} has an execution count"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, f"markdown cell {n}"
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][-1]["cell_type"] == "markdown"


def test_as_python_keeps_indentation():
    source = "if x:\n    !python run.py\n    %pip install -q datasets\ny = 1"
    assert as_python(source) == "if x:\n    pass  # python run.py\n    pass  # pip install -q datasets\ny = 1"
    compile(as_python(source), "<test>", "exec")


def test_code_cells_compile(nb):
    for n, source in enumerate(code_cells(nb)):
        compile(as_python(source), f"colab_demo.ipynb code cell {n}", "exec")


def test_flag_checker_rejects_misspelt_fields():
    config = base.get_config()
    text = ("!python run.py --config.synthesis.trajcap=4096 --config.data.limit=8 --config.techer.path=x "
            "--config.run_dir.sub=y --config.synthesis.traj_cap=1")
    assert missing_fields(text, config) == ["synthesis.trajcap", "techer.path", "run_dir.sub"]
    assert missing_config_files("--config=configs/base.py --config=configs/no_such_config.py") == [
        "configs/no_such_config.py"]


def test_every_config_flag_exists(nb):
    text = "\n".join(cell_source(c) for c in nb["cells"])
    assert FIELD_FLAG.search(text), "the notebook uses no --config.<field> flag at all"
    assert missing_fields(text, base.get_config()) == []
    assert missing_config_files(text) == []
    for args in run_py_commands(code_cells(nb)):  # the expanded commands, too
        joined = " ".join(args)
        assert missing_fields(joined, base.get_config()) == [] and missing_config_files(joined) == [], joined


def test_demo_command_is_the_default_job(nb):
    commands = run_py_commands(code_cells(nb))
    demo = [args for args in commands if not any(a.startswith("--config=") for a in args)]
    assert len(demo) == 1, f"expected one `python run.py` on the default (demo) config, got {demo}"
    assert len(demo[0]) == 1 and demo[0][0].startswith("--config.run_dir="), demo[0]
    others = [args for args in commands if args not in demo]
    assert others and all(a.startswith("--config=configs/") for args in others for a in args[:1]), others


def test_plots_names_are_imported_from_plots(nb):
    sources = code_cells(nb)
    imported: set[str] = set()
    used: set[str] = set()
    for source in sources:
        tree = ast.parse(as_python(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "plots":
                imported |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Name) and node.id in ("plot_run", "load_records"):
                used.add(node.id)
            elif isinstance(node, ast.FunctionDef):
                assert node.name not in ("plot_run", "load_records"), f"{node.name} is redefined in the notebook"
    assert used == {"plot_run", "load_records"}
    assert used <= imported, f"{used - imported} used but not imported from plots"
    assert any("sys.path.insert" in s and "experiments" in s for s in sources), "experiments/ not put on sys.path"
