"""Loading the policy, the reference and the tokenizer; dtype and device.

A model comes from the Hugging Face hub or a local folder (`model.name_or_path`), or is built
with random weights from `model.config` (the tiny default). The built-in `char` tokenizer is
made offline from printable ASCII, so the default run needs no download.
"""

from __future__ import annotations

import contextlib
import copy
import os
import string
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

CHAR_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# A plain chat template for the char tokenizer: one block per message, EOS after each.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, BOS prepended, EOS/PAD/UNK specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAR_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    name = model_cfg.tokenizer or model_cfg.name_or_path or "char"
    if name == "char":
        tokenizer = char_tokenizer()
    else:
        key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
        with _naming_errors(key, name):
            tokenizer = AutoTokenizer.from_pretrained(
                name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer '{name}' has no EOS token; every response must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out, any id will do
    return tokenizer


@contextlib.contextmanager
def _naming_errors(key: str, name: str):
    """Loading errors say which config key named what could not be loaded."""
    try:
        yield
    except OSError as e:
        where = "local folder" if os.path.isdir(name) else "Hugging Face hub name (or a local folder)"
        raise OSError(f"config key '{key}' = {name!r}: cannot load it as a {where}: {e}") from e


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config key 'train.device' = {device!r}, but CUDA is not available here")
    return torch.device(device)


def load_policy(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                prepare_base=None) -> PreTrainedModel:
    """The trainable model, in train mode with dropout off, on the CPU. `prepare_base(model)`,
    when given, runs on the base model before any LoRA adapters are added (the SFT stage)."""
    dtype = _dtype(model_cfg.dtype)
    extra = {}
    if model_cfg.attn_implementation:
        extra["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.name_or_path is None:  # build from model.config (checked by config.validate)
        arch = OmegaConf.to_container(model_cfg.config, resolve=True)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        arch.setdefault("bos_token_id", tokenizer.bos_token_id)
        arch.setdefault("eos_token_id", tokenizer.eos_token_id)
        arch.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **arch)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the same seed gives the same initial weights
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **extra)
    else:
        with _naming_errors("model.name_or_path", model_cfg.name_or_path):
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path,
                revision=model_cfg.revision,
                trust_remote_code=model_cfg.trust_remote_code,
                dtype=dtype or "auto",
                **extra,
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    if prepare_base is not None:
        prepare_base(model)
    if model_cfg.lora.enabled:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the same seed gives the same initial adapters
            model = apply_lora(model, model_cfg.lora)
    model.train()
    return model


def apply_lora(model: PreTrainedModel, lora_cfg: DictConfig) -> PreTrainedModel:
    """Wrap the model with trainable LoRA adapters (PEFT); the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("model.lora.enabled=true needs PEFT: pip install 'dpo-sweep[lora]'") from e
    targets = lora_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str, merge: bool,
               state_dict: Optional[dict] = None) -> None:
    """Hugging Face format; a LoRA model saves its adapter, or the merged weights when `merge`.
    `state_dict`: the gathered weights of a sharded (FSDP) model."""
    if is_lora(model) and merge:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)


def configure_training(model: PreTrainedModel, gradient_checkpointing: bool, compile: bool) -> None:
    """Memory and speed options of the trainable model (train.gradient_checkpointing, train.compile)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        decoder.compile(dynamic=True)  # batch shapes vary with length grouping


def make_reference(policy: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of the policy: eval mode, no gradients."""
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two models: dropout noise would bias the rewards."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def _dtype(name: str) -> Optional[torch.dtype]:
    return None if name == "auto" else DTYPES[name]
