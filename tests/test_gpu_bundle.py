"""make gpu-bundle (benchmarks/gpu_bundle.py): what travels to the offline GPU machine must fit 64 MiB with the
working tree. The size accounting runs on fake folders (no network); a bundle built here is checked as it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks import gpu_bundle
from benchmarks.gpu_bundle import LIMIT_BYTES, folder_bytes, size_plan, tree_bytes


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("gpu-bundle/\nbig.bin\n")
    (repo / "a.py").write_bytes(b"x" * 1000)
    (repo / "sub").mkdir()
    (repo / "sub" / "b.txt").write_bytes(b"y" * 500)
    _git(repo, "add", "a.py", "sub/b.txt", ".gitignore")
    (repo / "new.txt").write_bytes(b"z" * 300)  # untracked, not ignored: it travels too
    (repo / "big.bin").write_bytes(b"0" * 5000)  # ignored: stays here
    return repo


def test_tree_counts_tracked_and_untracked_files_git_does_not_ignore(fake_repo):
    ignore = len("gpu-bundle/\nbig.bin\n")  # .gitignore itself is tracked
    assert tree_bytes(fake_repo) == 1000 + 500 + 300 + ignore
    (fake_repo / "a.py").unlink()  # a deleted tracked file does not travel
    assert tree_bytes(fake_repo) == 500 + 300 + ignore


def test_size_plan_adds_the_bundle_to_the_tree_and_flags_what_does_not_fit(fake_repo):
    bundle = fake_repo / "gpu-bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "wheels" / "x.whl").write_bytes(b"w" * 4096)
    (bundle / "manifest.json").write_text("{}")
    tree = tree_bytes(fake_repo)
    plan = size_plan(fake_repo, bundle, limit=tree + 4096 + 2)
    assert plan["bundle_bytes"] == 4096 + 2 == folder_bytes(bundle) and plan["tree_bytes"] == tree
    assert plan["total_bytes"] == tree + 4098 and plan["fits"] is True
    assert size_plan(fake_repo, bundle, limit=tree + 4097)["fits"] is False
    # a bundle that git does not ignore is counted once, not as bundle and tree both
    other = fake_repo / "bundle2"
    other.mkdir()
    (other / "y.whl").write_bytes(b"v" * 100)
    plan = size_plan(fake_repo, other)
    assert plan["bundle_bytes"] == 100 and plan["tree_bytes"] == tree and plan["limit_bytes"] == 64 * 2**20
    assert folder_bytes(fake_repo / "absent") == 0


def test_a_folder_outside_git_is_refused(tmp_path):
    with pytest.raises(gpu_bundle.BundleError, match="not a git checkout"):
        tree_bytes(tmp_path)


def test_build_refuses_a_bundle_over_the_limit_and_leaves_nothing(tmp_path, monkeypatch, fake_repo):
    """build() with the downloads replaced by files of known size: over the limit it raises, names the sizes,
    and neither the output nor a temporary folder is left behind."""
    def fake_download(specs, dest):
        for name, version in specs.items():
            (dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"w" * 10_000)

    def fake_build(version, dest):
        (dest / f"deepspeed-{version}-py3-none-any.whl").write_bytes(b"d" * 10_000)

    def fake_model(dest):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        return {"name": "smollm2-135m", "files": ["config.json"]}

    monkeypatch.setattr(gpu_bundle, "download_wheels", fake_download)
    monkeypatch.setattr(gpu_bundle, "build_deepspeed", fake_build)
    monkeypatch.setattr(gpu_bundle, "copy_model_files", fake_model)
    monkeypatch.setattr(gpu_bundle, "_version", lambda name: "1.0")
    out = fake_repo / "gpu-bundle"
    manifest = gpu_bundle.build(out, repo=fake_repo)
    names = {w["name"] for w in manifest["wheels"]}
    assert names == set(gpu_bundle.DOWNLOAD) | set(gpu_bundle.TRANSFORMERS) | set(gpu_bundle.BUILT)
    assert manifest["size"]["fits"] and json.loads((out / "manifest.json").read_text())["size"] == manifest["size"]
    assert all(len(w["sha256"]) == 64 and w["bytes"] == 10_000 for w in manifest["wheels"])
    no_tf = gpu_bundle.build(out, repo=fake_repo, transformers=False)
    assert "transformers" not in {w["name"] for w in no_tf["wheels"]} and not list((out / "wheels").glob("transformers*"))
    with pytest.raises(gpu_bundle.BundleError, match="over"):
        gpu_bundle.build(fake_repo / "second", repo=fake_repo, limit=50_000)
    assert not (fake_repo / "second").exists() and not list(fake_repo.glob(".gpu-bundle-*"))


def test_the_bundle_built_here_fits_and_carries_no_weights():
    """Only when `make gpu-bundle` has run here (it needs PyPI): its real size with this working tree."""
    bundle = REPO / "gpu-bundle"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("no gpu-bundle/ here (make gpu-bundle builds it)")
    plan = size_plan(REPO, bundle)
    assert plan["fits"], plan
    assert plan["total_bytes"] <= LIMIT_BYTES
    manifest = json.loads((bundle / "manifest.json").read_text())
    for w in manifest["wheels"]:
        assert (bundle / "wheels" / w["file"]).stat().st_size == w["bytes"]
    names = {w["name"] for w in manifest["wheels"]}
    assert {"trl", "datasets", "deepspeed", "hjson", "pydantic"} <= names
    model = bundle / "smollm2-135m"
    assert {p.name for p in model.iterdir()} == set(gpu_bundle.MODEL_FILES)  # tokenizer and config, no weights
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 576
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bundle", "--check"], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0 and json.loads(res.stdout)["fits"] is True
