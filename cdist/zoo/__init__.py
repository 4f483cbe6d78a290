"""The model-organism zoo: the project's own small Llama-architecture teachers and students.

Each zoo model is a plain Hugging Face ``LlamaForCausalLM`` directory (config.json,
model.safetensors, tokenizer files) plus a ``manifest.json`` saying how it was made (config, seed,
steps, wall time, commit) and its held-out accuracies. Because the zoo is stored in the same format
as a real Llama-3 checkpoint, it is loaded by the very code path that loads one
(``cdist.models.load_llama``).

The zoo lives in ``zoo/`` at the repository root; set ``CDIST_ZOO`` to use another folder. The
models are trained by ``experiments/zoo.py`` from the configs in ``ZOO_CONFIGS``, with the training
loop of ``cdist.zoo.organisms``; this package is the catalog (configs, storage, loading).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import LlamaForCausalLM

from cdist import tasks
from cdist.checkpoints import atomic_directory, atomic_write_json, read_json
from cdist.errors import MissingFileError
from cdist.models import HookedTransformer, load_llama, save_llama
from cdist.tokenizers import word_tokenizer
from cdist.zoo.organisms import OrganismConfig

ET_STUDENT_WINDOW = (0.45, 0.70)
# Theory of mind: always answering "unknown" scores 5/12 = 0.42; a warm student must beat that.
TOM_STUDENT_WINDOW = (0.55, 0.75)

# Teachers are bigger; students are smaller (fewer layers or a smaller width) with at least 32 heads
# (enough for a circuit search to choose from). Entity tracking grows its boxes from 2 to 7; theory
# of mind mixes two-box entity tracking into training (see cdist.zoo.organism_data). Entity-tracking
# organisms use the adjacent form (" apple F , pen Q . F" -> "apple"), whose lookup small models
# learn readily; on the compact form, where the answer sits at an offset from its label, they tend
# to stay at chance on even two boxes.
#
# Trained on one task alone, an organism spreads the answer over every head of a layer, so no
# circuit of a small share of its heads is faithful. Real models hold many tasks and a task's
# circuit is a few heads; the concave head-output penalty (cdist.zoo.organisms.HeadOutputPenalty)
# makes the organisms alike:
# - et-teacher trains with it from scratch (weight HEAD_SPARSITY).
# - A theory-of-mind teacher trained with it from scratch did not leave the always-"unknown"
#   plateau, so the penalty-free tom-teacher-dense is trained first and fine-tuned with the
#   penalty on in two stages (tom-teacher-stage1, then tom-teacher).
# - A student must be warm *and* sparse, and no penalty did both from scratch: a student's warm
#   stretch comes before its heads thin out, and by then it has learnt the task. So a "-dense"
#   student is stopped early while warm (held-out accuracy checked every 25 steps inside the window,
#   then confirmed on other items), and the student is that model consolidated: trained with the
#   penalty to reproduce its dense self's answer distribution (self-distillation, as head pruning
#   with distillation does), which keeps its warmth while the penalty silences most heads. Its
#   labels are never seen, so it cannot learn the task further.
HEAD_SPARSITY = 0.05
# et-student-dense's circuit as path patching finds it: consolidation spares these heads, so the
# student keeps its own nascent circuit rather than spreading it again over more heads.
ET_STUDENT_DENSE_CIRCUIT = ("a0.h4", "a0.h13", "a1.h0", "a1.h14")
_ET_TEACHER = dict(n_layers=2, d_model=128, n_heads=8, n_kv_heads=4, d_mlp=512)
_ET_STUDENT = dict(n_layers=2, d_model=96, n_heads=16, n_kv_heads=4, d_mlp=384)
_TOM_TEACHER = dict(n_layers=3, d_model=128, n_heads=8, n_kv_heads=4, d_mlp=512)
# Three layers of width 96: a wider two-layer student stayed at a trivial baseline.
_TOM_STUDENT = dict(n_layers=3, d_model=96, n_heads=12, n_kv_heads=4, d_mlp=384)
# Fine-tuning from a trained organism: all boxes from the start, a short warm-up, the penalty on.
_FINE_TUNE = dict(curriculum_start=None, warmup=50, eval_every=250)
ZOO_CONFIGS: dict[str, OrganismConfig] = {
    "et-teacher": OrganismConfig(
        name="et-teacher", task="entity_tracking", template="adjacent", **_ET_TEACHER, steps=4_000,
        seed=0, head_sparsity=HEAD_SPARSITY,
    ),
    "et-student-dense": OrganismConfig(
        name="et-student-dense", task="entity_tracking", template="adjacent", **_ET_STUDENT,
        steps=6_000, stop_window=ET_STUDENT_WINDOW, eval_every=25, seed=2,
    ),
    "et-student": OrganismConfig(
        name="et-student", task="entity_tracking", template="adjacent", **_ET_STUDENT, steps=3_000,
        seed=2, init_from="et-student-dense", self_distill=True, head_sparsity=0.5,
        free_heads=ET_STUDENT_DENSE_CIRCUIT, **_FINE_TUNE,
    ),
    "tom-teacher-dense": OrganismConfig(
        name="tom-teacher-dense", task="theory_of_mind", **_TOM_TEACHER, steps=20_000,
        warmup_templates=("adjacent",), seed=3,
    ),
    "tom-teacher-stage1": OrganismConfig(
        name="tom-teacher-stage1", task="theory_of_mind", **_TOM_TEACHER, steps=6_000,
        warmup_templates=("adjacent",), seed=3, init_from="tom-teacher-dense", head_sparsity=1.0,
        head_sparsity_ramp=3_000, **_FINE_TUNE,
    ),
    # A second stage with a stronger penalty, so that a circuit of a fifth of the heads keeps
    # more of the teacher's accuracy than stage 1's does.
    "tom-teacher": OrganismConfig(
        name="tom-teacher", task="theory_of_mind", **_TOM_TEACHER, steps=3_000,
        warmup_templates=("adjacent",), seed=3, init_from="tom-teacher-stage1", head_sparsity=1.5,
        **_FINE_TUNE,
    ),
    "tom-student-dense": OrganismConfig(
        name="tom-student-dense", task="theory_of_mind", **_TOM_STUDENT, steps=40_000,
        warmup_templates=("adjacent",), stop_window=TOM_STUDENT_WINDOW, eval_every=25, seed=4,
    ),
    "tom-student": OrganismConfig(
        name="tom-student", task="theory_of_mind", **_TOM_STUDENT, steps=4_000,
        warmup_templates=("adjacent",), seed=4, init_from="tom-student-dense", self_distill=True,
        head_sparsity=0.1, **_FINE_TUNE,
    ),
}

# A seconds-long organism for tests and smoke runs (``experiments/zoo.py --tiny``): two boxes, the
# adjacent form.
TINY_CONFIG = OrganismConfig(
    name="et-tiny", task="entity_tracking", template="adjacent", n_boxes=2, n_layers=2, d_model=128,
    n_heads=8, n_kv_heads=4, d_mlp=512, steps=1000, lr=1e-3, curriculum_start=None, eval_every=200,
    eval_items=200, seed=1,
)


def zoo_dir() -> Path:
    """The folder that holds the zoo (``$CDIST_ZOO`` or ``zoo/`` at the repository root)."""
    return Path(os.environ.get("CDIST_ZOO", Path(__file__).resolve().parents[2] / "zoo"))


def organism_tokenizer(save_dir: str | Path | None = None):
    """The word-level tokenizer every organism uses: special tokens, then
    ``tasks.organism_vocabulary()``."""
    return word_tokenizer(tasks.organism_vocabulary(), save_dir=save_dir)


def names() -> list[str]:
    """The zoo models present on disk, sorted."""
    root = zoo_dir()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").exists())


def _path(name: str) -> Path:
    path = zoo_dir() / name
    if not (path / "manifest.json").exists():
        raise MissingFileError(
            f"no zoo model {name!r} in {zoo_dir()} (present: {', '.join(names()) or 'none'}); "
            "train it with `python experiments/zoo.py` or set CDIST_ZOO"
        )
    return path


def manifest(name: str) -> dict:
    """How a zoo model was made and what it measured."""
    return read_json(_path(name) / "manifest.json", f"restore it, or retrain {name} with "
                     "cdist zoo train")


def load(name: str, *, device: str = "cpu") -> tuple[HookedTransformer, object]:
    """Load a zoo model as a HookedTransformer, with its tokenizer."""
    model = load_llama(_path(name), device=device)
    return model, model.tokenizer


# What a save wrote into an organism's folder before cdist recorded the files of each checkpoint
# it writes (cdist.checkpoints): such a folder holding nothing else is taken as the zoo's own.
_EARLIER_FILES = {"config.json", "generation_config.json", "manifest.json", "model.safetensors",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}


def save(model: LlamaForCausalLM, tokenizer, name: str, manifest: dict) -> Path:
    """Write a trained organism, its tokenizer and its manifest into the zoo, atomically; an
    organism's folder holding a file of someone else's is refused (``RunFolderError``)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(manifest, tmp / "manifest.json")

    return atomic_directory(zoo_dir() / name, write,
                            earlier=lambda d: {p.name for p in d.iterdir()} <= _EARLIER_FILES)


def init_weights(cfg: OrganismConfig) -> dict | None:
    """The trained weights ``cfg`` starts from (the zoo model named by ``cfg.init_from``), or
    None."""
    if cfg.init_from is None:
        return None
    return LlamaForCausalLM.from_pretrained(_path(cfg.init_from)).state_dict()


def export_hf(name: str, out_dir: str | Path) -> Path:
    """Write a zoo model as a transformers ``LlamaForCausalLM`` directory that ``load_llama`` reads
    back."""
    model, tokenizer = load(name)
    save_llama(model, out_dir, tokenizer=tokenizer)
    return Path(out_dir)
