"""Task generators (determinism, disjoint splits, answers re-derived from the prompt text, token
positions) and the task registry."""

from __future__ import annotations

import re

import pytest
from conftest import unchecked

from cdist import tasks
from cdist.tasks import registry
from cdist.tasks.entity_tracking import OBJECTS
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


@pytest.fixture(params=["word", "llama3"])
def any_tok(request):
    return request.getfixturevalue({"word": "word_tok", "llama3": "llama_tok"}[request.param])


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
        assert ids[0] == any_tok.bos_token_id
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
    with pytest.raises(ValueError, match=r"answer 'apple' is not a single token .*<unk>"):
        tasks.entity_tracking(5, tokenizer=tok)
    with pytest.raises(ValueError, match="'coffee'"):
        tasks.theory_of_mind(5, tokenizer=tok)


def test_multi_token_word_in_bpe_vocabulary_is_named(llama_tok):
    with pytest.raises(ValueError, match=r"answer 'lemonade' is not a single token .*splits into"):
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
        tasks.get_task("ioi")
    assert isinstance(info.value, ValueError)
    assert "'ioi'" in str(info.value) and "'entity_tracking'" in str(info.value)
    assert "'theory_of_mind'" in str(info.value)


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
