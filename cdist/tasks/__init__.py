"""Task generators: prompts, answers, counterfactuals and token positions as ``datasets.Dataset``.

- ``entity_tracking``: "The apple is in Box F, ... . Box F contains the" -> "apple"
  (Prakash et al. 2024).
- ``theory_of_mind``: CausalToM belief questions, answer a drink or "unknown" (Prakash et al. 2025).
- ``ioi``: "When Mary and John went to the store, John gave a drink to" -> " Mary" (Wang et al.
  2022).

Each registers a ``Task`` record (``get_task(name)``) that the rest of cdist asks instead of
comparing names.

Both work with any fast Hugging Face tokenizer (the word-level organism tokenizer built from
``organism_vocabulary()``, Llama-3's, SmolLM2's, ...) and add the special tokens it adds: a BOS for
the first two, none for SmolLM2. A word list the caller passes must have every word as one token
(after a space); without one, a generator uses the default words that are, and
``default_words(task, tokenizer)`` says which those are.
"""

from __future__ import annotations

import string
from dataclasses import fields

from tokenizers import pre_tokenizers

from cdist.tasks.common import (
    TEST_FRACTION,
    WordChoice,
    item_split,
    single_token_id,
    single_token_words,
)
from cdist.tasks.entity_tracking import (
    ET_TEMPLATES,
    EntityTrackingTemplate,
    entity_tracking,
    entity_tracking_words,
    render_context,
    render_entity_tracking,
    render_query,
)
from cdist.tasks.from_file import write_task_file
from cdist.tasks.ioi import IOI_TEMPLATES, IoiTemplate, ioi
from cdist.tasks.registry import (
    TASKS,
    Task,
    UnknownTaskError,
    default_words,
    get_task,
    register,
)
from cdist.tasks.theory_of_mind import (
    TOM_TEMPLATES,
    UNKNOWN,
    VISIBILITIES,
    TheoryOfMindTemplate,
    belief,
    render_question,
    render_story,
    render_theory_of_mind,
    theory_of_mind,
    theory_of_mind_words,
)

__all__ = [
    "ET_TEMPLATES", "IOI_TEMPLATES", "TASKS", "TEST_FRACTION", "TOM_TEMPLATES", "UNKNOWN",
    "VISIBILITIES", "EntityTrackingTemplate", "IoiTemplate", "Task", "TheoryOfMindTemplate",
    "UnknownTaskError", "WordChoice", "belief", "default_words", "entity_tracking",
    "entity_tracking_words", "get_task", "ioi",
    "item_split", "organism_vocabulary", "register", "render_context", "render_entity_tracking",
    "render_query", "render_question", "render_story", "render_theory_of_mind",
    "single_token_id", "single_token_words", "theory_of_mind", "theory_of_mind_words",
    "write_task_file",
]


def organism_vocabulary() -> list[str]:
    """Every token the registered templates and default word lists can produce, sorted.

    Words and punctuation are split as ``cdist.tokenizers.word_tokenizer`` splits them (whitespace,
    then punctuation: "Carla's" is "Carla", "'", "s"). Template text and filled-in words tokenize
    apart, because every field of every template is bounded by a space or punctuation.

    Warning:
        Token ids of a word tokenizer follow this list, so changing a template or word list changes
        the ids (and invalidates trained organisms).
    """
    # The same pre-tokenizer as word_tokenizer's.
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                     pre_tokenizers.Punctuation()])
    texts = [*entity_tracking_words()[0], *entity_tracking_words()[1],
             *sum(theory_of_mind_words(), [])]
    texts += [UNKNOWN, "can", "cannot"]
    for template in (*ET_TEMPLATES.values(), *TOM_TEMPLATES.values()):
        for f in fields(template):
            value = getattr(template, f.name)
            if isinstance(value, str) and f.name != "name":
                texts += [literal for literal, *_ in string.Formatter().parse(value)]
    return sorted({piece for text in texts for piece, _ in split.pre_tokenize_str(text)})
