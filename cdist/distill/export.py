"""A trained run as a checkpoint of its own: ``trained_student`` and ``export_run``.

A run folder (``cdist.distill.loop``) keeps what training changed, not the model: its ``state.pt``
holds a circuit arm's per-head deltas (``HeadDelta``) or, when every weight trained, the whole
student's weights, beside the run's settings and the fingerprint of the student it started from
(``cdist.store.model_fingerprint``). The export puts the trained weights back on that base student
the way the run's end did (``Run.keep``: base + delta, written into the heads' slices) and writes a
transformers ``LlamaForCausalLM`` folder with the student's tokenizer (``cdist.models.save_llama``),
which transformers and ``cdist.models.load_llama`` read with no run folder and no cdist.

Our choices:
- The base student is the caller's, and it must be the one the run started from: its fingerprint
  is compared with the state's before anything is written, so trained slices are never put on
  another model. A run on a GPU loads its student in bfloat16, so a float32 base whose fingerprint
  differs is compared again as bfloat16 and float16, and cast to the one that fits (what the run
  trained; a bfloat16 checkpoint loaded as float32 casts back exactly).
- An unfinished run (a checkpoint before its last step) is refused: its weights are not the run's
  result. Finish it with the same ``cdist distill`` command first.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from cdist import models
from cdist.checkpoints import check_replaceable
from cdist.distill.config import DistillConfig
from cdist.distill.params import trained_parameters, training_weights
from cdist.errors import (
    FileFormatError,
    InputError,
    MismatchError,
    MissingFileError,
    RunFolderError,
)
from cdist.models import HookedTransformer
from cdist.store import model_fingerprint
from cdist.types import Head

__all__ = ["STATE", "check_output", "export_run", "read_state", "state_path", "trained_student"]

STATE = "state.pt"
_KEYS = ("config", "weights", "step", "identity")
_WHERE = "a trained run's folder is OUT/runs/n<items>/<arm>-seed<seed> under a cdist run folder"


def state_path(run_dir: str | Path) -> Path:
    """The run's ``state.pt``, refused (``MissingFileError``) where ``run_dir`` holds none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"{run_dir} is not a folder; {_WHERE}")
    if not (run_dir / STATE).is_file():
        raise MissingFileError(f"{run_dir} holds no {STATE}, so it is not a trained run; {_WHERE}")
    return run_dir / STATE


def read_state(run_dir: str | Path) -> dict:
    """The run's ``state.pt`` (``Run.save``), checked to hold a run.

    Args:
        run_dir: a trained run's folder.

    Returns:
        ``{"config", "weights", "step", "identity", ...}`` on the CPU.
    """
    path = state_path(run_dir)
    fix = "it is damaged or not a cdist run's; train that run again"
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch.load's unpickling errors have no one type
        raise FileFormatError(f"{path} cannot be read ({type(err).__name__}); {fix}") from None
    lacks = [k for k in _KEYS if not isinstance(state, dict) or k not in state]
    if lacks:
        raise FileFormatError(f"{path} is not a cdist run's checkpoint (it lacks {lacks}); {fix}")
    if not isinstance(state["identity"].get("student"), str):
        raise FileFormatError(f"{path} was saved by an earlier cdist, without the fingerprint of "
                              "its student, so its base cannot be checked; train that run again")
    return state


def _config(state: dict, path: Path) -> DistillConfig:
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(state["config"]) - known)
    if unknown:
        raise FileFormatError(f"{path}'s settings {unknown} are not this cdist's; export it with "
                              "the cdist that trained it")
    return DistillConfig(**state["config"])


class _AsDtype(torch.nn.Module):
    """A model's parameters as another dtype, for ``model_fingerprint`` (the model itself is left
    as it is). ``via`` adds the float32 upcast a run of every weight fingerprints in
    (``training_weights``)."""

    def __init__(self, model: HookedTransformer, dtype: torch.dtype, via: torch.dtype | None):
        super().__init__()
        self.source = [model]  # a list, so that the model is not registered as a submodule
        self.dtype, self.via = dtype, via

    def named_parameters(self, *args, **kwargs):
        for name, p in self.source[0].named_parameters(*args, **kwargs):
            cast = p.detach().to(self.dtype)
            yield name, cast.to(self.via) if self.via is not None else cast


def _fit_base(student: HookedTransformer, cfg: DistillConfig, expected: str, where: Path) -> None:
    """Check that ``student`` is the run's base (its fingerprint as the run took it, inside
    ``training_weights``), casting a float32 student to the half dtype the run had if that is
    what fits; ``MismatchError`` when none does."""
    with training_weights(student, cfg):
        if model_fingerprint(student) == expected:
            return
    own = next(student.parameters()).dtype
    if own == torch.float32:
        via = torch.float32 if cfg.trainable == "all" else None
        for dtype in (torch.bfloat16, torch.float16):
            if model_fingerprint(_AsDtype(student, dtype, via)) == expected:
                models.cast(student, dtype)
                return
    raise MismatchError(f"{where} was not trained from this student (its fingerprint differs "
                        "from the one the run recorded); give the student the run started from")


def trained_student(student: HookedTransformer, run_dir: str | Path) -> HookedTransformer:
    """The run's trained student: its saved weights put on ``student``, as the run left it.

    Args:
        student: the base student the run was trained from (e.g. ``cdist.models.load_llama`` of
            the checkpoint, or ``cdist.zoo.load``); it changes in place, as ``distill``'s does.
        run_dir: a finished run's folder (holding ``state.pt``).

    Returns:
        ``student``, now with the run's weights: for a circuit arm only the trained heads' slices
        differ from before; its parameters' ``requires_grad`` flags are as they were.

    Warning:
        A run that trained every weight saved them in float32 (``training_weights``); they are
        kept in float32 on a float32 student, although the run's own student, if it was loaded in
        bfloat16, was rounded back to it.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    cfg = _config(state, run_dir / STATE)
    if state["step"] < cfg.steps:
        raise InputError(f"{run_dir} holds an unfinished run (step {state['step']} of "
                         f"{cfg.steps}); finish it with the command that started it, then export")
    _fit_base(student, cfg, state["identity"]["student"], run_dir)
    heads = [Head.parse(h) for h in state["identity"].get("heads") or []]
    with training_weights(student, cfg):
        delta, _ = trained_parameters(student, cfg, heads)
        try:
            (delta if delta is not None else student).load_state_dict(state["weights"])
        except RuntimeError as err:  # names or shapes: the message lists them, over many lines
            first = str(err).strip().splitlines()
            raise FileFormatError(f"{run_dir / STATE}'s weights do not fit its base student "
                                  f"({first[-1].strip() if first else 'load_state_dict'})"
                                  ) from None
        if delta is not None:
            delta.keep(student)
    return student


def check_output(out_dir: str | Path) -> Path:
    """``out_dir``, refused (``RunFolderError``) unless ``save_llama`` may write it: new, empty,
    or a checkpoint cdist wrote that holds nothing else (``cdist.checkpoints.check_replaceable``).
    """
    return check_replaceable(out_dir)


def export_run(run_dir: str | Path, student: HookedTransformer, out_dir: str | Path) -> Path:
    """Write a trained run as a transformers ``LlamaForCausalLM`` folder (module doc).

    Args:
        run_dir: a finished run's folder (``OUT/runs/n<items>/<arm>-seed<seed>``).
        student: the base student it was trained from (changes in place: ``trained_student``).
        out_dir: the checkpoint folder: new, empty, or an earlier checkpoint of cdist's that
            holds nothing else (replaced atomically); any other existing folder is refused
            (``RunFolderError``) before anything is loaded, so no file of the user's is lost.

    Returns:
        ``out_dir``, holding ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    out_dir = check_output(out_dir)
    if out_dir.resolve() == Path(run_dir).resolve():
        raise RunFolderError(f"{out_dir} is the run's own folder; give a new folder")
    return models.save_llama(trained_student(student, run_dir), out_dir)
