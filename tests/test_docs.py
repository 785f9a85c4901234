"""The docs stay true to the code and to themselves.

The README is a short front door and docs/ holds one page per topic. Two things rot silently when
code moves under prose, so they are checked here:
- every config key the config tree accepts is documented in docs/configs.md (a key nobody can find
  is a key nobody can use), for train configs and pipeline configs alike;
- every relative link in README.md and docs/*.md leads to a file that exists and, for `#anchor`
  links, to a heading of that file (GitHub's slugs), so moving a page or renaming a heading breaks
  a test instead of a reader's click.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from dist_ssl import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# ---------------------------------------------------------------------------------------------
# (a) every config key is documented


def dotted_keys(cls: type, prefix: str = "", stop: tuple[type, ...] = ()) -> list[str]:
    """Every leaf of a config dataclass as a dotted key ('data.augment.cutout').

    Walked here rather than with config.valid_keys, so that a bug there cannot hide a key here.
    A section typed `dict[str, SomeDataclass]` (keys chosen by the user) is walked as
    'section.*.field'; today's roles are a dataclass with fixed teacher/student fields, so they come
    out as 'roles.teacher.lr' and so on. A field whose type is in `stop` is one key, 'name.*'
    (a pipeline stage is a whole train config, documented once in the train table).
    """
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], prefix + f.name
        if tp in stop:
            keys.append(name + ".*")
        elif dataclasses.is_dataclass(tp):
            keys.extend(dotted_keys(tp, name + ".", stop))
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            keys.extend(dotted_keys(typing.get_args(tp)[1], name + ".*.", stop))
        else:
            keys.append(name)
    return keys


def documented(page: Path) -> set[str]:
    """The keys a page names in code spans: `data.batch_size`, `teacher.*`."""
    return set(re.findall(r"`([A-Za-z_][\w.*]*)`", page.read_text()))


def test_walker_sees_what_the_loader_accepts():
    # The loader's own list of leaves and ours agree, so (a) checks the tree users can set.
    assert dotted_keys(config.Config) == config.valid_keys(config.Config)
    assert len(dotted_keys(config.Config)) > 80  # the walk reached the nested sections


@pytest.mark.parametrize("root", [config.Config, config.PipelineConfig], ids=["train", "pipeline"])
def test_every_config_key_is_in_configs_md(root):
    names = documented(DOCS / "configs.md")
    keys = dotted_keys(root, stop=(config.Config,))
    missing = [k for k in keys if k not in names]
    assert not missing, f"config keys not documented in docs/configs.md (as `key` in a table row): {missing}"


# ---------------------------------------------------------------------------------------------
# (b) every relative link resolves

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'
    ('Teacher → student pipeline' -> 'teacher--student-pipeline')."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = FENCE.sub("", page.read_text())  # a '# comment' in a code block is no heading
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = github_slug(match.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
        seen[slug] = n + 1
    return out


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [a or b for a, b in LINK.findall(text)]


def test_github_slug():
    assert github_slug("Teacher → student pipeline") == "teacher--student-pipeline"
    assert github_slug("Preemption: signals, exit code 75, SLURM") == "preemption-signals-exit-code-75-slurm"
    assert github_slug("Reports: `dist-ssl report`") == "reports-dist-ssl-report"


def test_docs_exist():
    assert len(PAGES) > 5 and all(p.is_file() for p in PAGES)
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200  # the front door stays short


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"broken links in {page.relative_to(ROOT)}: {broken}"
