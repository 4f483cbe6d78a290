"""Entity tracking: which object is in the queried box?

The task of Kim & Schuster (2023) in the form Prakash et al. (2024, "Fine-tuning enhances existing
mechanisms") use for path patching::

    The apple is in Box F, the pen is in Box Q, ..., the cup is in Box Z. Box F contains the
    ->  " apple"

``n_boxes`` distinct objects are put in ``n_boxes`` boxes with distinct random single-letter labels,
and one box is queried, uniformly. The data are generated here; Kim & Schuster's files are not used.

The counterfactual (``corrupt_*`` columns) for path patching is a fresh context (new objects and
labels, the same number of boxes) that does not contain the queried label, followed by the same
query. It tokenizes to the same length with the query at the same positions, so a head's activation
can be patched position-wise.

Choices that are ours:
- The "compact" template is a short organism form of the same binding task, one token per word:
  ``" apple in F , pen in Q , cup in Z . F contains"`` -> ``"apple"``. It begins with a space so
  that, under a BPE tokenizer, the first object is the same " apple" token as the answer.
- ``render_context`` ends at the final full stop and ``render_query`` starts with a space, so the
  tokens of context and query (no special tokens) concatenate to the prompt's tokens; trainers build
  multi-query sequences that way.
- Default objects are concrete nouns that are one token both in the word-level vocabulary and, after
  a space, in Llama-3; default labels are the 26 capital letters. A tokenizer that splits some of
  them draws from the rest (SmolLM2 splits " scarf"; ``default_words`` lists what is dropped). The
  item key is (objects, labels, query label), so train and test share no (context, query) pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import perm
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # datasets is slow to import; the command line's --help needs none
    from datasets import Dataset

from cdist.errors import InputError
from cdist.tasks.common import (
    Prompt,
    check_request,
    default_or_given,
    draw_split,
    encode,
    single_token_id,
    task_rng,
)
from cdist.tasks.registry import Task, register

OBJECTS = (
    "apple", "bag", "ball", "bell", "belt", "boat", "bone", "book", "bottle", "bowl", "bread",
    "brush", "bucket", "button", "cake", "camera", "candle", "card", "chain", "clock", "coat",
    "coin", "comb", "cookie", "crown", "cup", "diamond", "dish", "doll", "drum", "egg", "envelope",
    "feather", "flag", "flower", "fork", "glove", "guitar", "hammer", "hat", "helmet", "jacket",
    "jar", "key", "kite", "knife", "lamp", "leaf", "lemon", "magnet", "map", "mask", "medal",
    "mirror", "nail", "needle", "onion", "painting", "paper", "pen", "pencil", "phone", "piano",
    "pillow", "plate", "potato", "radio", "ribbon", "ring", "rope", "rose", "ruler", "scarf",
    "shell", "shirt", "shoe", "sock", "spoon", "stamp", "stone", "sword", "ticket", "tomato",
    "towel", "toy", "trophy", "truck", "umbrella", "vase", "violin", "wallet", "wheel", "whistle",
    "wire",
)
LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class EntityTrackingTemplate:
    """How an entity-tracking prompt is worded: context clauses, then one query.

    Every string is a format string with ``{object}`` and/or ``{label}``; the prompt is
    ``first_clause + (clause_sep + clause) * (n_boxes - 1) + context_end + query``.
    """

    name: str
    first_clause: str
    clause: str
    clause_sep: str
    context_end: str
    query: str


ET_TEMPLATES: dict[str, EntityTrackingTemplate] = {
    "prakash": EntityTrackingTemplate(
        name="prakash",
        first_clause="The {object} is in Box {label}",
        clause="the {object} is in Box {label}",
        clause_sep=", ",
        context_end=".",
        query=" Box {label} contains the",
    ),
    "compact": EntityTrackingTemplate(
        name="compact",
        first_clause=" {object} in {label}",
        clause="{object} in {label}",
        clause_sep=" , ",
        context_end=" .",
        query=" {label} contains",
    ),
    # The shortest form: the object sits right before its label and the query is the label itself.
    # Organism training mixes it in as a warm-up because its lookup is learnt quickly.
    "adjacent": EntityTrackingTemplate(
        name="adjacent",
        first_clause=" {object} {label}",
        clause="{object} {label}",
        clause_sep=" , ",
        context_end=" .",
        query=" {label}",
    ),
    # Two bridges between "adjacent" and "compact", each adding one of compact's two offsets: the
    # object two tokens before its label, and the answer one token after the queried label.
    "bridge_context": EntityTrackingTemplate(
        name="bridge_context",
        first_clause=" {object} in {label}",
        clause="{object} in {label}",
        clause_sep=" , ",
        context_end=" .",
        query=" {label}",
    ),
    "bridge_query": EntityTrackingTemplate(
        name="bridge_query",
        first_clause=" {object} {label}",
        clause="{object} {label}",
        clause_sep=" , ",
        context_end=" .",
        query=" {label} contains",
    ),
}


def entity_tracking_words() -> tuple[list[str], list[str]]:
    """The default (objects, labels) word lists."""
    return list(OBJECTS), list(LABELS)


def get_template(template: str | EntityTrackingTemplate) -> EntityTrackingTemplate:
    if isinstance(template, EntityTrackingTemplate):
        return template
    if template not in ET_TEMPLATES:
        raise InputError(f"unknown entity-tracking template {template!r}; "
                         f"choose from {sorted(ET_TEMPLATES)}")
    return ET_TEMPLATES[template]


def _context(prompt: Prompt, objects: Sequence[str], labels: Sequence[str],
             t: EntityTrackingTemplate):
    for i, (obj, label) in enumerate(zip(objects, labels, strict=True)):
        clause = t.first_clause if i == 0 else t.clause_sep + t.clause
        prompt.add(clause, tag=str(i), object=obj, label=label)
    prompt.add(t.context_end)


def render_context(
    objects: Sequence[str], labels: Sequence[str], template: str | EntityTrackingTemplate
) -> str:
    """The context: object ``i`` is in the box labelled ``labels[i]``."""
    prompt = Prompt()
    _context(prompt, objects, labels, get_template(template))
    return prompt.text


def render_query(label: str, template: str | EntityTrackingTemplate) -> str:
    """The query about box ``label`` (starts with a space; append it to a context)."""
    prompt = Prompt()
    prompt.add(get_template(template).query, label=label)
    return prompt.text


def render_entity_tracking(
    objects: Sequence[str], labels: Sequence[str], query_label: str,
    template: str | EntityTrackingTemplate,
) -> str:
    """A whole prompt: ``render_context(...) + render_query(...)``."""
    return _prompt(objects, labels, query_label, get_template(template)).text


def _prompt(objects, labels, query_label, t: EntityTrackingTemplate) -> Prompt:
    prompt = Prompt()
    _context(prompt, objects, labels, t)
    prompt.add(t.query, tag="_query", label=query_label)
    return prompt


def entity_tracking(
    n: int,
    *,
    tokenizer,
    n_boxes: int = 7,
    seed: int = 0,
    split: str = "train",
    template: str | EntityTrackingTemplate = "prakash",
    objects: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> Dataset:
    """Generate ``n`` entity-tracking items of one split, with their counterfactuals.

    Args:
        n: number of items.
        tokenizer: any fast Hugging Face tokenizer (the word-level organism tokenizer, Llama-3's,
            SmolLM2's, ...); prompts get the special tokens it adds (a BOS or none).
        n_boxes: boxes (= objects) per context.
        seed: the same (seed, split, arguments, kept default words) always gives the same items.
        split: "train" or "test"; the two never share an item.
        template: a name in ``ET_TEMPLATES`` or a template.
        objects: object words, each a single token, at least ``n_boxes``. Default: the words of
            ``OBJECTS`` that are single tokens for ``tokenizer``.
        labels: box labels, each a single token, at least ``n_boxes + 1``. Default: the letters
            A-Z that are single tokens for ``tokenizer``.

    Returns:
        A Dataset with columns prompt, answer, input_ids, answer_id, contrast_id (the next box's
        object: a logit difference's rival, ``cdist.discovery.metrics``), corrupt_prompt,
        corrupt_input_ids, pos_last, pos_query_label, pos_prev_label, pos_prev_object, pos_objects,
        pos_labels, objects, labels, query_index, query_label, corrupt_objects, corrupt_labels,
        n_boxes, template. Positions index ``input_ids`` (its BOS included, where the tokenizer
        adds one); ``pos_prev_*`` are the queried box's label and object in the context.

    Raises:
        ValueError: on a word of a given list that is not a single token (the message names it),
            or lists too short (default lists: too few single-token words).
    """
    check_request(n, split, tokenizer=tokenizer, seed=seed)
    t = get_template(template)
    if n_boxes < 2:
        raise InputError(f"n_boxes={n_boxes} leaves nothing to track; use 2 or more boxes")
    objects = default_or_given(tokenizer, objects, OBJECTS, "object", n_boxes)
    # The counterfactual needs n_boxes labels other than the queried one.
    labels = default_or_given(tokenizer, labels, LABELS, "label", n_boxes + 1)
    clash = sorted(set(objects) & set(labels))
    if clash:  # an answer that is also a label: the model cannot tell what is asked
        raise InputError(f"words {clash} are both objects and labels; keep the lists apart")
    answer_ids = {w: single_token_id(tokenizer, w) for w in objects}
    for label in labels:
        single_token_id(tokenizer, label, role="label")

    items = _draw_items(n, seed, split, objects, labels, n_boxes)
    clean = [_prompt(o, lab, lab[q], t) for o, lab, q, _, _ in items]
    corrupt = [_prompt(co, cl, lab[q], t) for _, lab, q, co, cl in items]
    rows = []
    encoded = zip(encode(tokenizer, clean), encode(tokenizer, corrupt), strict=True)
    for i, ((ids, pos), (c_ids, c_pos)) in enumerate(encoded):
        if len(c_ids) != len(ids) or c_pos["label_query"] != pos["label_query"]:
            raise InputError(
                "clean and corrupt prompts tokenize to different lengths "
                f"({len(ids)} vs {len(c_ids)}); use single-token objects and labels"
            )
        rows.append(_row(items[i], clean[i].text, ids, pos, corrupt[i].text, c_ids, answer_ids,
                         t.name))
    from datasets import Dataset

    return Dataset.from_list(rows)


def distinct_items(words: dict[str, int], n_boxes: int = 7, **_) -> int:
    """How many distinct items (keys) ``words`` (role -> how many words) make: the ordered
    objects and labels of the boxes, times the queried box."""
    return perm(words["objects"], n_boxes) * perm(words["labels"], n_boxes) * n_boxes


def _draw_items(n: int, seed: int, split: str, objects: Sequence[str], labels: Sequence[str],
                n_boxes: int) -> list[tuple[list[str], list[str], int, list[str], list[str]]]:
    """``n`` items of ``split`` as (objects, labels, query index, counterfactual objects,
    counterfactual labels); the counterfactual's labels leave out the queried one."""
    rng = task_rng("entity_tracking", seed, split)

    def propose() -> tuple[list[str], list[str], int]:
        return rng.sample(objects, n_boxes), rng.sample(labels, n_boxes), rng.randrange(n_boxes)

    items = []
    for objs, labs, q in draw_split(n, split, propose, key=lambda it: (it[0], it[1], it[1][it[2]])):
        corrupt_labs = rng.sample([x for x in labels if x != labs[q]], n_boxes)
        items.append((objs, labs, q, rng.sample(objects, n_boxes), corrupt_labs))
    return items


def _row(item, prompt: str, ids: list[int], pos: dict[str, int], corrupt_prompt: str,
         c_ids: list[int], answer_ids: dict[str, int], template: str) -> dict:
    """One dataset row: an item's prompts, tokens and the positions its heads are read at."""
    objs, labs, q, c_objs, c_labs = item
    n_boxes = len(objs)
    return {
        "prompt": prompt,
        "answer": objs[q],
        "input_ids": ids,
        "answer_id": answer_ids[objs[q]],
        # the rival of a logit difference: the next box's object, the one a positional slip picks
        "contrast_id": answer_ids[objs[(q + 1) % n_boxes]],
        "corrupt_prompt": corrupt_prompt,
        "corrupt_input_ids": c_ids,
        "pos_last": len(ids) - 1,
        "pos_query_label": pos["label_query"],
        "pos_prev_label": pos[f"label{q}"],
        "pos_prev_object": pos[f"object{q}"],
        "pos_objects": [pos[f"object{i}"] for i in range(n_boxes)],
        "pos_labels": [pos[f"label{i}"] for i in range(n_boxes)],
        "objects": objs,
        "labels": labs,
        "query_index": q,
        "query_label": labs[q],
        "corrupt_objects": c_objs,
        "corrupt_labels": c_labs,
        "n_boxes": n_boxes,
        "template": template,
    }


def _search(items) -> str:
    # The organisms' adjacent form needs the object binders
    # (``cdist.discovery.search.ET_SEARCH_ADJACENT``).
    adjacent = "template" in items.column_names and items[0]["template"] == "adjacent"
    return "adjacent" if adjacent else "prakash"


def _default_ood(organism: bool) -> tuple:
    # Other box counts, and a template the models were not trained on (the organisms' own bridge
    # form, or the compact form for a real model read in Prakash et al.'s).
    return (("3 boxes", {"n_boxes": 3}), ("10 boxes", {"n_boxes": 10}),
            ("template bridge_context" if organism else "template compact",
             {"template": "bridge_context" if organism else "compact"}))


TASK = register(Task(
    name="entity_tracking", generate=entity_tracking, templates=ET_TEMPLATES,
    real_template="prakash", discovery_method="path_patching",
    discovery_methods=("path_patching", "mean_ablation"), search=_search,
    organism_kwargs=("n_boxes",), default_ood=_default_ood, table_stem="table1-entity-tracking",
    default_models=("et-teacher", "et-student"), organism_rows="multi_query", curriculum=True,
    word_lists={"objects": OBJECTS, "labels": LABELS}, distinct=distinct_items,
    # the answer is one of the item's n_boxes objects
    chance=lambda items: sum(1 / n for n in items["n_boxes"]) / len(items),
))
