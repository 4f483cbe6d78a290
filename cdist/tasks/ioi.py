"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild"): which name
completes a sentence whose subject is named twice?

    When Mary and John went to the store, John gave a drink to  ->  " Mary"

Two names are introduced; the second clause repeats one of them as its subject (S) and the other,
the indirect object (IO), is the answer. Half the items name IO first ("ABBA": Mary and John ...
John), half S first ("BABA": John and Mary ... John).

- Positions: ``pos_io`` and ``pos_s1`` (the two names of the first clause), ``pos_s2`` (the
  subject's second mention), ``pos_s1_next`` (the token after S1, where Wang et al.'s
  previous-token heads act on the induction heads' keys) and ``pos_last`` (END).
- Counterfactual: Wang et al.'s ABC prompt, the same sentence with its three name mentions
  replaced by three other names, all different ("When Anna and Paul went to the store, Kate gave a
  drink to"): nothing in it says which name to repeat. Its tokens align with the clean prompt's
  one for one, since every name is one token.
- ``contrast_id`` is the subject's name: the logit difference logit(IO) - logit(S) is Wang et al.'s
  metric, and the task's default (``cdist.discovery.metrics``); chance is 1/2, a guess between the
  two names.

Choices that are ours:
- Five of Wang et al.'s templates (``IOI_TEMPLATES``) and ``"mixed"``, which draws one per item; a
  real model's default is ``"when"``, one template, so that every prompt has the same length and a
  head's mean at a position (mean ablation) is taken over one role.
- The item key is (template, IO, S, order, place, gift).
- Default words are common names, places and gifts; a tokenizer that splits some of them draws
  from the rest (``default_words``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

NAMES = (
    "Mary", "John", "Alice", "Bob", "James", "Sarah", "Michael", "Emma", "David", "Anna", "Tom",
    "Kate", "Paul", "Lisa", "Mark", "Laura", "Peter", "Jane", "George", "Susan", "Daniel", "Rachel",
    "Robert", "Linda", "Steven", "Amy", "Kevin", "Emily", "Brian", "Helen", "Jack", "Lucy", "Sam",
    "Grace", "Frank", "Julia",
)
PLACES = ("store", "park", "school", "beach", "garden", "hospital", "station", "office",
          "restaurant", "library", "market", "church")
GIFTS = ("drink", "ring", "book", "ball", "kiss", "bone", "computer", "necklace", "snack", "letter",
         "flower", "bag")


@dataclass(frozen=True)
class IoiTemplate:
    """One IOI sentence: ``{n1}`` and ``{n2}`` are the first clause's names, ``{s2}`` the
    subject's second mention; the prompt ends where the indirect object would follow."""

    name: str
    text: str


IOI_TEMPLATES: dict[str, IoiTemplate | None] = {
    t.name: t for t in (
        IoiTemplate("when", "When {n1} and {n2} went to the {place}, {s2} gave a {gift} to"),
        IoiTemplate("then", "Then, {n1} and {n2} went to the {place}. {s2} gave a {gift} to"),
        IoiTemplate("after", "After {n1} and {n2} went to the {place}, {s2} gave a {gift} to"),
        IoiTemplate("while",
                    "While {n1} and {n2} were working at the {place}, {s2} gave a {gift} to"),
        IoiTemplate("friends", "Friends {n1} and {n2} found a {gift} at the {place}. {s2} gave it "
                               "to"),
    )
} | {"mixed": None}  # one of the above per item


def ioi(
    n: int,
    *,
    tokenizer,
    seed: int = 0,
    split: str = "train",
    template: str = "when",
    names: Sequence[str] | None = None,
    places: Sequence[str] | None = None,
    gifts: Sequence[str] | None = None,
) -> Dataset:
    """Generate ``n`` IOI items of one split, with their ABC counterfactuals.

    Args:
        n: number of items.
        tokenizer: any fast Hugging Face tokenizer; prompts get the special tokens it adds.
        seed: the same (seed, split, arguments, kept default words) always gives the same items.
        split: "train" or "test"; the two never share an item.
        template: a name in ``IOI_TEMPLATES`` ("mixed": one of the others per item).
        names: name words, each a single token, at least 5 (two for the item, three others for
            its counterfactual). Default: the words of ``NAMES`` that are single tokens.
        places, gifts: the sentence's other words, each a single token (defaults: ``PLACES``,
            ``GIFTS``).

    Returns:
        A Dataset with columns prompt, answer, input_ids, answer_id, contrast_id (the subject's
        name), corrupt_prompt, corrupt_input_ids, pos_io, pos_s1, pos_s2, pos_s1_next, pos_last,
        io, s, order ("ABBA": IO named first, "BABA"), place, gift, corrupt_names, template.

    Raises:
        InputError: an unknown template, a given word that is not one token, lists too short.
    """
    check_request(n, split, tokenizer=tokenizer, seed=seed)
    if template not in IOI_TEMPLATES:
        raise InputError(f"ioi template {template!r}; choose from {sorted(IOI_TEMPLATES)}")
    names = default_or_given(tokenizer, names, NAMES, "name", 5)
    places = default_or_given(tokenizer, places, PLACES, "place", 1)
    gifts = default_or_given(tokenizer, gifts, GIFTS, "gift", 1)
    ids = {w: single_token_id(tokenizer, w, "name") for w in names}
    rng = task_rng("ioi", seed, split)
    fixed = sorted(t for t in IOI_TEMPLATES if t != "mixed")

    def propose() -> tuple:
        io, s = rng.sample(names, 2)
        which = rng.choice(fixed) if template == "mixed" else template
        return which, io, s, rng.choice(("ABBA", "BABA")), rng.choice(places), rng.choice(gifts)

    items = []
    for item in draw_split(n, split, propose, key=lambda it: it):
        others = rng.sample([x for x in names if x not in item[1:3]], 3)
        items.append((item, others))
    clean = [_prompt(*item) for item, _ in items]
    corrupt = [_prompt(item[0], *others, item[4], item[5], abc=True) for item, others in items]
    rows = []
    for ((which, io, s, order, place, gift), others), (c_ids, pos), (x_ids, x_pos), p, q in zip(
            items, encode(tokenizer, clean), encode(tokenizer, corrupt), clean, corrupt,
            strict=True):
        if len(x_ids) != len(c_ids) or x_pos["s2"] != pos["s2"]:
            raise InputError(f"clean and counterfactual prompts tokenize to {len(c_ids)} and "
                             f"{len(x_ids)} tokens; use single-token names")
        first, second = ("n1", "n2") if order == "ABBA" else ("n2", "n1")
        rows.append({
            "prompt": p.text, "answer": io, "input_ids": c_ids, "answer_id": ids[io],
            "contrast_id": ids[s], "corrupt_prompt": q.text, "corrupt_input_ids": x_ids,
            "pos_io": pos[first], "pos_s1": pos[second], "pos_s2": pos["s2"],
            "pos_s1_next": pos[second] + 1, "pos_last": len(c_ids) - 1, "io": io, "s": s,
            "order": order, "place": place, "gift": gift, "corrupt_names": others,
            "template": which,
        })
    from datasets import Dataset

    return Dataset.from_list(rows)


def _prompt(template: str, a: str, b: str, c: str, place: str, gift: str, *,
            abc: bool = False) -> Prompt:
    """An item's prompt: clean (``a`` = IO, ``b`` = S, ``c`` = the order), or with ``abc`` the
    counterfactual whose three mentions are ``a``, ``b``, ``c``."""
    text = IOI_TEMPLATES[template].text
    if abc:
        n1, n2, s2 = a, b, c
    else:
        io, s, order = a, b, c
        n1, n2, s2 = (io, s, s) if order == "ABBA" else (s, io, s)
    prompt = Prompt()
    prompt.add(text, n1=n1, n2=n2, s2=s2, place=place, gift=gift)
    return prompt


TASK = register(Task(
    name="ioi", generate=ioi, templates=IOI_TEMPLATES, real_template="when",
    discovery_method="path_patching", discovery_methods=("path_patching", "mean_ablation"),
    search=lambda items: "ioi", table_stem="table-ioi", metric="logit_diff",
    word_lists={"names": NAMES, "places": PLACES, "gifts": GIFTS},
    chance=lambda items: 0.5,  # a guess between the two names
))
