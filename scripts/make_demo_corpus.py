"""Write src/llmneo/demo/corpus.jsonl: small templated ShareGPT conversations the offline demo trains on.

Deterministic (fixed seed), so the shipped file can be regenerated exactly: `python scripts/make_demo_corpus.py`.
The facts follow simple rules (colours, sounds, sums, opposites, capitals) so that a tiny model learns them in
seconds on a CPU, and held-out rows are new combinations of the same rules.
"""

import json
import random
from pathlib import Path

COLOURS = {
    "banana": "yellow", "apple": "red", "lime": "green", "plum": "purple", "orange": "orange",
    "cherry": "red", "lemon": "yellow", "grape": "purple", "pear": "green", "coconut": "brown",
    "sky": "blue", "snow": "white", "coal": "black", "grass": "green", "blood": "red",
}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "horse": "neigh", "pig": "oink", "frog": "ribbit"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
             "happy": "sad", "open": "closed", "full": "empty", "old": "new", "wet": "dry", "loud": "quiet"}
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and correctly.", "You are a friendly tutor."]


def colour(rng):
    thing = rng.choice(sorted(COLOURS))
    q = rng.choice(["What colour is the {t}?", "Tell me the colour of the {t}.", "Which colour does the {t} have?"])
    return q.format(t=thing), f"The {thing} is {COLOURS[thing]}."


def sound(rng):
    animal = rng.choice(sorted(SOUNDS))
    q = rng.choice(["What sound does a {a} make?", "How does a {a} sound?", "What does the {a} say?"])
    return q.format(a=animal), f"A {animal} says {SOUNDS[animal]}."


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES) + sorted(OPPOSITES.values()))
    answer = OPPOSITES.get(word) or next(k for k, v in OPPOSITES.items() if v == word)
    q = rng.choice(["What is the opposite of {w}?", "Give me the opposite of {w}.", "Opposite of {w}?"])
    return q.format(w=word), f"The opposite of {word} is {answer}."


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"])
    return q.format(c=country), f"The capital of {country} is {CAPITALS[country]}."


def addition(rng):
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?"])
    return q.format(a=NUMBERS[a], b=NUMBERS[b]), f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."


TOPICS = [colour, sound, opposite, capital, addition]


def conversation(rng):
    turns = []
    if rng.random() < 0.3:
        turns.append({"from": "system", "value": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        question, answer = rng.choice(TOPICS)(rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns}


def main(count: int = 3000, seed: int = 0) -> None:
    rng = random.Random(seed)
    path = Path(__file__).resolve().parents[1] / "src" / "llmneo" / "demo" / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(conversation(rng)) + "\n")
    print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
