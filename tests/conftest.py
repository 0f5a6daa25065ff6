"""Shared fixtures. Tests run on CPU with tiny random models; `slow` tests load the real SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the CLI does: keeps DeepSpeed's probe off stdout

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: the project must not need it at run time."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Build the tiny random Llama once per session (into the user cache)."""
    from foundation.models import builtin_path

    builtin_path("tiny-llama")
    return "tiny-llama"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_align(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `align` CLI in a subprocess (as users do)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """A helpfulness and a safety RM on the tiny model (`align rm`, LoRA, 2 steps each)."""
    import torch

    from foundation.config import load_config
    from reward import rm

    root = tmp_path_factory.mktemp("rms")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for objective in ("helpful", "safety"):
        cfg = load_config(rm.RMConfig, REPO / f"configs/rm_{objective}.yaml", [
            "model.name=tiny-llama", f"run.root={root}", "run.wandb=disabled", "train.max_steps=2"], stage="rm")
        out[objective] = rm.main(cfg)
    torch.set_num_threads(threads)
    return out


@pytest.fixture
def sft_rows() -> list[dict]:
    """40 arithmetic dialogues: easy for a tiny model to start learning."""
    rows = []
    for i in range(40):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def chromium():
    """Debian's Chromium driven by Playwright (never `playwright install`), or skip with what to install."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium not found: apt-get install -y chromium chromium-driver (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright missing: pip install -e '.[browser]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()
