"""Small tool commands: ``align merge``, ``align models``, ``align generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def cmd_merge(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align merge",
                                description="Merge a LoRA adapter into its base model and write a full checkpoint.")
    p.add_argument("--adapter", required=True, help="adapter folder or stage output (e.g. runs/demo/sft)")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint (must not exist or be empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    from foundation.adapters import merge
    from foundation.runs import setup_logging

    setup_logging()
    out = merge(a.adapter, a.out, dtype=a.dtype)
    print(out)
    return 0


def cmd_models(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align models",
                                description="Build (if needed) and list the built-in models in the cache ($ALIGN_CACHE).")
    p.add_argument("names", nargs="*", default=["smollm2-135m", "tiny-llama"], help="built-ins to build")
    a = p.parse_args(argv)
    from foundation.models import SMOLLM2, TINY, builtin_path, cache_root
    from foundation.runs import setup_logging

    setup_logging()
    for name in a.names:
        if name not in (SMOLLM2, TINY):
            print(f"align models: unknown built-in '{name}' (known: {SMOLLM2}, {TINY})", file=sys.stderr)
            return 2
        print(f"{name}\t{builtin_path(name)}")
    print(f"cache: {cache_root()}")
    return 0


def cmd_generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align generate", description="Generate answers from a model (batched, KV cache).")
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or stage output")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file (any format the data layer reads)")
    p.add_argument("--out", help="write JSONL here instead of printing")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from foundation.generation import generate
    from foundation.models import load_causal_lm, load_tokenizer
    from data.loaders import DataSource, load_prompts, write_jsonl

    convs = [[{"role": "user", "content": t}] for t in a.prompt]
    if a.prompts:
        convs += [r.messages for r in load_prompts(DataSource(path=a.prompts, limit=a.limit))]
    if not convs:
        p.error("give --prompt TEXT or --prompts FILE")
    model = load_causal_lm(a.model)
    tok = load_tokenizer(a.model)
    gens = generate(model, tok, convs, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                    batch_size=a.batch_size, seed=a.seed)
    rows = [{"prompt": c, "response": g.text, "finished": g.finished} for c, g in zip(convs, gens)]
    if a.out:
        write_jsonl(Path(a.out), rows)
        print(a.out)
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def cli(name: str, argv: Sequence[str]) -> int:
    return {"merge": cmd_merge, "models": cmd_models, "generate": cmd_generate}[name](argv)
