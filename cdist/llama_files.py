"""Where a Llama checkpoint's config, tokenizer and tensors come from, read one tensor at a time.

A source is a transformers checkpoint directory (``config.json``, ``*.safetensors``, sharded or
not, tokenizer files), an official Llama-3 name already in the local Hugging Face cache, or a
``.gguf`` file (llama.cpp's format, as shipped by many packages), whose quantized tensors are
dequantized with transformers' GGUF support (the ``gguf`` package). Nothing here touches the
network or TransformerLens; ``cdist.models.load_llama`` turns what this module yields into a
HookedTransformer.

Why tensors come one at a time: a checkpoint read whole next to the model it fills doubles the peak
memory (a Llama-3.1-8B is 16 GB in bf16). ``safetensors.safe_open`` memory-maps the file, and every
page it reads stays resident until the file is closed, which is the same doubling in another form;
so safetensors files are read here with plain ``readinto`` calls into one fresh tensor at a time.
GGUF files are dequantized by transformers as one dict (the file itself is mapped, but it is a
quantized fraction of the model's size); its entries are handed out and dropped one by one.

What is checked before a checkpoint is used (``open_llama``, ``LlamaSource.check``; every weight
is also checked finite as it is loaded, ``cdist.models.load_llama``):
- every file in a checkpoint folder (or the ``.gguf`` itself) is a regular file: a named pipe, a
  device or a socket is refused from its ``stat``, before anything opens it (a pipe would block);
- the weights are exactly the files an index names, or else the one ``*.safetensors`` file; two
  candidates (``model.safetensors`` beside a stale ``model_old.safetensors``) are refused, naming
  both, rather than one read over the other;
- the config is one transformers accepts, and its attention layout is whole: the key/value heads
  divide the heads, and without an explicit ``head_dim`` the heads divide ``hidden_size``;
- every weight of the config is there with the config's shape, and a checkpoint cdist wrote
  (``save_llama`` records the attention layout in its safetensors metadata) has the layout it was
  saved with. What is not detectable: a config that regroups the same weights into other heads
  with every shape unchanged (8 heads of 16 as 4 heads of 32, say) in a checkpoint that does not
  record its layout (transformers' own): Llama has no per-head tensor (no q/k norm, rotary has no
  weights), so only the config says where one head ends;
- a GGUF file whose metadata is cut short is refused in one line.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from cdist.errors import FileFormatError, InputError, MissingFileError

__all__ = [
    "ATTENTION_KEY",
    "OFFICIAL_LLAMA3",
    "SPECIAL_TOKEN_FIELDS",
    "CheckpointNotFoundError",
    "LlamaSource",
    "attention_layout",
    "check_regular",
    "open_llama",
    "resolve_checkpoint",
    "safetensors_header",
]

OFFICIAL_LLAMA3 = tuple(
    f"{name}{suffix}"
    for name in ("Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.1-8B", "Meta-Llama-3-8B")
    for suffix in ("", "-Instruct")
)
# The config's token ids, kept from load to save so that a round trip writes them back unchanged.
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")

# The attention layout save_llama records in a safetensors file's metadata (attention_layout), the
# one record of where a head ends that a config's edit cannot change
ATTENTION_KEY = "cdist_attention"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointNotFoundError(MissingFileError):
    """No Llama checkpoint where we looked; the message says where, in one line."""


_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular(path: Path) -> None:
    """Refuse (``FileFormatError``) ``path``, or any entry of the folder ``path``, that is a
    named pipe, a device or a socket, from its ``stat`` alone: opening a pipe to read it blocks
    until something writes to it, and a device never ends. Links are followed; a broken one is
    left to the reader that needs it."""
    for entry in ([path, *path.iterdir()] if path.is_dir() else [path]):
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        kind = next((name for test, name in _SPECIAL if test(mode)), None)
        if kind is not None:
            raise FileFormatError(f"{entry} is {kind}, not a file; a checkpoint is read from "
                                  "regular files: put the file itself there")


def resolve_checkpoint(source: str | Path) -> Path:
    """The local checkpoint of ``source``: a directory or ``.gguf`` file itself, or an official
    name in the HF cache.

    Official names are those of ``OFFICIAL_LLAMA3``, written "meta-llama/Llama-3.2-1B",
    "Llama-3.2-1B" or "3.2-1B" (case-insensitive). The cache is ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; the snapshot named by ``refs/main`` wins,
    else the newest one.

    Raises:
        CheckpointNotFoundError: one line saying where it looked.
    """
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.exists():
        check_regular(path)
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    aliases = {}
    for name in OFFICIAL_LLAMA3:
        for alias in (name, f"meta-llama/{name}", name.split("Llama-", 1)[1]):
            aliases[alias.lower()] = name
    name = aliases.get(str(source).lower())
    if name is None:
        raise CheckpointNotFoundError(
            f"no checkpoint directory or .gguf file at {path}; pass a local Llama directory "
            f"(config.json, *.safetensors), a .gguf file, or one of {', '.join(OFFICIAL_LLAMA3)} "
            "present in the Hugging Face cache"
        )
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]) / "hub"
    else:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    repo = cache.expanduser() / f"models--meta-llama--{name}"
    snapshots = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    if not snapshots:
        raise CheckpointNotFoundError(
            f"{name} is not in the Hugging Face cache (looked in {repo / 'snapshots'}); "
            f"cdist never downloads: copy the checkpoint there or pass its local directory"
        )
    return max(snapshots, key=lambda p: p.stat().st_mtime)


def _safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"].values()
            shards = sorted({ckpt / f for f in names})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise FileFormatError(f"{index} is not a safetensors index ({type(err).__name__}: "
                                  f"{err}); restore the checkpoint's index file") from None
        absent = [f.name for f in shards if not f.is_file()]
        if absent:
            raise CheckpointNotFoundError(f"{index} names {absent[0]}, which is not in {ckpt}; "
                                          "copy every shard of the checkpoint")
        return shards
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointNotFoundError(
            f"no *.safetensors in {ckpt}; cdist reads safetensors only "
            "(re-save with safe_serialization=True)"
        )
    if len(files) > 1:  # without an index, which one holds the weights is a guess
        raise FileFormatError(f"{ckpt} holds {len(files)} weight files and no index naming them "
                              f"({', '.join(f.name for f in files[:3])}); move all but the "
                              "checkpoint's own out of the folder")
    return files


def safetensors_header(file: Path) -> tuple[int, dict[str, dict], dict[str, str]]:
    """A safetensors file's header length, its entries (name -> dtype, shape, offsets) and its
    metadata, checked against the file's size, so that a damaged file is named before any tensor
    is read.

    Raises:
        FileFormatError: not a safetensors file, an unknown dtype, or data past the end (truncated).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        try:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:  # also spares reading a garbled length's petabytes
                raise InputError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
            metadata = header.pop("__metadata__", None) or {}
            for info in header.values():
                start, end = info["data_offsets"]
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise InputError(f"dtype {info['dtype']} (cdist reads "
                                     f"{', '.join(_SAFETENSORS_DTYPES)})")
                if not 0 <= start <= end or any(not isinstance(n, int) or n < 0
                                                for n in info["shape"]):
                    raise InputError(f"offsets {start}..{end}, shape {info['shape']}")
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as err:
            raise FileFormatError(f"{file} is not a readable safetensors file ({err}); re-save or "
                                  "re-download it") from None
    for name, info in header.items():
        if 8 + length + info["data_offsets"][1] > size:
            raise FileFormatError(f"{file} is truncated: {name} ends past the end of the file; "
                                  "re-save or re-download it")
    return length, header, metadata if isinstance(metadata, dict) else {}


def read_safetensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """A safetensors file's tensors in file order, each read into its own fresh CPU tensor (no
    memory map, so nothing read stays resident once the caller drops it)."""
    length, header, _ = safetensors_header(file)
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            if end > start:
                f.seek(8 + length + start)
                if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise FileFormatError(f"{file} changed while it was read: {name} ends past "
                                          "the end of the file")
            yield name, tensor


@dataclass(frozen=True)
class LlamaSource:
    """An opened checkpoint: its config (with the file's special-token ids), its tokenizer, and
    its tensors on demand."""

    path: Path
    hf_config: LlamaConfig

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def special_token_ids(self) -> dict:
        return {f: getattr(self.hf_config, f, None) for f in SPECIAL_TOKEN_FIELDS}

    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The checkpoint's own tokenizer, unchanged (None when a directory has no tokenizer
        files)."""
        if self.is_gguf:
            return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        if any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exception
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise FileFormatError(f"{self.path}'s tokenizer files cannot be read "
                                      f"({type(err).__name__}: {first}); restore tokenizer.json "
                                      "and tokenizer_config.json") from None
        return None

    def check(self) -> None:
        """Refuse, from the files' headers alone (no tensor is read), a checkpoint whose weights
        do not fill its config's Llama: a missing shard, a damaged or truncated file, a missing
        weight or one of another shape. A GGUF file is checked as it is read.

        Raises:
            CheckpointNotFoundError, FileFormatError: naming the file and the fix.
        """
        if self.is_gguf:
            return
        from transformers import LlamaForCausalLM

        found, recorded = {}, None
        for file in _safetensors_files(self.path):
            _, header, metadata = safetensors_header(file)
            found |= {k: tuple(v["shape"]) for k, v in header.items()}
            recorded = recorded or metadata.get(ATTENTION_KEY)
        if recorded is not None and recorded != attention_layout(self.hf_config):
            raise FileFormatError(f"{self.path}: config.json makes the attention "
                                  f"{attention_layout(self.hf_config)}, but its weights were saved "
                                  f"as {recorded}; pass the config the weights were saved with")
        with torch.device("meta"):  # the config's shapes, with no memory behind them
            skeleton = LlamaForCausalLM(self.hf_config)
        wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        if self.hf_config.tie_word_embeddings:
            wanted.pop("lm_head.weight", None)
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise FileFormatError(f"{self.path} lacks {len(missing)} weights of its config.json, "
                                  f"e.g. {missing[0]}; is the checkpoint complete?")
        for name, shape in wanted.items():
            if found[name] != shape:
                raise FileFormatError(f"{self.path}: {name} has shape {found[name]}, but "
                                      f"config.json makes it {shape}; pass the config the "
                                      "weights were saved with")

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        """``(transformers name, tensor in dtype)`` pairs, one resident at a time (CPU)."""
        if not self.is_gguf:
            for file in _safetensors_files(self.path):
                for name, tensor in read_safetensors(file):
                    yield name, tensor.to(dtype)
            return
        from transformers import LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # The GGUF -> transformers name map is read off a model; an empty one on "meta" costs
        # nothing.
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(self.hf_config)
        tensors = load_gguf_checkpoint(
            str(self.path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype
        )["tensors"]
        while tensors:
            name = next(iter(tensors))
            yield name, tensors.pop(name).to(dtype)


def attention_layout(hf_config: LlamaConfig) -> str:
    """The config's attention layout in words, as ``save_llama`` records it: "8 heads of 16, 4
    key/value heads"."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return (f"{heads} heads of {head_dim}, {hf_config.num_key_value_heads or heads} key/value "
            "heads")


def _first_line(err: BaseException) -> str:
    """An error's message in one line: its last non-empty line, where libraries put the cause
    (transformers' validators open with a heading), else its type's name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _check_attention(config: dict, where: Path) -> None:
    """Refuse an attention layout that cannot be whole (module doc): key/value heads that do not
    divide the heads, or heads that do not divide ``hidden_size`` when no ``head_dim`` says how
    wide one is."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    kv = config.get("num_key_value_heads") or heads
    if not all(isinstance(n, int) and n > 0 for n in (heads, hidden, kv)):
        return  # transformers' own checks name these
    if heads % kv:
        raise FileFormatError(f"{where}: num_key_value_heads = {kv} does not divide "
                              f"num_attention_heads = {heads} (each key/value head serves a "
                              "whole group of heads); pass the config the weights were saved with")
    if config.get("head_dim") is None and hidden % heads:
        raise FileFormatError(f"{where}: hidden_size = {hidden} is not a multiple of "
                              f"num_attention_heads = {heads}, and no head_dim says how wide a "
                              "head is; pass the config the weights were saved with")


def open_llama(source: str | Path) -> LlamaSource:
    """Open a Llama checkpoint (see ``resolve_checkpoint``) and read its config.

    Raises:
        CheckpointNotFoundError: nothing there, or no ``config.json`` in the directory.
        ValueError: the checkpoint is not a Llama (names the file and its model type).
    """
    path = resolve_checkpoint(source)
    if path.suffix == ".gguf":
        where = path
        try:
            config_dict, _ = LlamaConfig.get_config_dict(path.parent, gguf_file=path.name)
        # an unsupported or unreadable GGUF; one cut inside its metadata fails in the gguf
        # reader's unpacking (struct.error, IndexError)
        except (ValueError, KeyError, OSError, IndexError, struct.error) as err:
            raise FileFormatError(f"{path} is not a GGUF file transformers can read (cut short or "
                                  f"damaged?): {_first_line(err)}; re-download it") from None
    else:
        check_regular(path)
        where = path / "config.json"
        if not where.is_file():
            raise CheckpointNotFoundError(
                f"no config.json in {path}; pass a transformers Llama checkpoint folder"
            )
        try:
            config_dict = json.loads(where.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise FileFormatError(f"{where} is not valid JSON ({err}); restore the checkpoint's "
                                  "config.json") from None
        if not isinstance(config_dict, dict):
            raise FileFormatError(f"{where} holds no JSON object; restore the checkpoint's "
                                  "config.json")
    if config_dict.get("model_type") != "llama":
        raise FileFormatError(
            f"{where} has model_type={config_dict.get('model_type')!r}; cdist loads 'llama' only"
            " (a Llama-architecture checkpoint)"
        )
    _check_attention(config_dict, where)
    # from the dict already read: parsing a GGUF file's metadata again is slow
    try:
        hf_config = LlamaConfig.from_dict(config_dict)
    # transformers' own checks (an odd head_dim for rope), through huggingface_hub's validators
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise FileFormatError(f"{where} is not a config transformers accepts: "
                              f"{_first_line(err)}; pass the config the weights were saved with"
                              ) from None
    # A GGUF's tensors come out dequantized, as plain floats: nothing of its quantization is kept.
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return LlamaSource(path, hf_config)
