"""Preference pairs for the stages that learn from comparisons (DPO and KTO): which datasets, the held-out
share, the pairs Llama 2 drops from safety data, and the pairs as an on-disk dataset every rank can read.
Shared here so that neither stage borrows the other's parts (tests/test_layers.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foundation import distributed
from foundation.config import check, option
from data.loaders import DataSource

if TYPE_CHECKING:
    from data.schemas import Comparison

log = logging.getLogger("alignment.preferences")


@dataclass
class PreferenceDataConfig:
    """Preference pairs."""

    sources: list[DataSource] = option(factory=lambda: [DataSource("bundled:comparisons")],
                                       doc="preference datasets to mix: our comparisons, HH-RLHF, PKU-SafeRLHF or TRL "
                                           "prompt/chosen/rejected (see data.loaders.DataSource)")
    val_fraction: float = option(0.1, "share of pairs held out for evaluation (chosen by a hash of the prompt)")
    drop_chosen_unsafe: bool = option(True, "drop pairs whose chosen response is labelled unsafe and the rejected one safe "
                                            "(Llama 2 drops them from safety data)")

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources", "needs at least one data source")
        check(0 < self.val_fraction < 1, "val_fraction",
              f"must be in (0, 1): the held-out pairs measure the result, got {self.val_fraction}")



def load_data(cfg: PreferenceDataConfig, seed: int) -> tuple[list[Comparison], list[Comparison]]:
    """(1) (train, held-out) comparisons from the configured mixture."""
    from data.loaders import load_comparisons
    from data.mixing import mix, split
    from data.schemas import SafetyBin

    pairs = mix([(load_comparisons(src), src.weight) for src in cfg.sources], seed=seed)
    if cfg.drop_chosen_unsafe:
        kept = [c for c in pairs if c.safety_bin is not SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE]
        if len(kept) < len(pairs):
            log.info("dropped %d pairs whose chosen response is unsafe and rejected one safe", len(pairs) - len(kept))
        pairs = kept
    train, val, _ = split(pairs, val_fraction=cfg.val_fraction, seed=seed, at_least_one_val=True)
    if not train or not val:
        raise ValueError(f"{len(pairs)} pairs give {len(train)} for training and {len(val)} held out; "
                         "add data or change data.val_fraction")
    return train, val


def on_disk(rows: list[dict], folder: Path):
    """The pairs as an on-disk dataset. TRL caches tokenised pairs and precomputed reference log-probs
    next to a dataset's files: every rank of a multi-process run must find them (an in-memory
    dataset would cache into a per-process temporary folder), and a resumed run reuses them."""
    import datasets

    if distributed.is_main() and not (folder / "state.json").is_file():
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    distributed.barrier()
    return datasets.load_from_disk(str(folder))
