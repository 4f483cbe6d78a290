"""Task generators (determinism, disjoint splits, answers re-derived from the prompt text, token
positions, default words a tokenizer splits) and the task registry."""

from __future__ import annotations

import hashlib
import inspect
import json
import re

import pytest
from conftest import unchecked

from cdist import tasks
from cdist.tasks import registry
from cdist.tasks.entity_tracking import OBJECTS
from cdist.tasks.theory_of_mind import CHARACTERS, STATES
from cdist.tokenizers import word_tokenizer

ET_TEMPLATE_NAMES = sorted(tasks.ET_TEMPLATES)
TOM_TEMPLATE_NAMES = sorted(tasks.TOM_TEMPLATES)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    return word_tokenizer(tasks.organism_vocabulary(), save_dir=tmp_path_factory.mktemp("word-tok"))


@pytest.fixture(scope="module")
def llama_tok():
    make = getattr(pytest.importorskip("cdist.tokenizers"), "llama3_tokenizer", None)
    if make is None:
        pytest.skip("cdist.tokenizers.llama3_tokenizer is not available")
    return make()


@pytest.fixture(params=["word", "llama3", pytest.param("smollm2", marks=pytest.mark.real)])
def any_tok(request):
    # SmolLM2: a BPE that adds no BOS and splits some default words.
    fixture = {"word": "word_tok", "llama3": "llama_tok", "smollm2": "smollm2_tokenizer"}
    return request.getfixturevalue(fixture[request.param])


def decoded(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).strip()


# ----------------------------------------------------------- independent parsers of the prompt text


def parse_et(prompt: str, template: str) -> tuple[dict[str, str], str]:
    """({label: object}, query label) read back from an entity-tracking prompt."""
    if template == "prakash":  # "The apple is in Box F, the pen is in Box Q. Box F contains the"
        context, query = prompt.rsplit(". ", 1)
        clauses = [c.split() for c in context.split(", ")]
        return {words[-1]: words[1] for words in clauses}, query.split()[1]
    # Short forms: " apple in F , pen in Q . F contains", " apple F , pen Q . F", ...: object
    # first, label last.
    context, query = prompt.rsplit(" . ", 1)
    clauses = [c.split() for c in context.strip().split(" , ")]
    return {words[-1]: words[0] for words in clauses}, query.split()[0]


TOM_PATTERNS = {
    "causaltom": (r"(\w+) grabs (?:an|another) opaque (\w+) and fills it with (\w+)\.",
                  r"(\w+) (can|cannot) observe (\w+)'s actions\."),
    "compact": (r"(\w+) fills (\w+) with (\w+) \.", r"(\w+) (can|cannot) observe (\w+) \."),
}


def tom_answer(prompt: str, template: str) -> str:
    """The belief asked for, re-derived from the story text."""
    fill, observe = TOM_PATTERNS[template]
    filled = {container: (who, state) for who, container, state in re.findall(fill, prompt)}
    sees = {(observer, actor) for observer, verb, actor in re.findall(observe, prompt)
            if verb == "can"}
    character, container = re.search(r"What does (\w+) believe the (\w+) contains", prompt).groups()
    filler, state = filled[container]
    return state if character == filler or (character, filler) in sees else "unknown"


# ----------------------------------------------------------- determinism and splits


@pytest.mark.parametrize("make", [tasks.entity_tracking, tasks.theory_of_mind])
def test_same_seed_same_items_and_prefix_stable(make, word_tok):
    a = make(40, tokenizer=word_tok, seed=1)
    assert a.to_dict() == make(40, tokenizer=word_tok, seed=1).to_dict()
    assert make(15, tokenizer=word_tok, seed=1)["prompt"] == a["prompt"][:15]
    assert make(40, tokenizer=word_tok, seed=2)["prompt"] != a["prompt"]


def test_entity_tracking_train_test_share_no_item(word_tok):
    # 5P3 * 4P3 * 3 queries = 4320 items: 2000 draws per split repeat items, so an overlap would
    # show.
    kw = dict(tokenizer=word_tok, n_boxes=3, template="compact", objects=OBJECTS[:5], labels="ABCD")
    keys = {}
    for split in ("train", "test"):
        data = tasks.entity_tracking(2000, split=split, **kw)
        rows = zip(data["objects"], data["labels"], data["query_label"], strict=True)
        keys[split] = {(tuple(o), tuple(la), q) for o, la, q in rows}
        assert len(keys[split]) < 2000
    assert keys["train"].isdisjoint(keys["test"])


def test_theory_of_mind_train_test_share_no_item(word_tok):
    kw = dict(tokenizer=word_tok, template="compact", characters=["Bob", "Carla"],
              containers=["cup", "jar"], states=["tea", "milk", "beer"])
    cols = ["characters", "containers", "states", "visibility", "query_character",
            "query_container"]
    keys = {}
    for split in ("train", "test"):
        data = tasks.theory_of_mind(2000, split=split, **kw)
        keys[split] = {tuple(map(str, row)) for row in zip(*(data[c] for c in cols), strict=True)}
    assert keys["train"] and keys["test"] and keys["train"].isdisjoint(keys["test"])


def test_item_split_is_stable_across_runs():
    # Pinned: a change of hash would silently move items between splits of saved experiments.
    assert tasks.item_split((["apple", "pen"], ["A", "B"], "A")) == "test"
    assert tasks.item_split((["apple", "pen"], ["A", "B"], "B")) == "train"


# ----------------------------------------------------------- entity tracking


@pytest.mark.parametrize("template", ET_TEMPLATE_NAMES)
def test_entity_tracking_answer_and_counterfactual_from_text(template, word_tok):
    data = tasks.entity_tracking(200, tokenizer=word_tok, template=template, seed=3)
    for row in data:
        boxes, query = parse_et(row["prompt"], template)
        assert len(boxes) == row["n_boxes"] == 7 and len(set(boxes.values())) == 7
        assert query == row["query_label"] and boxes[query] == row["answer"]
        corrupt_boxes, corrupt_query = parse_et(row["corrupt_prompt"], template)
        assert corrupt_query == query and query not in corrupt_boxes and len(corrupt_boxes) == 7


@pytest.mark.parametrize("template", ET_TEMPLATE_NAMES)
def test_entity_tracking_positions(template, any_tok):
    data = tasks.entity_tracking(50, tokenizer=any_tok, template=template, seed=4)
    for row in data:
        ids, c_ids = row["input_ids"], row["corrupt_input_ids"]
        assert row["pos_last"] == len(ids) - 1 == len(c_ids) - 1
        assert ids == any_tok(row["prompt"]).input_ids  # its own special tokens, BOS or none
        assert decoded(any_tok, ids[row["pos_query_label"]]) == row["query_label"]
        assert decoded(any_tok, ids[row["pos_prev_label"]]) == row["query_label"]
        assert ids[row["pos_prev_object"]] == row["answer_id"]
        assert decoded(any_tok, row["answer_id"]) == row["answer"]
        assert [decoded(any_tok, ids[p]) for p in row["pos_objects"]] == row["objects"]
        assert [decoded(any_tok, ids[p]) for p in row["pos_labels"]] == row["labels"]
        assert c_ids[row["pos_query_label"] - 1 :] == ids[row["pos_query_label"] - 1 :]


@pytest.mark.parametrize("template", ET_TEMPLATE_NAMES)
def test_context_and_query_tokens_concatenate_to_prompt(template, any_tok):
    row = tasks.entity_tracking(1, tokenizer=any_tok, template=template)[0]
    context = tasks.render_context(row["objects"], row["labels"], template)
    query = tasks.render_query(row["query_label"], template)
    assert context + query == row["prompt"]
    pieces = any_tok(context).input_ids + any_tok(query, add_special_tokens=False).input_ids
    assert pieces == row["input_ids"]


# ----------------------------------------------------------- theory of mind


@pytest.mark.parametrize("template", TOM_TEMPLATE_NAMES)
def test_theory_of_mind_answers_from_text(template, word_tok):
    data = tasks.theory_of_mind(300, tokenizer=word_tok, template=template, seed=5)
    for row in data:
        assert tom_answer(row["prompt"], template) == row["answer"]
        assert tom_answer(row["corrupt_prompt"], template) == row["corrupt_answer"]
        column_of = {"character": "query_character", "container": "query_container"}
        changed = column_of[row["corrupt_kind"]]
        clean_words, corrupt_words = row["prompt"].split(), row["corrupt_prompt"].split()
        diff = [(a, b) for a, b in zip(clean_words, corrupt_words, strict=True) if a != b]
        assert len(diff) == 1 and diff[0][0].startswith(row[changed])
    assert set(data["corrupt_kind"]) == {"character", "container"}


@pytest.mark.parametrize("template", TOM_TEMPLATE_NAMES)
def test_theory_of_mind_positions(template, any_tok):
    data = tasks.theory_of_mind(60, tokenizer=any_tok, template=template, seed=6)
    for row in data:
        ids, c_ids = row["input_ids"], row["corrupt_input_ids"]
        assert row["pos_last"] == len(ids) - 1 == len(c_ids) - 1
        assert ids == any_tok(row["prompt"]).input_ids
        assert decoded(any_tok, ids[row["pos_query_character"]]) == row["query_character"]
        assert decoded(any_tok, ids[row["pos_query_container"]]) == row["query_container"]
        assert [decoded(any_tok, ids[p]) for p in row["pos_story_characters"]] == row["characters"]
        assert [decoded(any_tok, ids[p]) for p in row["pos_story_containers"]] == row["containers"]
        assert [decoded(any_tok, ids[p]) for p in row["pos_story_states"]] == row["states"]
        if row["visibility"] == "none":
            assert row["pos_visibility"] is None
        else:
            assert decoded(any_tok, ids[row["pos_visibility"]]) == row["visibility"]
        assert decoded(any_tok, row["answer_id"]) == row["answer"]
        assert decoded(any_tok, row["corrupt_answer_id"]) == row["corrupt_answer"]


@pytest.mark.parametrize(
    ("visibility", "expected"),
    [(tasks.VISIBILITIES, 5 / 12), (("none",), 1 / 2), (("cannot",), 1 / 2), (("can",), 1 / 4),
     ({"none": 1, "can": 3}, (1 / 2 + 3 / 4) / 4)],
)
def test_unknown_rate_matches_documented_mix(visibility, expected, word_tok):
    data = tasks.theory_of_mind(1500, tokenizer=word_tok, template="compact", visibility=visibility)
    rate = sum(a == tasks.UNKNOWN for a in data["answer"]) / len(data)
    assert rate == pytest.approx(expected, abs=0.04)  # binomial sd is about 0.013
    assert set(data["visibility"]) == set(visibility)


# ----------------------------------------------------------- vocabularies and errors


@pytest.mark.parametrize(
    ("make", "template"),
    [(tasks.entity_tracking, t) for t in ET_TEMPLATE_NAMES]
    + [(tasks.theory_of_mind, t) for t in TOM_TEMPLATE_NAMES],
)
def test_organism_vocabulary_covers_every_token(make, template, word_tok):
    data = make(500, tokenizer=word_tok, template=template, seed=7)
    for ids in (*data["input_ids"], *data["corrupt_input_ids"]):
        assert word_tok.unk_token_id not in ids


def test_word_missing_from_word_vocabulary_is_named(tmp_path):
    words = [w for w in tasks.organism_vocabulary() if w not in ("apple", "coffee")]
    tok = word_tokenizer(words, save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"object 'apple' is not a single token .*<unk>"):
        tasks.entity_tracking(5, tokenizer=tok, objects=OBJECTS)
    with pytest.raises(ValueError, match="'coffee'"):
        tasks.theory_of_mind(5, tokenizer=tok, states=STATES)


def test_default_words_a_vocabulary_lacks_are_dropped(tmp_path):
    words = [w for w in tasks.organism_vocabulary() if w not in ("apple", "coffee")]
    tok = word_tokenizer(words, save_dir=tmp_path)
    assert tasks.default_words("entity_tracking", tok)["objects"].dropped == ("apple",)
    assert tasks.default_words("theory_of_mind", tok)["states"].dropped == ("coffee",)
    et = tasks.entity_tracking(300, tokenizer=tok, n_boxes=10)
    assert "apple" not in {o for row in [*et["objects"], *et["corrupt_objects"]] for o in row}
    tom = tasks.theory_of_mind(300, tokenizer=tok)
    assert "coffee" not in {s for row in tom["states"] for s in row}


@pytest.mark.parametrize(("make", "kwargs", "role", "kept", "needed"), [
    (tasks.entity_tracking, {}, "objects", 5, 7),
    (tasks.entity_tracking, {"n_boxes": 3}, "labels", 3, 4),
    (tasks.theory_of_mind, {}, "characters", 1, 2),
])
def test_too_few_single_token_default_words_is_one_line(make, kwargs, role, kept, needed,
                                                        tmp_path):
    defaults = tasks.get_task(make.__name__).word_lists[role]
    missing = set(defaults[kept:])
    tok = word_tokenizer([w for w in tasks.organism_vocabulary() if w not in missing],
                         save_dir=tmp_path)
    with pytest.raises(ValueError) as info:
        make(5, tokenizer=tok, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert f"{kept} of the {len(defaults)} default {role} are single tokens" in message
    assert f"an item needs {needed}; pass {role}=[...]" in message


def test_multi_token_word_in_bpe_vocabulary_is_named(llama_tok):
    with pytest.raises(ValueError, match=r"object 'lemonade' is not a single token .*splits into"):
        tasks.entity_tracking(5, tokenizer=llama_tok, objects=[*OBJECTS[:10], "lemonade"])
    with pytest.raises(ValueError, match="'lemonade'"):
        tasks.theory_of_mind(5, tokenizer=llama_tok, states=["tea", "lemonade"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(template="nope"), dict(split="dev"), dict(n_boxes=26), dict(n_boxes=1),
     dict(objects=["apple", "pen", "apple"], n_boxes=2)],
)
def test_entity_tracking_bad_options(kwargs, word_tok):
    with pytest.raises(ValueError):
        tasks.entity_tracking(3, tokenizer=word_tok, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(template="nope"), dict(visibility=("sometimes",)), dict(visibility=()),
     dict(corrupt="state"), dict(states=["tea", "unknown"]), dict(characters=["Bob", "cup"])],
)
def test_theory_of_mind_bad_options(kwargs, word_tok):
    with pytest.raises(ValueError):
        tasks.theory_of_mind(3, tokenizer=word_tok, **kwargs)


# ----------------------------------------------------------- default words by tokenizer

GENERATORS = {"entity_tracking": tasks.entity_tracking, "theory_of_mind": tasks.theory_of_mind}

# sha256 of ``make(50, tokenizer=word_tok, seed=3).to_dict()`` (JSON, sorted keys), computed before
# default words could be dropped: a tokenizer that keeps them all must draw the very same items.
ORGANISM_ITEMS_SHA256 = {
    "entity_tracking": "746281a21a48ad4ad481515d8e79c304d2644cc646fcf30cda735c6b43dae8c2",
    "theory_of_mind": "ba46a9aa76d9a75e89b117e75d92840995b34917713fd414400ad06121011029",
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_organism_tokenizer_items_are_unchanged(name, word_tok):
    data = GENERATORS[name](50, tokenizer=word_tok, seed=3).to_dict()
    # a column added later (entity tracking's contrast_id, the next box's object) changes nothing
    # the organisms were trained on
    contrast = data.pop("contrast_id", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert digest == ORGANISM_ITEMS_SHA256[name]
    if contrast is not None:
        ids = {o: word_tok.convert_tokens_to_ids(o) for objs in data["objects"] for o in objs}
        assert contrast == [ids[objs[(q + 1) % len(objs)]]
                            for objs, q in zip(data["objects"], data["query_index"], strict=True)]


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_word_lists_name_the_generators_arguments(name, word_tok):
    task = tasks.get_task(name)
    arguments = inspect.signature(task.generate).parameters
    assert task.word_lists and set(task.word_lists) <= set(arguments)
    assert tasks.default_words(task, word_tok) == tasks.default_words(name, word_tok)
    with pytest.raises(tasks.UnknownTaskError):
        tasks.default_words("greater_than", word_tok)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_defaults_are_the_kept_words_in_order(name, any_tok):
    # Passing the kept words explicitly draws the same items: the defaults are filtered, not
    # reordered (rng.sample depends on the order).
    choices = tasks.default_words(name, any_tok)
    for role, choice in choices.items():
        default = tasks.get_task(name).word_lists[role]
        assert choice.kept == tuple(w for w in default if w not in choice.dropped)
        assert set(choice.dropped) <= set(default)
    make = GENERATORS[name]
    explicit = {role: choice.kept for role, choice in choices.items()}
    assert (make(30, tokenizer=any_tok, seed=8).to_dict()
            == make(30, tokenizer=any_tok, seed=8, **explicit).to_dict())


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_organism_and_llama3_tokenizers_drop_nothing(name, word_tok, llama_tok):
    for tok in (word_tok, llama_tok):
        choices = tasks.default_words(name, tok)
        assert choices == {role: tasks.WordChoice(kept=tuple(words), dropped=())
                           for role, words in tasks.get_task(name).word_lists.items()}


SMOLLM2_DROPPED = {
    "entity_tracking": {"objects": {"scarf"}, "labels": set()},
    "theory_of_mind": {"characters": {"Carla"}, "containers": {"mug"},
                       "states": {"cola", "vodka", "champagne", "espresso"}},
}


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_smollm2_drops_exactly_its_multi_token_defaults(name, smollm2_tokenizer):
    choices = tasks.default_words(name, smollm2_tokenizer)
    assert {role: set(c.dropped) for role, c in choices.items()} == SMOLLM2_DROPPED[name]
    for choice in choices.values():
        for word in choice.kept:
            tasks.single_token_id(smollm2_tokenizer, word)
        for word in choice.dropped:
            with pytest.raises(ValueError, match=f"'{word}' is not a single token"):
                tasks.single_token_id(smollm2_tokenizer, word)


@pytest.mark.real
def test_smollm2_adds_no_bos(smollm2_tokenizer):
    # So the position tests over ``any_tok`` cover prompts that start with the first word's token.
    assert smollm2_tokenizer("").input_ids == []
    for make in GENERATORS.values():
        ids = make(3, tokenizer=smollm2_tokenizer)["input_ids"]
        assert all(row[0] not in smollm2_tokenizer.all_special_ids for row in ids)


@pytest.mark.real
@pytest.mark.parametrize(("make", "kwargs", "word"), [
    (tasks.entity_tracking, {"objects": OBJECTS}, "scarf"),
    (tasks.theory_of_mind, {"characters": CHARACTERS}, "Carla"),
    (tasks.theory_of_mind, {"containers": ["cup", "mug"]}, "mug"),
    (tasks.theory_of_mind, {"states": ["tea", "cola"]}, "cola"),
])
def test_smollm2_explicit_lists_stay_strict(make, kwargs, word, smollm2_tokenizer):
    with pytest.raises(ValueError, match=rf"'{word}' is not a single token .*splits into"):
        make(5, tokenizer=smollm2_tokenizer, **kwargs)


# ----------------------------------------------------------- the registry


def test_get_task_returns_the_registered_records():
    generators = {"entity_tracking": tasks.entity_tracking, "theory_of_mind": tasks.theory_of_mind}
    for name, make in generators.items():
        task = tasks.get_task(name)
        assert task is tasks.TASKS[name] and task.name == name and task.generate is make
        assert tasks.get_task(task) is task  # a record passes through
    et, tom = tasks.get_task("entity_tracking"), tasks.get_task("theory_of_mind")
    assert et.discovery_methods == ("path_patching", "mean_ablation")
    assert tom.discovery_methods == ("mean_ablation",)
    assert (et.real_template, tom.real_template) == ("prakash", "causaltom")
    assert (et.table_stem, tom.table_stem) == ("table1-entity-tracking", "table2-theory-of-mind")
    assert (et.curriculum, et.warmup_boxes) == (True, None)
    assert (tom.curriculum, tom.warmup_boxes) == (False, 2)


def test_unknown_task_names_the_registered_ones():
    with pytest.raises(tasks.UnknownTaskError) as info:
        tasks.get_task("greater_than")
    assert isinstance(info.value, ValueError)
    assert "'greater_than'" in str(info.value) and "'entity_tracking'" in str(info.value)
    assert "'theory_of_mind'" in str(info.value) and "'ioi'" in str(info.value)


def _toy(**changes) -> tasks.Task:
    fields = dict(name="toy", generate=tasks.entity_tracking, templates=tasks.ET_TEMPLATES,
                  real_template="prakash", discovery_method="mean_ablation",
                  discovery_methods=("mean_ablation",), table_stem="table-toy")
    return tasks.Task(**{**fields, **changes})


def test_a_task_registers_once(monkeypatch, word_tok):
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))  # restored after the test
    toy = registry.register(_toy())
    assert tasks.get_task("toy") is toy
    assert toy.items(3, tokenizer=word_tok, seed=1)["prompt"] == tasks.entity_tracking(
        3, tokenizer=word_tok, seed=1)["prompt"]
    with pytest.raises(ValueError, match="'toy' is already registered"):
        registry.register(_toy())
    with pytest.raises(ValueError, match="'entity_tracking' is already registered"):
        registry.register(_toy(name="entity_tracking"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"discovery_method": "greedy"}, "discovery method 'greedy'"),
    ({"discovery_methods": ("path_patching", "mean_ablation")}, "must start with 'mean_ablation'"),
    ({"discovery_method": "path_patching", "discovery_methods": ("path_patching",)},
     "names no search"),
    ({"real_template": "causaltom"}, "real_template 'causaltom' is not a template"),
    ({"table_stem": ""}, "table_stem is empty"),
    ({"default_models": ("et-teacher",)}, "give (teacher, student)"),
    ({"organism_rows": "stories"}, "organism_rows 'stories'"),
    ({"warmup_boxes": 1}, "warmup_boxes 1"),
    ({"curriculum": True}, "not in organism_kwargs"),
])
def test_task_refuses_inconsistent_records(changes, message):
    # Its own checks, as a caller without the type checker meets them.
    with unchecked(), pytest.raises(ValueError, match=re.escape(message)):
        _toy(**changes)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_item_counts_are_whole_and_positive(tok, n):
    from cdist.errors import InputError

    for generate in (tasks.entity_tracking, tasks.theory_of_mind):
        with unchecked(), pytest.raises(InputError, match="at least 1"):
            generate(n, tokenizer=tok)
