#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

Cargo already forbids circles between crates; inside a crate they are legal Rust, and
they tie modules together so that none can be read, tested or moved alone. This reads
every `crate::a::b` path (in `use` lines, grouped `use crate::{a, b::c}` and inline
paths, doc links excepted) of each crate's `src/`, resolves it to the module file it
names, and reports every strongly connected group of two or more files.

    python3 scripts/check-import-cycles.py        # exit 1 and the circles, or "no circles"
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(src: Path) -> dict:
    """Module path (tuple of names) -> file, for every .rs file under src."""
    mods = {}
    for f in src.rglob("*.rs"):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] in ("lib", "main", "mod"):
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def code_lines(text: str):
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//"):
            continue  # comments and doc links are not imports
        yield line.split("//")[0]


def expand_group(body: str):
    """`a, b::{c, d}, e::f` -> ['a', 'b::c', 'b::d', 'e::f'] (one level of braces)."""
    out, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    paths = []
    for p in out:
        m = re.match(r"([\w:]+)::\{(.*)\}$", p, re.S)
        if m:
            paths += [m.group(1) + "::" + q for q in expand_group(m.group(2))]
        else:
            paths.append(p)
    return paths


def references(text: str):
    body = "\n".join(code_lines(text))
    paths = []
    for m in re.finditer(r"crate::\{([^;]*?)\}\s*;", body, re.S):
        paths += expand_group(m.group(1))
    for m in re.finditer(r"\bcrate::((?:\w+::)*\w+)", body):
        paths.append(m.group(1))
    return [p.split(" as ")[0].strip() for p in paths]


def resolve(path: str, mods: dict):
    names = tuple(n for n in path.split("::") if n and n != "self")
    for k in range(len(names), 0, -1):
        if names[:k] in mods:
            return mods[names[:k]]
    return None


def circles(graph: dict):
    """Tarjan's strongly connected components of size > 1."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    found = []
    for src in sorted(ROOT.glob("crates/*/src")):
        mods = module_files(src)
        graph = {}
        for f in mods.values():
            deps = {resolve(p, mods) for p in references(f.read_text())}
            # a module's own parent (lib.rs / mod.rs) declares it; that is not an import
            graph[f] = {d for d in deps if d is not None and d != f and d.name not in ("lib.rs", "main.rs")}
        found += circles(graph)
    if found:
        for c in found:
            print("import circle:", " <-> ".join(str(f.relative_to(ROOT)) for f in c))
        sys.exit(1)
    print("no circles")


if __name__ == "__main__":
    main()
