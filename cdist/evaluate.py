"""Task accuracy: does the model put its top logit on the answer token at the last prompt position?

Prompts of one dataset may differ in length (theory-of-mind stories with and without a visibility
sentence), so batches are right-padded. Under causal attention a pad token to the right of
``pos_last`` cannot change the logits at ``pos_last``, so no attention mask is needed; the logits
are read at each row's own ``pos_last``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cdist.errors import InputError
from cdist.models import HookedTransformer, unembed

Batch = dict[str, Tensor]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Int[Tensor, "batch pos"]:
    """Stack token-id lists into one tensor, right-padded with ``pad_id``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def pad_id(model: torch.nn.Module) -> int:
    """The id used for right padding: the tokenizer's pad id, else 0.

    Any id works, since pads sit right of every position read and causal attention never looks
    right; the tokenizer's own pad id keeps decoded batches readable.
    """
    tokenizer = getattr(model, "tokenizer", None)
    has_pad = tokenizer is not None and tokenizer.pad_token_id is not None
    return tokenizer.pad_token_id if has_pad else 0


def batches(data, batch_size: int, pad: int, columns: Sequence[str] = (), *,
            corrupt: bool = False) -> Iterator[Batch]:
    """Right-padded ``input_ids`` plus ``length``, ``answer_id``, ``pos_last`` and integer
    ``columns``, in order.

    With ``corrupt``, also ``corrupt_input_ids`` padded to the same width; each item's clean and
    corrupt prompts must have the same length, since patching moves activations between them
    position by position.
    """
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        out = {
            "input_ids": pad_right(rows["input_ids"], pad),
            "length": torch.as_tensor([len(r) for r in rows["input_ids"]]),
        }
        if corrupt:
            if "corrupt_input_ids" not in rows:
                raise InputError("patching needs a corrupt_input_ids column; build the data with "
                                 "cdist.tasks")
            pairs = zip(rows["input_ids"], rows["corrupt_input_ids"], strict=True)
            for i, (a, b) in enumerate(pairs):
                if len(a) != len(b):
                    raise InputError(f"item {start + i}: clean and corrupt prompts have {len(a)} "
                                     f"and {len(b)} tokens; patching needs them aligned token for "
                                     "token (same template)")
            out["corrupt_input_ids"] = pad_right(rows["corrupt_input_ids"], pad)
        for name in {"answer_id", "pos_last", *columns}:
            out[name] = torch.as_tensor(rows[name], dtype=torch.long)
        yield out


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def answer_stats(
    logits: Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch d_vocab"],
    answer_id: Int[Tensor, " batch"],
    pos: Int[Tensor, " batch"] | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """(probability of the answer, 1.0 where it is the top-1 token), read at each row's ``pos``;
    float64, CPU.

    ``pos=None`` means the logits are already one row per example (``[batch, d_vocab]``). The
    softmax runs in float32 even for a bfloat16 model.
    """
    last = (logits if pos is None else logits_at(logits, pos)).float()
    answer = answer_id.to(last.device)[:, None]
    prob = last.log_softmax(-1).gather(-1, answer)[:, 0].exp()
    correct = (last.argmax(-1) == answer[:, 0]).float()
    return prob.double().cpu(), correct.double().cpu()


def logits_at(logits: Float[Tensor, "batch pos d_vocab"],
              pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
    """Each row's logits at its own position."""
    return logits[torch.arange(logits.shape[0], device=logits.device), pos.to(logits.device)]


def last_logits(model: torch.nn.Module, input_ids: Int[Tensor, "batch pos"],
                pos: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
    """Each row's logits at its own position. A HookedTransformer unembeds those positions only
    (with a large vocabulary the unembedding is a sizeable share of a small model's forward pass);
    any other model is called as ``model(input_ids) -> logits``. Hooks the caller has added run as
    in a full forward pass."""
    ids = input_ids.to(device_of(model))
    if not isinstance(model, HookedTransformer):
        return logits_at(model(ids), pos)
    return unembed(model, logits_at(model(ids, stop_at_layer=model.cfg.n_layers), pos))


@torch.no_grad()
def predictions(model: torch.nn.Module, data, *, batch_size: int = 64) -> Int[Tensor, " n"]:
    """The model's top-1 token at ``pos_last`` for every item of a task dataset."""
    preds = []
    for batch in batches(data, batch_size, pad_id(model)):
        preds.append(last_logits(model, batch["input_ids"], batch["pos_last"]).argmax(-1).cpu())
    return torch.cat(preds)


def accuracy(model: torch.nn.Module, data, *, batch_size: int = 64) -> float:
    """Share of items whose top-1 prediction at ``pos_last`` is ``answer_id``.

    Args:
        model: a HookedTransformer (anything called as ``model(input_ids) -> logits``).
        data: a task dataset with ``input_ids``, ``answer_id`` and ``pos_last`` columns.
        batch_size: prompts per forward pass.

    Returns:
        Accuracy in [0, 1].
    """
    if len(data) == 0:
        raise InputError("accuracy needs at least one item; the dataset is empty")
    correct = predictions(model, data, batch_size=batch_size) == torch.as_tensor(data["answer_id"])
    return correct.float().mean().item()
