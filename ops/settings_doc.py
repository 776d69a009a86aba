"""The settings table in the README, generated from ``FarmSettings`` and its field docstrings:
``python -m ops.settings_doc`` prints it (the README's table is this output)."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from protocol import settings as settings_module
from protocol.settings import FarmSettings


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(inspect.getsource(settings_module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FarmSettings").body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def table() -> str:
    docs = field_docs()
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(FarmSettings):
        default = "the embedded demo model" if f.name == "model" else f"`{f.default!r}`"
        rows.append(f"| `FARM_{f.name.upper()}` | {default} | {docs.get(f.name, '').replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
