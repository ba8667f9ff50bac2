"""The documentation site (docs/, MkDocs) builds with --strict: a broken link, a missing page or an unresolved
API reference fails the suite. Skipped, with the reason, where MkDocs is not installed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("mkdocs", reason="MkDocs is not installed (scripts/setup installs it with the docs extra)")
pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed (the docs extra)")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_the_docs_build_strictly(tmp_path):
    r = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("index.html", "training/index.html", "benchmarks/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).stat().st_size > 0
    assert (tmp_path / "site" / "results" / "b12_aug_vs_alg" / "per_task.png").is_file()  # figures come along
    assert "def train_step" not in (tmp_path / "site" / "api" / "index.html").read_text()  # docstrings, not source
    assert "train_step" in (tmp_path / "site" / "api" / "index.html").read_text()


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is not vacuous: the same site with one link to a page that does not exist fails."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)  # follows docs/results -> benchmarks/results
    (docs / "training.md").write_text((docs / "training.md").read_text() + "\nSee [the GPU page](gpu.md).\n")
    config = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("paths: [.]", f"paths: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    r = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "gpu.md" in r.stderr
