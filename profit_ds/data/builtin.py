"""The built-in SNI-like task suite: 8 categories x 3 tasks, generated deterministically, offline.

It mirrors Super-NaturalInstructions' shape (task name, natural-language Definition, Categories,
Positive Examples, Instances with one or more reference outputs) so that the same pipeline runs
on it and on real SNI.

Why the three tasks of a category share one Definition: in SNI, many tasks ask the same thing
but answer with their own conventions (sentiment as "positive"/"negative" in one task and
"POS"/"NEG" in another, a title as a phrase or as a sentence). Here each category has one
instruction and each task its own output convention, which the Definition does not spell out.
A global prompt cannot satisfy every convention at once; a client's personalized prompt can
learn its own. That is exactly the personalization-versus-robustness tension Profit measures.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from profit_ds.data.types import Instance, Task

NAMES = ["anna", "bob", "carl", "dina", "emma", "frank", "gina", "hugo", "iris", "jack",
         "kate", "liam", "mia", "nora", "omar", "paul"]
PLACES = ["kitchen", "garden", "office", "school", "park", "station", "library", "market",
          "beach", "garage", "bakery", "museum"]
POSITIVE = ["great", "lovely", "excellent", "wonderful", "pleasant", "perfect", "fantastic", "nice"]
NEGATIVE = ["awful", "terrible", "horrible", "boring", "dreadful", "poor", "rude", "nasty"]
THINGS = ["food", "service", "movie", "hotel", "music", "staff", "room", "book", "trip", "game"]
TOPICS = {
    "sports": ["team", "match", "goal", "coach", "league", "player", "score", "stadium"],
    "business": ["market", "profit", "shares", "bank", "company", "price", "trade", "budget"],
    "science": ["atoms", "planet", "cells", "energy", "physics", "genes", "orbit", "lab"],
}
FILLER = ["the", "new", "big", "today", "reported", "after", "said", "with", "about", "report"]
ADJECTIVES = ["old", "young", "quiet", "clever", "tall", "happy", "brave", "small"]
NOUNS = ["farmer", "doctor", "teacher", "baker", "pilot", "singer", "writer", "driver"]
VERBS = ["sold", "bought", "painted", "found", "lost", "fixed", "built", "cleaned"]
OBJECTS = ["tractor", "house", "boat", "bike", "piano", "clock", "fence", "car"]
ANIMALS = {"dog": {"run", "swim", "bark"}, "cat": {"run", "climb", "jump"},
           "fish": {"swim"}, "bird": {"fly", "sing", "jump"}, "horse": {"run", "jump"},
           "duck": {"fly", "swim"}, "snake": {"swim", "climb"}, "frog": {"jump", "swim"}}
ABILITIES = ["run", "swim", "fly", "bark", "climb", "jump", "sing"]


@dataclass(frozen=True)
class CategorySpec:
    """A category: one shared instruction, an input generator, and three output conventions.

    `generate(rng)` returns (input text, facts); each convention maps the facts to the list of
    reference outputs.
    """

    name: str
    definition: str
    generate: Callable[[random.Random], tuple[str, dict]]
    conventions: dict[str, Callable[[dict], list[str]]]


def _sentiment(rng: random.Random) -> tuple[str, dict]:
    positive = rng.random() < 0.5
    words = POSITIVE if positive else NEGATIVE
    a, b = rng.sample(words, 2)
    t1, t2 = rng.sample(THINGS, 2)
    return f"the {t1} was {a} and the {t2} was {b} .", {"positive": positive}


def _topic(rng: random.Random) -> tuple[str, dict]:
    topic = rng.choice(sorted(TOPICS))
    words = rng.sample(TOPICS[topic], 3) + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words) + " .", {"topic": topic}


def _numbers(rng: random.Random) -> tuple[str, dict]:
    xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 6))]
    return "[" + ", ".join(map(str, xs)) + "]", {"xs": xs}


def _story(rng: random.Random) -> tuple[str, dict]:
    people = rng.sample(NAMES, 3)
    places = rng.sample(PLACES, 3)
    asked = rng.randrange(3)
    facts = " ".join(f"{p} is in the {q} ." for p, q in zip(people, places))
    return f"{facts} where is {people[asked]} ?", {"who": people[asked], "where": places[asked]}


def _headline(rng: random.Random) -> tuple[str, dict]:
    f = {"adj": rng.choice(ADJECTIVES), "noun": rng.choice(NOUNS), "verb": rng.choice(VERBS),
         "obj": rng.choice(OBJECTS), "place": rng.choice(PLACES)}
    return f"the {f['adj']} {f['noun']} {f['verb']} a {f['obj']} near the {f['place']} .", f


def _trip(rng: random.Random) -> tuple[str, dict]:
    who, friend = rng.sample(NAMES, 2)
    place = rng.choice(PLACES)
    return f"{who} went to the {place} with {friend} .", {"who": who, "friend": friend,
                                                          "place": place}


def _ability(rng: random.Random) -> tuple[str, dict]:
    animal = rng.choice(sorted(ANIMALS))
    ability = rng.choice(ABILITIES)
    return f"a {animal} can {ability} .", {"true": ability in ANIMALS[animal]}


def _answerable(rng: random.Random) -> tuple[str, dict]:
    people = rng.sample(NAMES, 3)
    places = rng.sample(PLACES, 2)
    answerable = rng.random() < 0.5
    asked = people[rng.randrange(2)] if answerable else people[2]
    facts = f"{people[0]} is in the {places[0]} . {people[1]} is in the {places[1]} ."
    return f"{facts} question : where is {asked} ?", {"answerable": answerable}


def _yes_no(key: str, yes: str, no: str) -> Callable[[dict], list[str]]:
    return lambda f: [yes if f[key] else no]


CATEGORIES: list[CategorySpec] = [
    CategorySpec(
        "Sentiment Analysis",
        "Given a short review, classify the sentiment it expresses.",
        _sentiment,
        {"binary": _yes_no("positive", "positive", "negative"),
         "mood": _yes_no("positive", "happy", "sad"),
         "stars": _yes_no("positive", "five stars", "one star")}),
    CategorySpec(
        "Text Categorization",
        "Classify the news sentence into its topic.",
        _topic,
        {"name": lambda f: [f["topic"]],
         "letter": lambda f: [{"sports": "a", "business": "b", "science": "c"}[f["topic"]]],
         "section": lambda f: [{"sports": "sports page", "business": "money page",
                                "science": "tech page"}[f["topic"]]]}),
    CategorySpec(
        "Program Execution",
        "You are given a list of numbers. Return the requested elements of the list.",
        _numbers,
        {"first_two": lambda f: [", ".join(map(str, f["xs"][:2]))],
         "last_two": lambda f: [", ".join(map(str, f["xs"][-2:]))],
         "max": lambda f: [str(max(f["xs"]))]}),
    CategorySpec(
        "Question Answering",
        "Read the story and answer the question about it.",
        _story,
        {"place": lambda f: [f["where"], f"the {f['where']}"],
         "sentence": lambda f: [f"{f['who']} is in the {f['where']}"],
         "phrase": lambda f: [f"in the {f['where']}"]}),
    CategorySpec(
        "Title Generation",
        "Write a short title for the given sentence.",
        _headline,
        {"action": lambda f: [f"{f['noun']} {f['verb']} {f['obj']}"],
         "person": lambda f: [f"the {f['adj']} {f['noun']}"],
         "location": lambda f: [f"{f['obj']} near the {f['place']}"]}),
    CategorySpec(
        "Question Generation",
        "Write a question about the given sentence.",
        _trip,
        {"where": lambda f: [f"where did {f['who']} go ?"],
         "who": lambda f: [f"who went to the {f['place']} ?"],
         "whom": lambda f: [f"with whom did {f['who']} go ?"]}),
    CategorySpec(
        "Commonsense Classification",
        "Decide whether the statement about the animal is plausible.",
        _ability,
        {"yes_no": _yes_no("true", "yes", "no"),
         "true_false": _yes_no("true", "true", "false"),
         "plausible": _yes_no("true", "plausible", "implausible")}),
    CategorySpec(
        "Answerability Classification",
        "Decide whether the question can be answered from the story.",
        _answerable,
        {"yes_no": _yes_no("answerable", "yes", "no"),
         "words": _yes_no("answerable", "answerable", "unanswerable"),
         "digits": _yes_no("answerable", "1", "0")}),
]


def task_name(index: int, category: CategorySpec, convention: str) -> str:
    slug = category.name.lower().replace(" ", "_")
    return f"task{index:03d}_{slug}_{convention}"


def builtin_tasks(instances_per_task: int = 100, seed: int = 1234) -> list[Task]:
    """All 24 built-in tasks, each with `instances_per_task` instances.

    Instance `i` of a task depends only on (seed, task index, i): the suite is identical on
    every machine and a larger `instances_per_task` extends it without changing earlier ones.
    """
    tasks = []
    index = 0
    for category in CATEGORIES:
        for convention, answer in category.conventions.items():
            index += 1
            name = task_name(index, category, convention)
            instances = []
            for i in range(instances_per_task):
                rng = random.Random(f"{seed}/{index}/{i}")
                text, facts = category.generate(rng)
                instances.append(Instance(id=f"{name}-{i}", input=text,
                                          outputs=tuple(answer(facts))))
            demo_rng = random.Random(f"{seed}/{index}/demo")
            demo_input, demo_facts = category.generate(demo_rng)
            tasks.append(Task(name=name, definition=category.definition,
                              categories=(category.name,), instances=instances,
                              positive_examples=[{"input": demo_input,
                                                  "output": answer(demo_facts)[0],
                                                  "explanation": ""}],
                              source="builtin"))
    return tasks
