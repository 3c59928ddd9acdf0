"""The docs' references stay true: every link to a heading of a markdown file of the repo finds
that heading, every linked file exists, and every test the docs name (``tests/f.py::name`` or a
bare ``test_name``) is defined in the tests."""
import glob
import os
import re

from conftest import REPO

DOCS = sorted([os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md")),
               *glob.glob(os.path.join(REPO, "datasets", "*.md"))])


def _slug(heading):
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (not - or _),
    spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_slug_is_githubs():
    assert _slug("bfloat16 vs float32 SGR loss terms (`bench/amp_loss_spread.py`)") == \
        "bfloat16-vs-float32-sgr-loss-terms-benchamp_loss_spreadpy"
    assert _slug("MaskFormer / Mask2Former configs against the official ones") == \
        "maskformer--mask2former-configs-against-the-official-ones"


def test_every_link_of_the_docs_finds_its_file_and_heading():
    broken = []
    for doc in DOCS:
        with open(doc) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(doc, REPO)}: {target} (no file)")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{os.path.relpath(doc, REPO)}: {target} (no such heading)")
    assert broken == []


def test_every_test_the_docs_name_exists():
    defined = {}
    for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")):
        with open(path) as f:
            defined[os.path.basename(path)] = set(re.findall(r"^def (test_\w+)", f.read(), flags=re.M))
    every = set().union(*defined.values())
    missing = []
    for doc in DOCS:
        with open(doc) as f:
            text = f.read()
        for file, name in re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text):
            if name not in defined.get(file, ()):
                missing.append(f"{os.path.relpath(doc, REPO)}: tests/{file}::{name}")
        for name in re.findall(r"(?<![\w/:.])(test_\w+)(?![\w.])", text):
            if name not in every:
                missing.append(f"{os.path.relpath(doc, REPO)}: {name}")
    assert missing == []
