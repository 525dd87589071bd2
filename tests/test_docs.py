"""The documentation. Shipped text stands on its own: no pointer to files users do not have (design specs, seed
documents, a ``../shared`` folder); users get README.md and docs/, and code, --help, comments and config files point
there. The pages list every config key, and their links resolve.

``SWEPT`` holds the paths whose text has been swept so far; widen it as other parts are swept, until it is all of
src/, config/, docs/, examples/ and README.md.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEPT = [
    "README.md",
    "Makefile",
    "train.py",
    "config",
    "benchmarks",
    "src",
    "docs",
    "examples",
]
FORBIDDEN = re.compile(
    r"spec/\w+\.md|\bspecs?/|\.\./shared|shared/seeds|seeds/|\b\d{3}_[0-9a-f]{16}\.txt|\bthe spec\b|§",
    re.IGNORECASE,
)
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ""}


def _files():
    for entry in SWEPT:
        path = ROOT / entry
        assert path.exists(), f"{entry} is listed as swept but does not exist"
        if path.is_file():
            yield path
        else:
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                              and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", list(_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_to_files_users_do_not_have(path):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits)


def test_the_pattern_catches_what_it_must():
    for bad in ("see spec/kernels.md §6", "(spec §9)", "../shared/seeds/x", "000_8dbc047495973b7b.txt",
                "as the spec says"):
        assert FORBIDDEN.search(bad), bad
    for good in ("docs/losses.md", "spectral norm", "inspect the run", "special tokens", "specified"):
        assert not FORBIDDEN.search(good), good


def test_docs_links_resolve():
    """Every relative link in README.md and the docs pages points at a file of the repository."""
    link = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, _ in link.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_modifiers_page_lists_every_config_key():
    from losskit.modifiers import MODIFIER_CONFIG_KEYS

    page = (ROOT / "docs" / "modifiers.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`") for line in page.splitlines() if line.startswith("| `")}
    assert set(MODIFIER_CONFIG_KEYS) <= rows, sorted(set(MODIFIER_CONFIG_KEYS) - rows)


def test_training_page_names_every_key_of_the_shared_groups_and_of_lm():
    from losskit.train.config import task_keys
    from losskit.train.tasks import TASKS

    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    others = {name for task in ("temporal", "diffusion") for name, f in TASKS[task].fields().items()
              if not f.metadata.get("modifier")}  # the modifier keys are on modifiers.md
    # the lm keys and every key more than one task shares; the digits tasks' own keys are on their pages
    keys = [name for name, f in task_keys(TASKS["lm"].config).items() if not f.metadata.get("modifier")]
    keys += [name for name in others if sum(name in t.fields() for t in TASKS.values()) > 1]
    missing = sorted({k for k in keys if f"`{k}`" not in page})
    assert not missing, missing
