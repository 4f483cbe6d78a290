"""Write the example task files (``cdist.tasks.write_task_file``), each refused if it exists:

    python examples/make.py        # examples/ioi.jsonl, examples/boxes.jsonl

- ``ioi.jsonl``: 400 IOI items (Wang et al. 2022; the ``mixed`` templates) for Llama-3's tokenizer
  (read offline, ``cdist.tokenizers.llama3_tokenizer``), whose names are single tokens for
  SmolLM2's as well: 320 from the train split and 80 from the test split, IO, S1 and S2 marked.
- ``boxes.jsonl``: 800 entity-tracking items in the zoo organisms' own form (7 boxes, the
  ``adjacent`` template: " phone W , boat M , ... . J" -> " rose"), for the zoo pair: 600 from the
  train split and 200 from the test split, the queried label marked where the context names its
  box (prev_label) and in the question (query_label).

A file's rows fall into train and test by a hash of their content (``cdist.tasks.from_file``), not
by the generator's split they came from; the generators' splits only keep the rows distinct.
"""

import sys
from pathlib import Path

import datasets

from cdist import tasks, zoo
from cdist.tokenizers import llama3_tokenizer

here = Path(__file__).parent


def both(make, n_train: int, n_test: int, **kwargs):
    return datasets.concatenate_datasets([make(n_train, split="train", seed=1, **kwargs),
                                          make(n_test, split="test", seed=2, **kwargs)])


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else here
    tok3, organisms = llama3_tokenizer(), zoo.organism_tokenizer()
    ioi = both(tasks.ioi, 320, 80, tokenizer=tok3, template="mixed")
    print(tasks.write_task_file(ioi, tok3, out / "ioi.jsonl", positions=("io", "s1", "s2")))
    boxes = both(tasks.entity_tracking, 600, 200, tokenizer=organisms, n_boxes=7,
                 template="adjacent")
    print(tasks.write_task_file(boxes, organisms, out / "boxes.jsonl",
                                positions=("query_label", "prev_label")))
