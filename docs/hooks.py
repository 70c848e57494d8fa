"""MkDocs hooks for bench's site (`hooks:` in mkdocs.yml). Nothing here names a module of bench or imports it.

- API reference: one page per module of the `bench` package, found by walking `bench/` for `.py` files at build
  time, so a module added, renamed or moved needs no edit here or in mkdocs.yml. Each page is one mkdocstrings
  `::: <module>` block; griffe reads the source statically (mkdocs.yml turns inspection off), so no module,
  `__main__` included, is executed. The pages are listed under "API reference", after the nav of mkdocs.yml.
- Figures: the pages embed the PNGs under `results/examples/` by their path in the repository
  (`../results/examples/...`, which a Git host's Markdown view shows too). They are added to the site as
  `examples/...` without being copied into docs/, and the pages' links are pointed there.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "bench"
API_DIR = "api"
EXAMPLES = ROOT / "results" / "examples"
EXAMPLES_URI = "examples"
FIGURES = ("*.png",)


def _modules() -> list[tuple[str, str]]:
    """(dotted name, page path) of every module of the package, each package before its modules."""
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        if not all((ROOT.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # in a folder without __init__.py: griffe, like setuptools, does not see it as a module
        if parts[-1] == "__init__":
            parts = parts[:-1]
            page = posixpath.join(API_DIR, *parts, "index.md")
        else:
            page = posixpath.join(API_DIR, *parts) + ".md"
        found.append((".".join(parts), page))
    return sorted(found, key=lambda m: (m[0].split("."), m[1]))


def _nav(modules: list[tuple[str, str]]) -> list:
    """The modules as a nav tree under the package's own page: a subpackage is a section whose first entry is
    its own page."""
    tree: dict = {}
    for name, page in modules:
        node = tree
        for part in name.split(".")[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(name.split(".")[-1], {})["."] = (name, page)

    def entries(node: dict) -> list:
        out = []
        for key in sorted(k for k in node if k != "."):
            child = node[key]
            children = entries(child)
            own = [{child["."][0]: child["."][1]}] if "." in child else []
            if children:
                out.append({child["."][0] if "." in child else key: own + children})
            else:
                out += own
        return out

    root = tree[PACKAGE]
    return [{root["."][0]: root["."][1]}, *entries(root)]


def on_config(config):
    modules = _modules()
    nav = list(config.nav or [])
    nav.append({"API reference": [{"Modules": posixpath.join(API_DIR, "index.md")}, *_nav(modules)]})
    config.nav = nav
    return config


def on_files(files: Files, config) -> Files:
    modules = _modules()
    index = ["# API reference", "", f"Every module of the `{PACKAGE}` package, from its docstrings.", ""]
    for name, page in modules:
        depth = name.count(".")
        index.append(f"{'    ' * depth}- [`{name}`]({posixpath.relpath(page, API_DIR)})")
        files.append(File.generated(config, page, content=f"# `{name}`\n\n::: {name}\n"))
    files.append(File.generated(config, posixpath.join(API_DIR, "index.md"), content="\n".join(index) + "\n"))
    for pattern in FIGURES:
        for path in sorted(EXAMPLES.rglob(pattern)):
            uri = posixpath.join(EXAMPLES_URI, path.relative_to(EXAMPLES).as_posix())
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Point a page's links into results/examples/ at the figures' place in the site."""
    page_dir = posixpath.dirname(page.file.src_uri)
    docs_dir = Path(config.docs_dir).resolve()
    in_repo = Path(os.path.relpath(EXAMPLES, docs_dir / page_dir)).as_posix()
    in_site = posixpath.relpath(EXAMPLES_URI, page_dir or ".")
    return markdown.replace(f"]({in_repo}/", f"]({in_site}/")
