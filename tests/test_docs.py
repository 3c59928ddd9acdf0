"""The docs' references hold.

* Every relative link of README.md, docs/*.md and datasets/README.md points to a file that
  exists, and every ``#anchor`` to a heading of the linked page (GitHub's anchor rule).
* Every ``docs/<page>.md#anchor`` that the code, configs and tools name is a heading of that page.
* The pages have the headings that other files link to (:data:`REQUIRED_HEADINGS`).
* The figures of the README's results are those of docs/evidence.md's tables.

Each check is a function that returns what is broken; the tests run it on the repository and on
a small sample with known faults, so that each assertion can be seen to fail.
"""
import glob
import os
import re
from urllib.parse import unquote

from conftest import REPO

PAGES = sorted([os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md")),
                *glob.glob(os.path.join(REPO, "datasets", "*.md"))])

# Headings that code, configs and other pages refer to by anchor (docs/method.md: one section per
# part of the method, linked from the sources as docs/method.md#<anchor>).
REQUIRED_HEADINGS = {
    "docs/method.md": [
        "The SGR component",
        "Supervision from connected components",
        "Matching",
        "Token-semantics metrics (S_C, D_C, S_I, D_I)",
        "Training and evaluation recipe",
        "Transfer to detection",
        "mIoU",
        "Choices this implementation fixes",
        "MaskFormer / Mask2Former configs against the official ones",
        "The context toy: where only global context decides",
    ],
}

# Files whose text may name docs/<page>.md#anchor (Markdown pages are checked as links).
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".cfg", ".sh")
CODE_NAMES = ("Makefile",)
SKIP_DIRS = ("__pycache__", "output", "node_modules")
CODE_REFERENCE = re.compile(r"((?:docs/[\w.-]+|datasets/README)\.md)#([\w-]+)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped (code ticks, emphasis, link targets), lower
    case, every character that is not a letter, digit, '-', '_' or space dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[`*]", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def anchors(path: str) -> set:
    """The anchors of a Markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    with open(path, encoding="utf-8") as f:
        text = _without_code_blocks(f.read())
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str):
    """The targets of the inline and reference-style links and images of a Markdown text, code
    blocks and code spans left out."""
    text = re.sub(r"`[^`\n]*`", "", _without_code_blocks(text))
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    return inline + reference


def broken_links(pages, root=REPO):
    """``page: target (why)`` for each relative link of ``pages`` whose file is missing or whose
    ``#anchor`` is not a heading of the Markdown file it points to."""
    broken = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            targets = links(f.read())
        for target in targets:
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = unquote(target).partition("#")
            if not file:
                path = page
            elif file.startswith("/"):
                path = os.path.join(root, file.lstrip("/"))
            else:
                path = os.path.normpath(os.path.join(os.path.dirname(page), file))
            where = os.path.relpath(page, root)
            if not os.path.exists(path):
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{where}: {target} (no such heading)")
    return broken


def code_files(root=REPO, exclude=()):
    excluded = {os.path.abspath(p) for p in exclude}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            if (name.endswith(CODE_SUFFIXES) or name in CODE_NAMES) and os.path.abspath(path) not in excluded:
                yield path


def broken_code_references(files, root=REPO):
    """``file: docs/page.md#anchor (why)`` for each such reference whose page or heading is missing."""
    broken = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for page, anchor in CODE_REFERENCE.findall(text):
            target = os.path.join(root, page)
            where = os.path.relpath(path, root)
            if not os.path.isfile(target):
                broken.append(f"{where}: {page}#{anchor} (no such file)")
            elif anchor not in anchors(target):
                broken.append(f"{where}: {page}#{anchor} (no such heading)")
    return broken


def missing_headings(required, root=REPO):
    """``page: heading`` for each required heading that its page lacks (or the page itself)."""
    missing = []
    for page, headings in required.items():
        path = os.path.join(root, page)
        have = anchors(path) if os.path.isfile(path) else set()
        missing += [f"{page}: {h}" for h in headings if slug(h) not in have]
    return missing


# ----------------------------------------------------------------------------- the repository
def test_every_link_of_the_docs_finds_its_file_and_heading():
    assert len(PAGES) >= 8
    assert broken_links(PAGES) == []


def test_every_docs_anchor_the_code_names_is_a_heading():
    files = list(code_files(exclude=[__file__]))
    assert any(f.endswith(os.path.join("sgr", "matching.py")) for f in files)
    assert broken_code_references(files) == []


def test_the_pages_have_the_headings_others_link_to():
    assert missing_headings(REQUIRED_HEADINGS) == []


def unmatched_results(readme: str, evidence: str, section="## Results measured here"):
    """The ``mean ± std`` figures of the README's results section that docs/evidence.md (the
    tool's tables) does not hold."""
    part = readme.split(section, 1)[1].split("\n## ", 1)[0]
    figures = re.findall(r"\d+\.\d+ ± \d+\.\d+", part)
    assert figures, f"no mean ± std figure under {section!r}"
    return [f for f in figures if f not in evidence]


def test_the_readme_results_are_the_evidence_tables():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO, "docs", "evidence.md"), encoding="utf-8") as f:
        evidence = f.read()
    assert unmatched_results(readme, evidence) == []


# ----------------------------------------------------------------------------- the checks can fail
def test_slug_is_githubs():
    assert slug("bfloat16 vs float32 SGR loss terms (`bench/amp_loss_spread.py`)") == \
        "bfloat16-vs-float32-sgr-loss-terms-benchamp_loss_spreadpy"
    assert slug("MaskFormer / Mask2Former configs against the official ones") == \
        "maskformer--mask2former-configs-against-the-official-ones"
    assert slug("Token-semantics metrics (S_C, D_C, S_I, D_I)") == "token-semantics-metrics-s_c-d_c-s_i-d_i"
    assert slug("3. Bad inputs: a specific error, and **earlier** outputs left alone") == \
        "3-bad-inputs-a-specific-error-and-earlier-outputs-left-alone"
    assert slug("Links [in](x.md) headings") == "links-in-headings"


SAMPLE = """# Sample

## Part one

[ok](#part-one) [ok too](#part-one-1) [file](other.md) [heading](other.md#target)
[missing heading](other.md#no-such-heading) [missing file](absent.md) ![missing image](img/none.png)
[web](https://example.com/x#y) `[in code](absent_in_code.md)`

## Part one

```
[in a code block](absent_in_block.md)
## Not a heading
```

[missing here](#not-a-heading)

[ref]: other.md#elsewhere
"""


def _sample(tmp_path):
    (tmp_path / "page.md").write_text(SAMPLE, encoding="utf-8")
    (tmp_path / "other.md").write_text("# Other\n\n### Target\n\n#### Elsewhere\n", encoding="utf-8")
    return tmp_path


def test_broken_links_are_reported(tmp_path):
    root = _sample(tmp_path)
    assert anchors(str(root / "page.md")) == {"sample", "part-one", "part-one-1"}
    assert broken_links([str(root / "page.md")], root=str(root)) == [
        "page.md: other.md#no-such-heading (no such heading)",
        "page.md: absent.md (no such file)",
        "page.md: img/none.png (no such file)",
        "page.md: #not-a-heading (no such heading)",
    ]
    (root / "other.md").write_text("# Other\n", encoding="utf-8")  # the reference-style link breaks too
    assert "page.md: other.md#elsewhere (no such heading)" in broken_links([str(root / "page.md")], root=str(root))


def test_broken_code_references_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## The SGR component\n", encoding="utf-8")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""See docs/method.md#the-sgr-component and docs/method.md#matching."""\n'
        "# and docs/absent.md#anything\n", encoding="utf-8")
    (tmp_path / "pkg" / "notes.txt").write_text("docs/method.md#not-checked\n", encoding="utf-8")
    files = list(code_files(str(tmp_path)))
    assert [os.path.relpath(f, tmp_path) for f in files] == [os.path.join("pkg", "mod.py")]
    mod = os.path.join("pkg", "mod.py")
    assert broken_code_references(files, root=str(tmp_path)) == [
        f"{mod}: docs/method.md#matching (no such heading)",
        f"{mod}: docs/absent.md#anything (no such file)",
    ]


def test_missing_required_headings_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## The SGR component\n\n### mIoU\n", encoding="utf-8")
    required = {"docs/method.md": ["The SGR component", "mIoU", "Matching"], "docs/gone.md": ["Anything"]}
    assert missing_headings(required, root=str(tmp_path)) == ["docs/method.md: Matching", "docs/gone.md: Anything"]


def test_readme_results_not_in_the_tables_are_reported():
    readme = "# R\n\n## Results measured here\n\n| 59.9 ± 0.6 | 81.3 ± 0.8 |\n\n## More\n\n70.0 ± 1.0\n"
    assert unmatched_results(readme, "| baseline | 59.9 ± 0.6 |") == ["81.3 ± 0.8"]
