"""Theory of mind: what does a character believe an opaque container holds?

The CausalToM stories of Prakash et al. (2025, "Language models use lookbacks to track beliefs"):
two characters each fill one opaque container with a drink; a visibility sentence may say that one
can watch the other; the question asks what a character believes a container holds::

    Bob and Carla are working in a busy restaurant. To complete an order, Bob grabs an opaque cup
    and fills it with coffee. Then Carla grabs another opaque bottle and fills it with tea. Carla
    cannot observe Bob's actions. Bob can observe Carla's actions.
    Question: What does Bob believe the bottle contains?
    Answer:  ->  " tea"

A character believes the true state of a container they filled themselves, or of one filled by
someone whose actions they can observe; otherwise the answer is "unknown". Only the *first*
character can ever observe the other, as in CausalToM, whose stated-visibility stories say "<second>
cannot observe <first>'s actions." followed by "<first> can/cannot observe <second>'s actions.":

===========  ==========================================  ======================
visibility   what the story says                          share of "unknown"
===========  ==========================================  ======================
"none"       nothing                                      1/2
"cannot"     neither can observe the other               1/2
"can"        the first observes the second (only)        1/4
===========  ==========================================  ======================

The queried character and container are uniform, so with the default mix (the three conditions
equally often) 5/12 of the answers are "unknown"; the rest are the queried container's drink.

Counterfactuals (``corrupt_*`` columns) keep the story and swap the queried character (``corrupt=
"character"``) or the queried container (``"container"``); ``"random"`` (default) picks one per
item. The corrupt answer follows from the same story logic and may equal the clean one (for "can":
the second character's own container is known to both).

Choices that are ours:
- The "causaltom" template's instruction paraphrases the CausalToM instruction; its prompt format is
  "Instruction: ... Story: ... Question: ... Answer:".
- The "compact" organism template is one token per word and states only the first character's
  visibility: ``" Bob fills cup with coffee . Carla fills bottle with tea . Bob can observe Carla .
  What does Bob believe the bottle contains ?"`` -> ``"tea"``. It begins with a space so that, under
  a BPE tokenizer, every word is its " word" token.
- Story positions (``pos_story_*``) are the mentions in the two filling sentences, in story order.
- The item key is (characters, containers, states, visibility, query character, query container).
- Default words are one token both in the word-level vocabulary and, after a space, in Llama-3. A
  tokenizer that splits some of them draws from the rest (a smaller BPE vocabulary such as
  SmolLM2's splits a few names and drinks; ``default_words`` lists what is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

CHARACTERS = (
    "Alice", "Anna", "Ben", "Bob", "Carla", "Chris", "Dan", "David", "Emma", "Eric", "Eva",
    "Frank", "Grace", "Greg", "Hannah", "Helen", "Jack", "James", "Jane", "John", "Julia", "Kate",
    "Laura", "Leo", "Lisa", "Lucy", "Mark", "Mary", "Max", "Mike", "Nick", "Nina", "Noah", "Oscar",
    "Paul", "Peter", "Rachel", "Ryan", "Sam", "Sarah", "Sofia", "Steve", "Tim", "Tom", "Tony",
    "Victor",
)
CONTAINERS = (
    "cup", "bottle", "glass", "jar", "jug", "mug", "bowl", "flask", "pitcher", "kettle", "pot",
    "bucket", "barrel", "tub",
)
STATES = (
    "coffee", "tea", "water", "milk", "juice", "beer", "wine", "soda", "cola", "cocoa", "whiskey",
    "vodka", "rum", "gin", "champagne", "cider", "espresso",
)
UNKNOWN = "unknown"
VISIBILITIES = ("none", "cannot", "can")

_INSTRUCTION = (
    "Instruction: Keep track of what each character believes. A character knows what is in a "
    "container only if they filled it themselves or can observe the person who filled it. A "
    "character who cannot observe an action has no belief about that container. Answer with what "
    "the character in the question believes the container holds; if they have no belief about it, "
    "answer 'unknown'. Never answer with a character or a container.\n\nStory: "
)


@dataclass(frozen=True)
class TheoryOfMindTemplate:
    """How a theory-of-mind prompt is worded.

    The prompt is ``preamble + intro + first_action + second_action + visibility + question``.
    ``intro`` has ``{first}`` and ``{second}``; the actions ``{character}``, ``{container}``,
    ``{state}``; ``observe`` ``{observer}``, ``{verb}`` ("can" or "cannot") and ``{actor}``;
    ``question`` ``{character}`` and ``{container}``. With ``state_reverse`` a stated visibility is
    preceded by "second cannot observe first".
    """

    name: str
    preamble: str
    intro: str
    first_action: str
    second_action: str
    observe: str
    state_reverse: bool
    question: str


TOM_TEMPLATES: dict[str, TheoryOfMindTemplate] = {
    "causaltom": TheoryOfMindTemplate(
        name="causaltom",
        preamble=_INSTRUCTION,
        intro="{first} and {second} are working in a busy restaurant. To complete an order,",
        first_action=" {character} grabs an opaque {container} and fills it with {state}.",
        second_action=(" Then {character} grabs another opaque {container} and fills it with "
                       "{state}."),
        observe=" {observer} {verb} observe {actor}'s actions.",
        state_reverse=True,
        question="\nQuestion: What does {character} believe the {container} contains?\nAnswer:",
    ),
    "compact": TheoryOfMindTemplate(
        name="compact",
        preamble="",
        intro="",
        first_action=" {character} fills {container} with {state} .",
        second_action=" {character} fills {container} with {state} .",
        observe=" {observer} {verb} observe {actor} .",
        state_reverse=False,
        question=" What does {character} believe the {container} contains ?",
    ),
}


def theory_of_mind_words() -> tuple[list[str], list[str], list[str]]:
    """The default (characters, containers, states) word lists."""
    return list(CHARACTERS), list(CONTAINERS), list(STATES)


def get_template(template: str | TheoryOfMindTemplate) -> TheoryOfMindTemplate:
    if isinstance(template, TheoryOfMindTemplate):
        return template
    if template not in TOM_TEMPLATES:
        raise InputError(f"unknown theory-of-mind template {template!r}; "
                         f"choose from {sorted(TOM_TEMPLATES)}")
    return TOM_TEMPLATES[template]


def belief(
    characters: Sequence[str], containers: Sequence[str], states: Sequence[str], visibility: str,
    query_character: str, query_container: str,
) -> str:
    """What ``query_character`` believes ``query_container`` holds: its state, or "unknown"."""
    filler = containers.index(query_container)  # character i filled container i
    sees_filler = visibility == "can" and characters.index(query_character) == 0 and filler == 1
    return states[filler] if characters[filler] == query_character or sees_filler else UNKNOWN


def _story(prompt: Prompt, characters, containers, states, visibility: str,
           t: TheoryOfMindTemplate) -> None:
    first, second = characters
    prompt.add(t.preamble)
    prompt.add(t.intro, tag="_intro", first=first, second=second)
    for i, action in enumerate((t.first_action, t.second_action)):
        prompt.add(action, tag=str(i), character=characters[i], container=containers[i],
                   state=states[i])
    if visibility != "none":
        if t.state_reverse:
            prompt.add(t.observe, tag="_reverse", observer=second, verb="cannot", actor=first)
        prompt.add(t.observe, observer=first, verb=visibility, actor=second)


def _prompt(characters, containers, states, visibility, query_character, query_container,
            t) -> Prompt:
    prompt = Prompt()
    _story(prompt, characters, containers, states, visibility, t)
    prompt.add(t.question, tag="_query", character=query_character, container=query_container)
    return prompt


def render_story(
    characters: Sequence[str], containers: Sequence[str], states: Sequence[str], visibility: str,
    template: str | TheoryOfMindTemplate,
) -> str:
    """The story (preamble included): character i fills container i with state i."""
    prompt = Prompt()
    _story(prompt, characters, containers, states, visibility, get_template(template))
    return prompt.text


def render_question(character: str, container: str, template: str | TheoryOfMindTemplate) -> str:
    """The question (append it to a story)."""
    prompt = Prompt()
    prompt.add(get_template(template).question, character=character, container=container)
    return prompt.text


def render_theory_of_mind(
    characters: Sequence[str], containers: Sequence[str], states: Sequence[str], visibility: str,
    query_character: str, query_container: str, template: str | TheoryOfMindTemplate,
) -> str:
    """A whole prompt: ``render_story(...) + render_question(...)``."""
    t = get_template(template)
    story = (characters, containers, states, visibility)
    return _prompt(*story, query_character, query_container, t).text


def _visibility_mix(
    visibility: Sequence[str] | Mapping[str, float],
) -> tuple[list[str], list[float]]:
    mix = dict(visibility) if isinstance(visibility, Mapping) else dict.fromkeys(visibility, 1.0)
    bad = [v for v in mix if v not in VISIBILITIES]
    if bad or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise InputError(
            f"visibility {visibility!r} is not a non-empty choice of {VISIBILITIES} (a tuple, or a "
            "mapping to non-negative weights); e.g. visibility=('none', 'can')"
        )
    return list(mix), list(mix.values())


def distinct_items(words: dict[str, int], visibility=VISIBILITIES, **_) -> int:
    """How many distinct items (keys) ``words`` (role -> how many words) make: two ordered
    characters, containers and states, a visibility condition, the queried character and
    container."""
    stories = perm(words["characters"], 2) * perm(words["containers"], 2) * perm(words["states"], 2)
    return stories * len(visibility) * 2 * 2


def theory_of_mind(
    n: int,
    *,
    tokenizer,
    seed: int = 0,
    split: str = "train",
    template: str | TheoryOfMindTemplate = "causaltom",
    visibility: Sequence[str] | Mapping[str, float] = VISIBILITIES,
    corrupt: str = "random",
    characters: Sequence[str] | None = None,
    containers: Sequence[str] | None = None,
    states: Sequence[str] | None = None,
) -> Dataset:
    """Generate ``n`` CausalToM-style items of one split, with their counterfactuals.

    Args:
        n: number of items.
        tokenizer: any fast Hugging Face tokenizer (the word-level organism tokenizer, Llama-3's,
            SmolLM2's, ...); prompts get the special tokens it adds (a BOS or none).
        seed: the same (seed, split, arguments, kept default words) always gives the same items.
        split: "train" or "test"; the two never share an item.
        template: a name in ``TOM_TEMPLATES`` or a template.
        visibility: the conditions to draw from, equally often (a tuple) or with weights (a mapping
            such as ``{"none": 1, "can": 2}``). See the module docstring for the share of "unknown"
            answers.
        corrupt: what the counterfactual swaps: "character", "container", or "random" (either, per
            item).
        characters, containers, states: word lists, each word a single token, at least two
            each. Defaults: the words of ``CHARACTERS``, ``CONTAINERS``, ``STATES`` that are
            single tokens for ``tokenizer``.

    Returns:
        A Dataset with columns prompt, answer, input_ids, answer_id, corrupt_prompt,
        corrupt_input_ids, corrupt_answer, corrupt_answer_id, corrupt_kind, pos_last,
        pos_query_character, pos_query_container, pos_story_characters, pos_story_containers,
        pos_story_states (two each, story order), pos_visibility (the first character's
        "can"/"cannot"; None without a visibility sentence), characters, containers, states,
        visibility, query_character, query_container, template. Stories with and without a
        visibility sentence differ in length; clean and corrupt prompts of one item never do.

    Raises:
        ValueError: on a word of a given list that is not a single token (the message names it),
            default lists with fewer than two single-token words, or bad options.
    """
    check_request(n, split, tokenizer=tokenizer, seed=seed)
    t = get_template(template)
    conditions, weights = _visibility_mix(visibility)
    if corrupt not in ("character", "container", "random"):
        raise InputError(f"corrupt={corrupt!r}; choose 'character', 'container' or 'random'")
    words, answer_ids = _checked_words(tokenizer, characters, containers, states)
    rng = task_rng("theory_of_mind", seed, split)
    items = _draw_items(n, split, rng, words, conditions, weights, corrupt)
    clean = [_prompt(*item, t) for item, _, _ in items]
    corrupted = [_prompt(*item[:4], *swapped, t) for item, _, swapped in items]
    encoded = zip(encode(tokenizer, clean), encode(tokenizer, corrupted), strict=True)
    rows = [_row(*item, c.text, x.text, *enc, answer_ids, t.name)
            for item, c, x, enc in zip(items, clean, corrupted, encoded, strict=True)]
    from datasets import Dataset

    return Dataset.from_list(rows)


def _checked_words(tokenizer, characters, containers,
                   states) -> tuple[tuple[list, list, list], dict]:
    """The three word lists (defaults filled in), each word a single token and in one role only,
    and the token id of every possible answer."""
    characters = default_or_given(tokenizer, characters, CHARACTERS, "character", 2)
    containers = default_or_given(tokenizer, containers, CONTAINERS, "container", 2)
    states = default_or_given(tokenizer, states, STATES, "state", 2)
    clash = (set(characters) & set(containers) | set(characters) & set(states)
             | set(containers) & set(states) | {UNKNOWN} & set(states))
    if clash:
        raise InputError(f"words {sorted(clash)} play two roles; keep the lists apart")
    answer_ids = {w: single_token_id(tokenizer, w) for w in (*states, UNKNOWN)}
    for role, words in (("character", characters), ("container", containers)):
        for w in words:
            single_token_id(tokenizer, w, role=role)
    return (characters, containers, states), answer_ids


def _draw_items(n: int, split: str, rng, words: tuple[list, list, list], conditions: list[str],
                weights: list[float], corrupt: str) -> list[tuple[tuple, str, tuple[str, str]]]:
    """``n`` items of ``split``, each ``(story and query, corrupt kind, swapped query)``.

    One ``rng`` draws the stories and the corrupt kinds, interleaved (``draw_split`` proposes
    lazily), so the order of the draws below is part of what a seed means."""
    characters, containers, states = words

    def propose() -> tuple:
        chars, conts = rng.sample(characters, 2), rng.sample(containers, 2)
        sts = rng.sample(states, 2)
        vis = rng.choices(conditions, weights)[0]
        return chars, conts, sts, vis, rng.choice(chars), rng.choice(conts)

    items = []
    for item in draw_split(n, split, propose, key=lambda it: it):
        chars, conts, _, _, q_char, q_cont = item
        kind = rng.choice(("character", "container")) if corrupt == "random" else corrupt
        if kind == "character":
            swapped = (chars[1 - chars.index(q_char)], q_cont)
        else:
            swapped = (q_char, conts[1 - conts.index(q_cont)])
        items.append((item, kind, swapped))
    return items


def _row(item: tuple, kind: str, swapped: tuple[str, str], text: str, corrupt_text: str,
         clean: tuple[list[int], dict], corrupt: tuple[list[int], dict], answer_ids: dict[str, int],
         template: str) -> dict:
    """One dataset row from an item and its encoded clean and corrupt prompts."""
    (ids, pos), (c_ids, c_pos) = clean, corrupt
    chars, conts, sts, vis, q_char, q_cont = item
    if len(c_ids) != len(ids) or c_pos != pos:
        raise InputError(
            f"clean and corrupt prompts tokenize to different lengths ({len(ids)} vs "
            f"{len(c_ids)}); use single-token characters and containers"
        )
    answer, c_answer = belief(*item), belief(*item[:4], *swapped)
    return {
        "prompt": text,
        "answer": answer,
        "input_ids": ids,
        "answer_id": answer_ids[answer],
        "corrupt_prompt": corrupt_text,
        "corrupt_input_ids": c_ids,
        "corrupt_answer": c_answer,
        "corrupt_answer_id": answer_ids[c_answer],
        "corrupt_kind": kind,
        "pos_last": len(ids) - 1,
        "pos_query_character": pos["character_query"],
        "pos_query_container": pos["container_query"],
        "pos_story_characters": [pos["character0"], pos["character1"]],
        "pos_story_containers": [pos["container0"], pos["container1"]],
        "pos_story_states": [pos["state0"], pos["state1"]],
        "pos_visibility": pos.get("verb"),
        "characters": chars,
        "containers": conts,
        "states": sts,
        "visibility": vis,
        "query_character": q_char,
        "query_container": q_cont,
        "template": template,
    }


TASK = register(Task(
    name="theory_of_mind", generate=theory_of_mind, templates=TOM_TEMPLATES,
    real_template="causaltom",
    discovery_method="mean_ablation", discovery_methods=("mean_ablation",),
    table_stem="table2-theory-of-mind",
    # Its stories bind two containers to two states, so its entity-tracking warm-up uses two boxes.
    default_models=("tom-teacher", "tom-student"), warmup_boxes=2,
    word_lists={"characters": CHARACTERS, "containers": CONTAINERS, "states": STATES},
    distinct=distinct_items,
    # the answer is one of the story's two states or "unknown"
    chance=lambda items: sum(1 / (len(s) + 1) for s in items["states"]) / len(items),
))
