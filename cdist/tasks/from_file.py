"""A task given as data: a JSONL or CSV file, or a ``datasets`` folder (``save_to_disk``), one row
per item.

Columns:

- ``prompt`` (required): the text the model continues. Positions are named by marking spans,
  ``[[name:text]]``: "When [[io:Mary]] and [[s1:John]] went to the store, [[s2:John]] gave a drink
  to". A span's position is its last token (where a multi-token span has been read whole); the
  marks are removed from the text the model sees. ``last`` is reserved: ``pos_last`` is always the
  prompt's last token.
- ``answer`` (required): the token that follows the prompt, written exactly as it continues the
  text (" Mary", with its space); it must be one token of the models' tokenizer.
- ``counterfactual_prompt`` (optional; path patching needs it): the prompt whose activations are
  patched in. It must tokenize to as many tokens as the prompt and mark the same names at the same
  token positions, since patching moves activations position by position.
- ``counterfactual_answer`` (optional): the rival of the logit difference
  (``cdist.discovery.metrics``), e.g. the counterfactual prompt's answer; one token.
- ``pos_<name>`` (optional): a position given as a token index instead of a marked span.

Every row is checked with the tokenizer when the task is first used, before any model loads, and
the first problem is refused in one line naming the row (1-based, in file order) and the column.
Rows are split into train and test by a stable hash of their content, as the built-in tasks' items
are (``common.item_split``): a row's split never depends on the file's order or size.

Choices that are ours:
- Items are drawn from a split without replacement, in an order fixed by the seed; the pipeline's
  sets of one split are disjoint slices of one such order (``ItemSets``), so a file's item is never
  in two of them, and a request for more rows than a split holds is refused with the numbers.
- A task with counterfactuals is searched by path patching (``search.positions_search``) and
  scored by the logit difference when it names rivals (else the answer's probability); without
  counterfactuals its circuits come from the mean-ablation ranking.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from cdist.checkpoints import atomic_write_text, writing
from cdist.errors import FileFormatError, InputError, MissingFileError, RunFolderError
from cdist.tasks.common import check_request, check_split, item_split, task_rng
from cdist.tasks.registry import Task, register_file_loader

__all__ = ["SPAN", "TaskFile", "is_task_file", "task_from_file", "write_task_file"]

# [[name:text]]: a named position, the span's last token
SPAN = re.compile(r"\[\[([A-Za-z_][A-Za-z0-9_]*):(.*?)\]\]")
COLUMNS = ("prompt", "answer", "counterfactual_prompt", "counterfactual_answer")
SUFFIXES = (".jsonl", ".csv")


def is_task_file(name: str) -> bool:
    """Whether a task name is a path to task data rather than a registered task's name."""
    path = Path(name)
    return path.suffix in SUFFIXES or (path.is_dir() and (path / "dataset_info.json").is_file())


def _read_rows(path: Path) -> list[dict]:
    """The file's rows as dicts of strings (and ints for ``pos_*`` of a datasets folder)."""
    if not path.exists():
        raise MissingFileError(f"task file {path} does not exist; give a .jsonl or .csv file or a "
                               "datasets folder (save_to_disk)")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            return [dict(row) for row in load_from_disk(str(path))]
        except Exception as e:  # datasets' own errors name no fix
            raise FileFormatError(f"task folder {path} is not a datasets folder ({e}); save one "
                                  "with Dataset.save_to_disk") from None
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path} line {i}: not JSON ({e.msg}); write one JSON object "
                                  "per line") from None
        if not isinstance(row, dict):
            raise FileFormatError(f"{path} line {i}: a JSON {type(row).__name__}, not an object "
                                  "with prompt and answer")
        rows.append(row)
    return rows


def _spans(text: str, where: str) -> tuple[str, dict[str, int]]:
    """``text`` without its marks, and each mark's name -> the character index of its last
    character in that text."""
    plain, ends, last = "", {}, 0
    for m in SPAN.finditer(text):
        plain += text[last:m.start()]
        name, body = m.group(1), m.group(2)
        if not body:
            raise InputError(f"{where}: the span [[{name}:]] marks no text; mark a word")
        if name == "last" or name in ends:
            raise InputError(f"{where}: position {name!r} is "
                             f"{'reserved (pos_last)' if name == 'last' else 'marked twice'}; "
                             "give each span its own name")
        plain += body
        ends[name] = len(plain) - 1
        last = m.end()
    plain += text[last:]
    if "[[" in plain or "]]" in plain:
        raise InputError(f"{where}: a [[ or ]] that is not a span [[name:text]]; close the mark "
                         "or remove it")
    return plain, ends


def _token_ids(tokenizer, text: str, ends: Mapping[str, int], where: str):
    """``text``'s token ids (with the special tokens the tokenizer adds) and each named
    position's token index."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    positions = {}
    for name, end in ends.items():
        at = [i for i, (s, e) in enumerate(offsets) if s <= end < e]
        if not at:
            raise InputError(f"{where}: no token covers the span {name!r}; check the mark")
        positions[f"pos_{name}"] = at[-1]
    return list(ids), positions


def _one_token(tokenizer, text, where: str) -> int:
    if not isinstance(text, str) or not text:
        raise InputError(f"{where} is empty; give the token that follows the prompt")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        hint = ""
        spaced = tokenizer(" " + text, add_special_tokens=False).input_ids
        if not text.startswith(" ") and len(spaced) == 1:
            hint = f" (' {text}', with its space, is one)"
        raise InputError(f"{where} {text!r} is {len(ids)} tokens for this tokenizer{hint}; an "
                         "answer must be one token, written as it continues the prompt")
    return ids[0]


class TaskFile:
    """A task file's rows, checked and tokenized with one tokenizer (module doc)."""

    def __init__(self, path: str | Path, tokenizer):
        self.path = Path(path)
        rows = _read_rows(self.path)
        if not rows:
            raise InputError(f"task file {self.path} has no rows")
        missing = [c for c in ("prompt", "answer") if c not in rows[0]]
        if missing:
            raise InputError(f"task file {self.path} lacks the column(s) {missing}; it has "
                             f"{sorted(rows[0])}")
        self.has_counterfactual = "counterfactual_prompt" in rows[0]
        self.has_rival = "counterfactual_answer" in rows[0]
        seen: dict[tuple, int] = {}
        self.items = []
        for n, row in enumerate(rows, 1):
            key = (row.get("prompt"), row.get("answer"), row.get("counterfactual_prompt"))
            if key in seen:
                raise InputError(f"{self.path} row {n} repeats row {seen[key]}; remove one")
            seen[key] = n
            self.items.append(self._item(row, n, tokenizer))

    def _item(self, row: dict, n: int, tokenizer) -> dict:
        where = f"{self.path} row {n}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}, column prompt: empty; give the text the model continues")
        text, ends = _spans(prompt, f"{where}, column prompt")
        ids, positions = _token_ids(tokenizer, text, ends, f"{where}, column prompt")
        for name, value in row.items():
            if name.startswith("pos_") and name not in positions:
                if not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
                    raise InputError(f"{where}, column {name}: {value!r} is not a token index")
                if not 0 <= int(value) < len(ids):
                    raise InputError(f"{where}, column {name}: position {value} is outside the "
                                     f"prompt's {len(ids)} tokens")
                positions[name] = int(value)
        answer = row.get("answer")
        if isinstance(answer, str) and answer[:1].isalpha() and text[-1:].isalpha():
            raise InputError(f"{where}, column answer: the prompt and {answer!r} read "
                             f"{text.split()[-1] + answer!r}, one word; write the answer as it "
                             f"continues the text, e.g. {' ' + answer!r}")
        item = {"prompt": text, "answer": answer, "input_ids": ids,
                "answer_id": _one_token(tokenizer, answer, f"{where}, column answer"),
                "pos_last": len(ids) - 1, **positions, "row": n}
        if self.has_counterfactual:
            c_text, c_ends = _spans(row.get("counterfactual_prompt") or "",
                                    f"{where}, column counterfactual_prompt")
            if not c_text.strip():
                raise InputError(f"{where}, column counterfactual_prompt: empty; give the prompt "
                                 "whose activations are patched in")
            c_ids, c_positions = _token_ids(tokenizer, c_text, c_ends,
                                            f"{where}, column counterfactual_prompt")
            if len(c_ids) != len(ids):
                raise InputError(f"{where}, column counterfactual_prompt: {len(c_ids)} tokens "
                                 f"against the prompt's {len(ids)}; patching needs them aligned "
                                 "token for token")
            marked = {k: v for k, v in positions.items() if k[4:] in ends}
            if c_positions != marked:
                raise InputError(f"{where}, column counterfactual_prompt: its marks "
                                 f"{c_positions} do not line up with the prompt's {marked}; mark "
                                 "the same names at the same token positions")
            item |= {"corrupt_prompt": c_text, "corrupt_input_ids": c_ids}
        if self.has_rival:
            item["contrast_id"] = _one_token(tokenizer, row.get("counterfactual_answer"),
                                             f"{where}, column counterfactual_answer")
        item["split"] = item_split((text, row["answer"], item.get("corrupt_prompt")))
        return item

    def rows(self, split: str) -> list[dict]:
        """The items of ``split``, in an order of their content alone, so that a seed draws the
        same items whatever the file's row order."""
        check_split(split)
        return sorted((it for it in self.items if it["split"] == split), key=_content_key)


def _content_key(item: dict) -> str:
    return hashlib.sha256(json.dumps([item["input_ids"], item["answer_id"],
                                      item.get("corrupt_input_ids")]).encode()).hexdigest()


@lru_cache(maxsize=16)
def _checked(path: str, stamp: tuple, tokenizer) -> TaskFile:
    return TaskFile(path, tokenizer)


def _file_stamp(path: Path) -> tuple:
    """What a task file's cached check depends on: its bytes (a folder: its files' sizes and
    times)."""
    if path.is_dir():
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                            for p in path.iterdir()))
    return (hashlib.sha256(path.read_bytes()).hexdigest(),) if path.exists() else ()


def task_from_file(name: str) -> Task:
    """The ``Task`` of the task data at ``name`` (module doc); its generator checks the rows with
    the tokenizer it is given, once per file and tokenizer."""
    path = Path(name)

    def generate(n: int, *, tokenizer, seed: int = 0, split: str = "train", template: str = "file",
                 offset: int = 0):
        check_request(n, split, tokenizer=tokenizer, seed=seed)
        data = _checked(str(path), _file_stamp(path), tokenizer)
        rows = data.rows(split)
        if offset + n > len(rows):
            raise InputError(f"{path}: {offset + n} {split} items asked for, but {len(rows)} of "
                             f"its {len(data.items)} rows fall in the {split} split; add rows or "
                             "ask for fewer items")
        order = list(range(len(rows)))
        task_rng("task file", seed, split).shuffle(order)  # not its name: a copy draws alike
        from datasets import Dataset

        chosen = [{k: v for k, v in rows[i].items() if k != "split"}
                  for i in order[offset:offset + n]]
        return Dataset.from_list(chosen)

    has_counterfactual, has_rival = _columns(path)
    return Task(
        name=name, generate=generate, templates={"file": None}, real_template="file",
        discovery_method="path_patching" if has_counterfactual else "mean_ablation",
        discovery_methods=(("path_patching", "mean_ablation") if has_counterfactual
                           else ("mean_ablation",)),
        search=(lambda items: "positions") if has_counterfactual else None,
        table_stem=f"table-{path.stem}", metric="logit_diff" if has_rival else "prob",
        size=lambda tokenizer, split: len(_checked(str(path), _file_stamp(path),
                                                   tokenizer).rows(split)))


def _columns(path: Path) -> tuple[bool, bool]:
    """Whether the file's rows have counterfactual prompts, and rival answers (its first row's
    columns; every row is checked when items are made)."""
    rows = _read_rows(path)
    first = rows[0] if rows else {}
    return "counterfactual_prompt" in first, "counterfactual_answer" in first


def write_task_file(items, tokenizer, path: str | Path, positions: tuple[str, ...] = ()) -> Path:
    """Write task items (a built-in generator's, say) as a JSONL task file a user can edit: each
    named position column (``pos_<name>``) becomes a marked span around its token, and the
    counterfactual prompt is marked alike; ``contrast_id`` becomes the counterfactual answer. An
    existing ``path`` is refused (``RunFolderError``), and the file is written atomically.
    Reading the file back with the same tokenizer gives the same token ids, answers and
    positions (the tests hold it to that)."""
    path = Path(path)
    if path.exists():
        raise RunFolderError(f"{path} exists; give a new path (cdist rewrites no file it did not "
                             "write)")
    lines = []
    for item in items:
        row = {"prompt": _marked(tokenizer, item["prompt"], item, positions),
               "answer": _continuing(tokenizer.decode([item["answer_id"]]), item["prompt"])}
        if "corrupt_prompt" in item:
            row["counterfactual_prompt"] = _marked(tokenizer, item["corrupt_prompt"], item,
                                                   positions)
        if "contrast_id" in item:
            row["counterfactual_answer"] = _continuing(tokenizer.decode([item["contrast_id"]]),
                                                       item["prompt"])
        lines.append(json.dumps(row, ensure_ascii=False))
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def _continuing(answer: str, prompt: str) -> str:
    """``answer`` as it continues ``prompt``: a word-level tokenizer decodes a word without the
    space a BPE token carries, and the word would then read glued to the prompt's last one."""
    glued = answer[:1].isalpha() and prompt[-1:].isalpha()  # what the reader refuses
    return " " + answer if glued else answer


def _marked(tokenizer, text: str, item: Mapping, positions: tuple[str, ...]) -> str:
    """``text`` with a ``[[name:token]]`` span around the token at each ``pos_<name>``."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    spans = sorted((offsets[item[f"pos_{name}"]], name) for name in positions)
    out, last = "", 0
    for (start, end), name in spans:
        # a BPE token may carry the space before its word: the mark starts at the word
        while start < end and text[start].isspace():
            start += 1
        out += text[last:start] + f"[[{name}:{text[start:end]}]]"
        last = end
    return out + text[last:]


register_file_loader(is_task_file, task_from_file)
