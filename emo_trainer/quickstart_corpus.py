"""The embedded quickstart corpus (``data.dataset: builtin:quickstart``).

A seeded generator of short English-like stories from a small grammar: each document
has a cast of named characters, places and objects that recur across its sentences, so
a tiny model can learn both local syntax and document-level consistency within a few
hundred steps on a CPU, and sampled continuations have measurable repetition and
diversity.  It needs no download and is the same on every machine for a given seed.
"""

from __future__ import annotations

import random

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
         "Mara", "Nico", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
PLACES = ["the old mill", "the harbour", "the forest", "the market", "the library", "the station",
          "the garden", "the bridge", "the castle", "the village", "the river", "the school"]
OBJECTS = ["a lantern", "a letter", "a map", "a basket", "a key", "a book", "a coin", "a rope", "a violin",
           "a compass", "a blanket", "a bottle"]
ADJECTIVES = ["quiet", "bright", "cold", "small", "ancient", "busy", "dark", "warm", "strange", "green"]
TIMES = ["In the morning", "At noon", "Later that day", "In the evening", "At night", "The next day"]
WEATHER = ["it was raining", "the sun was shining", "the wind was strong", "snow was falling", "the air was still"]
FEELINGS = ["happy", "tired", "worried", "curious", "surprised", "calm", "afraid", "proud"]
VERBS_GO = ["walked to", "ran to", "went to", "returned to", "arrived at", "looked around"]
VERBS_OBJ = ["found", "carried", "lost", "opened", "gave away", "repaired", "hid", "showed"]

TEMPLATES = [
    "{time}, {a} {go} {place}.",
    "{a} {obj_verb} {obj} near {place}.",
    "{time}, {weather}, and {a} felt {feeling}.",
    "{a} told {b} about {obj}.",
    "{place} was {adj} and {a} was {feeling}.",
    "{a} and {b} {go} {place} together.",
    "{b} asked {a} why {place} was so {adj}.",
    "\"We should go to {place},\" said {a}.",
    "{a} {obj_verb} {obj}, and {b} smiled.",
    "Because {weather}, {a} stayed at {place}.",
]


def make_document(rng: random.Random) -> str:
    """One story: 4–9 sentences about two characters, a place and an object."""
    a, b = rng.sample(NAMES, 2)
    place = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    sentences = []
    for _ in range(rng.randint(4, 9)):
        if rng.random() < 0.25:
            place = rng.choice(PLACES)
        if rng.random() < 0.2:
            obj = rng.choice(OBJECTS)
        x, y = (a, b) if rng.random() < 0.6 else (b, a)
        t = rng.choice(TEMPLATES)
        s = t.format(
            a=x, b=y, place=place, obj=obj, adj=rng.choice(ADJECTIVES), time=rng.choice(TIMES),
            weather=rng.choice(WEATHER), feeling=rng.choice(FEELINGS), go=rng.choice(VERBS_GO),
            obj_verb=rng.choice(VERBS_OBJ),
        )
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


def make_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """``num_documents`` stories, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(num_documents)]


def quickstart_splits(seed: int = 0, train_documents: int = 3000, validation_documents: int = 300) -> dict[str, list[str]]:
    """Train and validation documents of the quickstart corpus (disjoint seeds)."""
    return {
        "train": make_corpus(train_documents, seed),
        "validation": make_corpus(validation_documents, seed + 1_000_003),
    }
