"""Parameter-efficient fine-tuning: LoRA, QLoRA and prompt tuning (peft), and adapter merging.

``align merge --adapter runs/<run>/sft --out runs/<run>/sft-merged`` folds a LoRA adapter into
its base model and writes a full checkpoint that any stage (or transformers) loads directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from foundation.config import check, option

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_PATTERNS = ("layers", "h", "blocks", "layer")  # the transformer-layer list names of Llama/Qwen/Mistral, GPT-2, MPT, BERT


@dataclass
class AdapterConfig:
    """What is trained: all weights, a LoRA adapter, QLoRA, or soft prompts."""

    method: Literal["full", "lora", "qlora", "prompt_tuning"] = option("lora", "full fine-tuning, LoRA, QLoRA (4-bit base; needs "
                                                                               "a CUDA GPU and bitsandbytes) or prompt "
                                                                               "tuning (peft soft prompts)")
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.05, "LoRA dropout")
    target_modules: list[str] = option(factory=lambda: list(ALL_LINEAR),
                                       doc="modules that get LoRA adapters (Llama names; all linear layers by default)")
    layers: list[int] | None = option(None, "LoRA only in these transformer layers (indices from 0, e.g. [22, 23, ..., 29] "
                                            "for SmolLM2's top 8 of 30); null = every layer. Backward passes stop below the "
                                            "lowest adapted layer, so top layers only train much faster on a CPU")
    num_virtual_tokens: int = option(16, "prompt tuning: number of soft-prompt tokens")
    prompt_init_text: str | None = option("You are a helpful, honest and harmless assistant.",
                                          "prompt tuning: initialise soft prompts from this text's embeddings (null = random)")

    def __post_init__(self) -> None:
        check(self.r > 0, "r", f"must be > 0, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(bool(self.target_modules), "target_modules", "must name at least one module")
        check(self.num_virtual_tokens > 0, "num_virtual_tokens", f"must be > 0, got {self.num_virtual_tokens}")
        check(self.layers is None or len(self.layers) > 0, "layers", "must list at least one layer, or be null for all")


def peft_config(cfg: AdapterConfig, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None) -> Any:
    """A peft config for ``cfg`` (None for full fine-tuning)."""
    if cfg.method == "full":
        return None
    import peft

    if cfg.method in ("lora", "qlora"):
        # layers_pattern: peft's default pattern needs a parent before "layers." and so finds nothing in a
        # bare backbone (the critic's LlamaModel names its modules "layers.0.self_attn...")
        extra = ({"layers_to_transform": list(cfg.layers), "layers_pattern": list(LAYER_PATTERNS)}
                 if cfg.layers is not None else {})
        return peft.LoraConfig(
            task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
            **extra,
        )
    init_text = cfg.prompt_init_text if tokenizer_path else None
    return peft.PromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=peft.PromptTuningInit.TEXT if init_text else peft.PromptTuningInit.RANDOM,
        prompt_tuning_init_text=init_text,
        tokenizer_name_or_path=tokenizer_path if init_text else None,
    )


def quantization_config(cfg: AdapterConfig) -> Any:
    """4-bit NF4 config for QLoRA; a clear error where it cannot run."""
    if cfg.method != "qlora":
        return None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("adapter.method=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use adapter.method=lora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("adapter.method=qlora needs bitsandbytes: pip install 'align-rlhf[qlora]'") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def set_adapter_base(adapter_dir: Path, base_name: str) -> None:
    """Record an adapter's base twice: ``adapter_config.json`` gets a base that plain transformers +
    peft load (``models.portable_base``: the Hub id for ``smollm2-135m``, a real path otherwise), and
    ``align_base.json`` the ``model.name`` it was trained on, which align resolves (offline for the
    built-ins: ``smollm2-135m`` is built from the GGUF file, not downloaded)."""
    import json

    from foundation.models import ALIGN_BASE_FILE, portable_base

    path = Path(adapter_dir) / "adapter_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        data["base_model_name_or_path"] = portable_base(base_name)
        path.write_text(json.dumps(data, indent=2) + "\n")
        (Path(adapter_dir) / ALIGN_BASE_FILE).write_text(json.dumps({"name": base_name}) + "\n")


def merge(adapter: str, out: str | Path, *, dtype: str = "auto") -> Path:
    """Merge a LoRA adapter (folder or stage output) into its base; write a full checkpoint."""
    from foundation.models import load_causal_lm, load_tokenizer, resolve

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it")
    resolved = resolve(adapter)
    if not resolved.adapter:
        raise ValueError(f"{adapter} holds no adapter (no adapter_config.json) - nothing to merge")
    model = load_causal_lm(adapter, dtype=dtype, device="cpu", merge_adapter=True)
    tok = load_tokenizer(adapter)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("merged %s into %s", resolved.adapter, out)
    return out


# -- compact copies of trained adapters ------------------------------------------------------------

PACK_FORMAT = 1
PACK_MANIFEST = "PACKED.json"
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                             "added_tokens.json", "tokenizer.model", "chat_template.jinja"})


def pack_folder(src: Path, out: Path) -> dict:
    """A compact copy of a trained adapter folder (a LoRA policy or reward model) in the new folder ``out``: every
    floating-point tensor of its ``*.safetensors`` in fp16 (half the bytes of fp32), no tokenizer files (they are the
    base model's, restored by :func:`unpack_folder`), every other file as it is, and ``PACKED.json`` with each file's
    SHA-256 and each tensor's trained dtype. For keeping a trained model in a repository or carrying it elsewhere;
    a full model (no ``adapter_config.json``) is refused: it is the size of the model."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from foundation.runs import file_sha256

    src, out = Path(src), Path(out)
    if not (src / "adapter_config.json").is_file():
        raise ValueError(f"{src} holds no adapter (adapter_config.json); only an adapter folder packs")
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    out.mkdir(parents=True)
    dtypes: dict[str, dict[str, str]] = {}
    skip = TOKENIZER_FILES | {"training_args.bin"}  # the trainer's pickled arguments: not needed to load, never unpickled
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.name not in skip):
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            dtypes[f.name] = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
            half = {}
            for k, v in tensors.items():
                if v.is_floating_point() and v.dtype != torch.float16:
                    if v.numel() and v.abs().max().item() > torch.finfo(torch.float16).max:
                        raise ValueError(f"{f}: {k} does not fit fp16; it cannot be packed")
                    v = v.to(torch.float16)
                half[k] = v.contiguous()
            save_file(half, str(out / f.name))
        else:
            shutil.copy2(f, out / f.name)
    manifest = {"format": PACK_FORMAT, "weights": "float16", "dtypes": dtypes,
                "sha256": {p.name: file_sha256(p) for p in sorted(out.iterdir())}}
    (out / PACK_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack_folder(packed: Path, out: Path) -> None:
    """Restore a folder written by :func:`pack_folder` into the new folder ``out`` (written aside and renamed, so a
    killed restore leaves no half folder that looks whole): every file checked against its
    SHA-256 first (a damaged pack is refused naming the file), tensors back in their trained dtype (the fp16 rounding
    stays), the tokenizer saved from the adapter's base model (``align_base.json``, else ``adapter_config.json``)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from foundation.models import ALIGN_BASE_FILE, load_tokenizer
    from foundation.runs import file_sha256

    packed, out = Path(packed), Path(out)
    if not (packed / PACK_MANIFEST).is_file():
        raise FileNotFoundError(f"{packed} is not a packed adapter (no {PACK_MANIFEST})")
    manifest = json.loads((packed / PACK_MANIFEST).read_text())
    if manifest.get("format") != PACK_FORMAT:
        raise ValueError(f"{packed / PACK_MANIFEST}: format {manifest.get('format')!r}; this version reads {PACK_FORMAT}")
    for name, digest in manifest["sha256"].items():
        if not (packed / name).is_file():
            raise FileNotFoundError(f"{packed / name} is missing from the pack")
        if file_sha256(packed / name) != digest:
            raise ValueError(f"{packed / name} does not match its SHA-256 in {PACK_MANIFEST}: the pack is damaged")
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    final, out = out, out.with_name(f".{out.name}.unpacking")  # written aside, renamed when whole
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in manifest["sha256"]:
        if name in manifest["dtypes"]:
            dtypes = manifest["dtypes"][name]
            save_file({k: v.to(getattr(torch, dtypes[k])).contiguous() for k, v in load_file(packed / name).items()},
                      str(out / name))
        else:
            shutil.copy2(packed / name, out / name)
    base_file = out / ALIGN_BASE_FILE
    base = (json.loads(base_file.read_text())["name"] if base_file.is_file()
            else json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    load_tokenizer(base).save_pretrained(out)
    out.rename(final)
