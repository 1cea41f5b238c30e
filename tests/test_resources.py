"""Shipped resources (bcc/resources): named taxonomies, the demo config, and the copies in configs/.

The slow test builds a wheel from a clean copy of the tree, installs it (not editable) into a venv
outside the checkout and runs `bcc demo` from there, so a file the commands need but the wheel lacks
fails here and not on a user's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

# shipped file -> the copy in configs/ that users read and edit
COPIES = {"demo.yaml": "configs/demo.yaml", "taxonomy/all_4class.yaml": "configs/taxonomy/all_4class.yaml",
          "taxonomy/kvasir.yaml": "configs/taxonomy/kvasir.yaml",
          "taxonomy/wbc_4class.yaml": "configs/taxonomy/wbc_4class.yaml"}


def test_configs_copies_are_identical_to_the_shipped_files():
    from importlib import resources

    from bcc.resources import taxonomy_names

    shipped = resources.files("bcc.resources")
    names = {f"taxonomy/{n}.yaml" for n in taxonomy_names()} | {"demo.yaml"}
    assert names == set(COPIES), "a shipped file without a copy in configs/ (or the reverse): update COPIES"
    for name, copy in COPIES.items():
        assert shipped.joinpath(*name.split("/")).read_bytes() == (REPO / copy).read_bytes(), (
            f"{copy} differs from bcc/resources/{name}, which the commands read: edit both (cp one over the other)"
        )


def test_named_taxonomies_resolve_by_stem_declared_name_or_file(tmp_path):
    from bcc.resources import load_taxonomy, taxonomy_names
    from bcc.taxonomy import Taxonomy, TaxonomyError

    assert taxonomy_names() == ["all_4class", "kvasir", "wbc_4class"]
    assert load_taxonomy("kvasir").name == load_taxonomy("kvasir-v1").name == "kvasir-v1"
    assert load_taxonomy("all_4class").to_dict() == Taxonomy.default().to_dict()
    assert load_taxonomy(REPO / "configs" / "taxonomy" / "kvasir.yaml").name == "kvasir-v1"
    with pytest.raises(TaxonomyError, match="shipped: all_4class, kvasir, wbc_4class"):
        load_taxonomy("nope")
    with pytest.raises(TaxonomyError, match="cannot read taxonomy file"):
        load_taxonomy(tmp_path / "missing.yaml")


def test_bcc_pack_takes_a_shipped_taxonomy_by_name(tmp_path, make_class_tree, capsys):
    import json

    from bcc.cli import main

    src = make_class_tree(tmp_path / "src", {"polyps": 3, "Esophagitis": 3})
    assert main(["pack", str(src), str(tmp_path / "out"), "--taxonomy", "kvasir", "--split", "1,0,0"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["taxonomy"]["name"] == "kvasir-v1" and len(manifest["classes"]) == 8
    assert main(["pack", str(src), str(tmp_path / "out2"), "--taxonomy", "kvasir-v2"]) == 2
    assert "shipped: all_4class, kvasir" in " ".join(capsys.readouterr().err.split())


def test_demo_config_is_a_real_file():
    from bcc.resources import demo_config, resource_file

    with demo_config() as path:
        assert path.is_file() and "test_resnet" in path.read_text()
    with pytest.raises(FileNotFoundError, match="no resource"):
        with resource_file("nope.yaml"):
            pass


def _clean_tree(dst: Path) -> Path:
    """The files git would commit (tracked and untracked-not-ignored), without build/, dist/, *.egg-info."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            out = dst / os.fsdecode(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    return dst


@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel_outside_the_checkout(tmp_path):
    if not (REPO / ".git").exists():
        if os.environ.get("CI", "").lower() == "true":  # CI clones: a missing checkout there is a failure
            pytest.fail("CI=true: not a git checkout, no clean tree to build the wheel from", pytrace=False)
        pytest.skip("not a git checkout: no clean tree to build from")
    src = _clean_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("bcc-*.whl")
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bcc/resources/{n}" for n in COPIES} <= shipped

    # a venv of its own with the wheel installed; the dependencies (torch, ...) come from this
    # interpreter's site-packages through a .pth line, which (unlike a site dir) runs no .pth of its own,
    # so an editable install of the checkout there stays invisible
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--ignore-installed",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run([str(py), "-c", "import bcc, sys; print(bcc.__file__); print(sys.path)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    where = where.stdout
    assert where.startswith(site), where
    paths = [p for p in where.splitlines()[1].strip("[]").replace("'", "").split(", ")]
    assert str(REPO) not in paths and "" not in paths[1:], f"the checkout is on sys.path: {where}"

    demo = subprocess.run([str(venv / "bin" / "bcc"), "demo", "--out", "demo", "--per-class", "12", "--size", "32",
                           "--processes", "1", "train.epochs=1", "data.image_size=32"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "4-class accuracy" in demo.stdout
    assert str(site) in demo.stdout.replace("\n", "")  # the shipped config, from the installed package
    assert (tmp_path / "demo" / "run" / "metrics.jsonl").is_file()
