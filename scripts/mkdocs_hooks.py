"""mkdocs hook: links from docs/ to the rest of the repository.

The pages are also read on a code host straight from docs/, where a link
like ``[fi_bench.c](../benchmarks/raw/fi_bench.c)`` works.  In the built site
there is no such file, and ``mkdocs build --strict`` would reject the link.
Such links (relative, leaving docs/, to a file or folder that exists in the
repository) are rendered as the repository path in code style instead; every
other link is left for mkdocs to check.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
_FENCE = re.compile(r"^(```|~~~)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    page_dir = (docs / page.file.src_uri).parent
    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced:
            line = _LINK.sub(lambda m: _rewrite(m, page_dir, docs, repo), line)
        out.append(line)
    return "\n".join(out)


def _rewrite(m: re.Match, page_dir: Path, docs: Path, repo: Path) -> str:
    text, target = m.group(1), m.group(2)
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return m.group(0)  # a URL, or site-absolute
    path = (page_dir / target).resolve()
    if path.is_relative_to(docs) or not path.is_relative_to(repo) or not path.exists():
        return m.group(0)  # inside docs/ (mkdocs checks it), or not ours to rewrite
    rel = PurePosixPath(path.relative_to(repo).as_posix())
    shown = f"{rel}/" if path.is_dir() else str(rel)
    if text.strip("`") == shown or text.strip("`") == str(rel):
        return f"`{shown}`"
    return f"{text} (`{shown}` in the repository)"
