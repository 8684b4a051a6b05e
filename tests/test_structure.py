"""The project's shape: no import cycle between its modules, a row in docs/configuration.md for every option the CLI
takes, and no broken relative link in README.md or docs/."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
import urllib.parse
from pathlib import Path

from callbacks import CircuitAnalysisCallback
from datamodules import ActivationDataModule
from lightning_modules import SAEModule
from tests.conftest import ROOT

PACKAGES = ("refusal_sae", "datamodules", "lightning_modules", "callbacks")
TOP_LEVEL_OPTIONS = ("seed_everything", "run_dir")
LINKED = {"data.run_dir"}  # set from run_dir by RefusalCLI.add_arguments_to_parser, not an option of its own


# --------------------------------------------------------------------------------------------------
# import graph


def module_files(root: Path, packages: typing.Sequence[str]) -> dict[str, Path]:
    """{dotted module name: file} of every module of `packages` under `root` (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST) -> typing.Iterator[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports made for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in (child, *_runtime_nodes(child)))
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(root: Path, packages: typing.Sequence[str]) -> dict[str, set[str]]:
    """{module: the modules of `packages` it imports at run time}, from every import statement of its source, at
    module level or inside a function, but not under `if TYPE_CHECKING:`; `from package import name` counts as
    importing `package.name` where that is a module and `package` otherwise."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" once every successor is searched
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return [*path[path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_packages_have_no_import_cycle() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert {"refusal_sae.sae", "refusal_sae.model", "datamodules.activation_datamodule"} <= graph.keys()
    assert "refusal_sae.sae" in graph["refusal_sae.sae_io"]  # module-level imports are seen
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


ANALYSIS_STAGES = {f"refusal_sae.{m}" for m in ("analysis", "discovery", "similarity", "evaluation", "cross_ablation",
                                               "directions", "report", "plots")}


def test_the_layout_imports_no_stage() -> None:
    """The layout writes and reads records it is given: their types come from stats / io / circuit-level modules."""
    graph = import_graph(ROOT, PACKAGES)
    assert not graph["refusal_sae.layout"] & ANALYSIS_STAGES, graph["refusal_sae.layout"] & ANALYSIS_STAGES


def test_the_figures_read_records_and_import_no_stage() -> None:
    """`plots` draws every figure, the data stage's included, from records it is given: at run time it imports no
    stage, so the data stage draws its report without importing the analysis."""
    graph = import_graph(ROOT, PACKAGES)
    assert not graph["refusal_sae.plots"] & ANALYSIS_STAGES, graph["refusal_sae.plots"] & ANALYSIS_STAGES
    assert "refusal_sae.plots" in graph["refusal_sae.data"]
    assert not graph["refusal_sae.data"] & (ANALYSIS_STAGES - {"refusal_sae.plots"})


def test_the_ablation_matrices_share_their_statistics_not_each_other() -> None:
    """Circuit cross-ablation and refusal directions take effects, shares and the transfer summary from stats;
    neither reads the other, nor the evaluation or similarity stages."""
    graph = import_graph(ROOT, PACKAGES)
    assert "refusal_sae.stats" in graph["refusal_sae.cross_ablation"] & graph["refusal_sae.directions"]
    others = {"refusal_sae.evaluation", "refusal_sae.similarity"}
    assert not graph["refusal_sae.cross_ablation"] & {"refusal_sae.directions", *others}
    assert not graph["refusal_sae.directions"] & {"refusal_sae.cross_ablation", *others}


def test_only_the_prefix_engine_builds_a_prefix_cache() -> None:
    """The shared prefix's keys and values are made in `refusal_sae.prefix` alone: no other module runs the decoder
    with `use_cache=True` or copies a cache for a batch."""
    for name, path in module_files(ROOT, PACKAGES).items():
        text = path.read_text(encoding="utf-8")
        builds = "use_cache=True" in text or "batch_repeat_interleave" in text
        assert builds == (name == "refusal_sae.prefix"), name


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg.a import something\n")
    (package / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
                                  "else:\n    import pkg.b\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.d"] == {"pkg.a"}
    assert graph["pkg.e"] == {"pkg.b"}  # a type-checking import is no run-time edge
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import pkg\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None


# --------------------------------------------------------------------------------------------------
# configuration reference


def _dataclass_in(hint: object) -> type | None:
    """The dataclass a config option of type `hint` holds (also through `X | None`), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        return found[0] if len(found) == 1 else None
    return None


def cli_options(cls: type, prefix: str) -> list[str]:
    """The options `cls` takes on the command line, under `prefix`: its `__init__` arguments (a dataclass: its
    fields), each dataclass-typed one walked down to its fields, as LightningCLI nests them."""
    if dataclasses.is_dataclass(cls):
        names, hints = [f.name for f in dataclasses.fields(cls)], typing.get_type_hints(cls)
    else:
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        hints = typing.get_type_hints(cls.__init__)
    options = []
    for name in names:
        inner = _dataclass_in(hints.get(name))
        options += cli_options(inner, f"{prefix}{name}.") if inner else [f"{prefix}{name}"]
    return options


CONFIGURATION = ROOT / "docs" / "configuration.md"


def documented_options(reference: Path = CONFIGURATION) -> set[str]:
    """The options of the configuration reference (docs/configuration.md): rows that start with "| `option`"."""
    return set(re.findall(r"^\| `([^`]+)`", reference.read_text(encoding="utf-8"), re.MULTILINE))


def undocumented(options: typing.Iterable[str], reference: Path = CONFIGURATION) -> list[str]:
    return sorted(set(options) - documented_options(reference))


def test_an_option_without_a_documentation_row_is_found(tmp_path: Path) -> None:
    reference = tmp_path / "configuration.md"
    reference.write_text("| option | default | meaning |\n|---|---|---|\n| `data.batch_size` | `4096` | tokens |\n"
                         "`model.lr` is named in the text, not in a row\n", encoding="utf-8")
    assert undocumented(["data.batch_size", "model.lr", "run_dir"], reference) == ["model.lr", "run_dir"]


def test_every_training_option_has_a_documentation_row() -> None:
    options = [*TOP_LEVEL_OPTIONS, *cli_options(ActivationDataModule, "data."), *cli_options(SAEModule, "model.")]
    options = [option for option in options if option not in LINKED]
    assert {"data.prompts.source", "data.model.max_length", "model.sae.k", "model.lr"} <= set(options)
    missing = undocumented(options)
    assert not missing, f"options without a row in docs/configuration.md: {', '.join(missing)}"


def test_every_callback_option_has_a_documentation_row() -> None:
    options = cli_options(CircuitAnalysisCallback, "")
    assert {"analysis.discovery.methods", "analysis.evaluation.target", "every_n_epochs"} <= set(options)
    missing = undocumented(options)
    assert not missing, f"callback options without a row in docs/configuration.md: {', '.join(missing)}"


# --------------------------------------------------------------------------------------------------
# documentation links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def prose_lines(path: Path) -> typing.Iterator[tuple[int, str]]:
    """(line number, line) of `path` outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but hyphens and spaces dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of `path` (a repeated heading's get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        if match := HEADING.match(line):
            base = slug(match.group(1))
            out.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(files: typing.Iterable[Path], root: Path = ROOT) -> list[str]:
    """`file:line: target (why)` for every relative link of `files` to a file that does not exist (or lies outside
    `root`), or to an anchor that no heading of the markdown file it names has. Links in code are not links."""
    broken = []
    for path in files:
        for number, line in prose_lines(path):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
                    continue
                name, _, anchor = urllib.parse.unquote(target).partition("#")
                linked = (path.parent / name).resolve() if name else path.resolve()
                where = f"{path.relative_to(root)}:{number}: {target}"
                if not linked.is_relative_to(root.resolve()):
                    broken.append(f"{where} (outside the repository)")
                elif not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no such heading)")
    return broken


def test_a_broken_documentation_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## What F measures (measured 2026-12-06, `openers`)\n\n"
                                            "## Twice\n\n## Twice\n", encoding="utf-8")
    (tmp_path / "docs" / "x.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n[ok](docs/a.md) [ok](docs/a.md#what-f-measures-measured-2026-12-06-openers) ![ok](docs/x.png)\n"
        "[ok](docs/a.md#twice-1) [ok](#top) [web](https://example.org/missing.md) `[code](docs/none.md)`\n"
        "```\n[fenced](docs/none.md)\n```\n"
        "[file](docs/b.md) [heading](docs/a.md#what-f-measures) [image](x.png) [self](#nowhere) [up](../a.md)\n",
        encoding="utf-8")
    assert broken_links(markdown_files(tmp_path), tmp_path) == [
        "README.md:8: docs/b.md (no such file)",
        "README.md:8: docs/a.md#what-f-measures (no such heading)",
        "README.md:8: x.png (no such file)",
        "README.md:8: #nowhere (no such heading)",
        "README.md:8: ../a.md (outside the repository)",
    ]


def test_every_relative_link_of_the_documentation_resolves() -> None:
    files = markdown_files()
    assert {ROOT / "README.md", CONFIGURATION, ROOT / "docs" / "orbench-results.md"} <= set(files)
    broken = broken_links(files)
    assert not broken, "broken links:\n" + "\n".join(broken)
