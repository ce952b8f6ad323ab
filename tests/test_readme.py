"""The README's Python snippet runs and gives the shapes (and dtypes, ranges) its comments claim."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# `name = ...  # (4, 16, 128) int64 in [0, 128)`: a shape, then optionally a dtype and a range
CLAIM = re.compile(r"^(\w+)\s*=.*#\s*\(([\d,\s]+)\)\s*(\w+)?(?:\s+in \[(\d+), (\d+)\))?")


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_snippet_runs_and_shapes_match_its_comments():
    code = readme_snippet()
    claims = [m for m in map(CLAIM.match, code.splitlines()) if m]
    assert len(claims) >= 2, "the snippet's shape comments are gone"
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md:Python API", "exec"), ns)
    for m in claims:
        name, shape, dtype, lo, hi = m.groups()
        t = ns[name]
        assert tuple(t.shape) == tuple(int(s) for s in shape.split(",") if s.strip()), name
        if dtype in ("int64", "int32", "float32", "bfloat16", "uint16"):
            assert t.dtype == getattr(torch, dtype), name
        if lo is not None:
            assert int(lo) <= int(t.min()) and int(t.max()) < int(hi), name
