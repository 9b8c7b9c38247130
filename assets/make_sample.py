"""Writes the shipped sample ``glaiveai_sample.jsonl`` and trains ``tiny_tokenizer.model`` on it.

The rows follow the glaiveai/reasoning-v1-20m schema (``{"prompt", "response"}``, response =
``<think>\\n...\\n</think>\\n\\n answer``) across the hackathon's domains. They are synthetic and templated
on purpose: a 1M-parameter model should pick up the reasoning/answer format within a few hundred steps.
Lengths range from a few dozen tokens to about 1500, so some rows exceed cpu-tiny's max_len and are
dropped. A couple of broken rows of every kind the data stage must survive are mixed in.

    python assets/make_sample.py      # deterministic: the same seed writes the same bytes
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import SAMPLE_PATH, TINY_TOKENIZER_PATH  # noqa: E402
from data_prep import build_tiny_tokenizer  # noqa: E402

GOOD_ROWS = 300
SEED = 0

SUBJECTS = {
    "the sea": ["grey waves", "salt wind", "a lighthouse", "gulls", "the tide"],
    "a city at night": ["neon signs", "wet streets", "a late train", "open windows", "distant sirens"],
    "autumn": ["red leaves", "cold mornings", "woodsmoke", "low sun", "bare branches"],
    "a mountain": ["thin air", "snow fields", "a narrow path", "eagles", "a silent summit"],
    "an old library": ["dusty shelves", "a creaking floor", "lamplight", "forgotten letters", "a sleeping cat"],
    "the desert": ["hot sand", "a dry wind", "a lone cactus", "bright stars", "a far oasis"],
    "a rainy day": ["drumming rain", "fogged glass", "puddles", "warm tea", "grey light"],
    "a garden in spring": ["new buds", "bees", "wet soil", "a blackbird", "soft light"],
}
FORMS = ["poem", "short story", "haiku", "song verse", "letter"]

TOPICS = {
    "a school science fair": ["a solar oven", "a water filter", "a paper bridge", "a weather station",
                              "a plant growth test", "a magnet motor", "a sound meter", "a rain gauge"],
    "a rainy weekend": ["a board game marathon", "baking bread", "a movie night", "writing letters",
                        "building a fort", "a puzzle race", "learning a song", "a home picnic"],
    "a small coffee shop": ["a loyalty card", "a book corner", "live music nights", "a local art wall",
                            "seasonal drinks", "a quiet hour", "a tasting class", "a bike rack"],
    "a team offsite": ["a cooking class", "a hike", "an escape room", "a volunteer day",
                       "a lightning talk hour", "a design sprint", "a picnic", "a boat trip"],
    "reducing food waste": ["a weekly meal plan", "a shared fridge", "composting", "smaller plates",
                            "freezing leftovers", "a shopping list", "a soup day", "labelled jars"],
    "a birthday party": ["a treasure hunt", "a photo booth", "a cake contest", "a costume theme",
                         "a karaoke hour", "a garden picnic", "a craft table", "a star gazing night"],
}
BENEFITS = ["it is cheap", "it brings people together", "it is easy to start", "it teaches something new",
            "it is fun for all ages", "it works indoors", "it needs little time", "it is good for the planet"]

SCIENCE = [
    ("Why is the sky blue?", ["sunlight has all colours", "air molecules scatter short wavelengths more",
                              "blue light has a short wavelength",
                              "scattered blue light reaches us from all of the sky"],
     "The sky looks blue because air scatters short blue wavelengths of sunlight much more than red ones."),
    ("Why do objects fall to the ground?", ["the Earth has a large mass", "mass attracts mass through gravity",
                                            "the pull points to the centre of the Earth"],
     "Objects fall because the Earth's gravity pulls them toward its centre."),
    ("What makes ice float on water?", ["water expands when it freezes", "ice is less dense than liquid water",
                                        "less dense things float"],
     "Ice floats because freezing water expands, so ice is less dense than liquid water."),
    ("Why do we have seasons?", ["the Earth's axis is tilted", "the tilt changes how directly sunlight hits",
                                 "direct light heats more", "the tilt stays fixed as the Earth orbits the Sun"],
     "Seasons come from the tilt of the Earth's axis, which changes how directly sunlight reaches each half."),
    ("How do plants make food?", ["plants use photosynthesis", "they take in light, water and carbon dioxide",
                                  "they make sugar and release oxygen"],
     "Plants make sugar by photosynthesis, using light, water and carbon dioxide and releasing oxygen."),
    ("Why does metal feel colder than wood?", ["both are at room temperature", "metal conducts heat fast",
                                               "it pulls heat from the hand quickly"],
     "Metal feels colder because it conducts heat away from your hand faster than wood does."),
    ("What causes thunder?", ["lightning heats the air very fast", "hot air expands suddenly",
                              "the expansion makes a shock wave", "we hear the shock wave as sound"],
     "Thunder is the sound of air expanding suddenly when lightning heats it."),
    ("Why does salt melt ice on roads?", ["salt dissolves in the thin water film",
                                          "salt water freezes at a lower temperature",
                                          "so the ice melts even below zero"],
     "Salt lowers the freezing point of water, so ice melts even when it is a little below zero."),
    ("How does a magnet attract iron?", ["a magnet has a magnetic field", "iron has tiny magnetic domains",
                                         "the field lines up the domains",
                                         "aligned domains are pulled toward the magnet"],
     "A magnet's field lines up the tiny magnetic domains in iron, and the aligned iron is pulled toward it."),
    ("Why do we see the Moon change shape?", ["the Moon reflects sunlight", "half of it is always lit",
                                              "we see different parts of the lit half as it orbits"],
     "The Moon's phases come from seeing different parts of its sunlit half as it orbits the Earth."),
]

CODE_TASKS = [
    ("returns the sum of a list of numbers", "total", "numbers", "add each number to a running total",
     "def total(numbers):\n    result = 0\n    for n in numbers:\n        result += n\n    return result"),
    ("returns the largest number in a list", "largest", "numbers", "keep the biggest value seen so far",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers:\n        if n > best:\n"
     "            best = n\n    return best"),
    ("reverses a string", "reverse", "text", "walk the string from the end",
     "def reverse(text):\n    return text[::-1]"),
    ("counts the vowels in a string", "count_vowels", "text", "check each letter against the vowels",
     "def count_vowels(text):\n    return sum(1 for c in text.lower() if c in \"aeiou\")"),
    ("checks if a number is even", "is_even", "n", "look at the remainder after dividing by two",
     "def is_even(n):\n    return n % 2 == 0"),
    ("returns the factorial of n", "factorial", "n", "multiply all numbers from 1 to n",
     "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result"),
    ("checks if a word is a palindrome", "is_palindrome", "word", "compare the word with its reverse",
     "def is_palindrome(word):\n    return word == word[::-1]"),
    ("returns the average of a list", "average", "numbers", "divide the sum by the count",
     "def average(numbers):\n    return sum(numbers) / len(numbers)"),
    ("removes duplicates from a list and keeps the order", "unique", "items", "remember what was already seen",
     "def unique(items):\n    seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n"
     "            seen.add(item)\n            out.append(item)\n    return out"),
    ("counts the words in a sentence", "count_words", "sentence", "split the sentence on spaces",
     "def count_words(sentence):\n    return len(sentence.split())"),
]

PASSAGE_TOPICS = {
    "bees": ["Bees visit flowers to collect nectar and pollen.", "While they move between flowers they carry pollen.",
             "This pollination helps many crops grow fruit.", "A single hive can hold tens of thousands of bees.",
             "Bees talk to each other with a waggle dance.", "The dance shows the direction of good flowers.",
             "Bee numbers have fallen in many places.", "Farmers now plant wild flowers to help them."],
    "the printing press": ["The printing press was built in the fifteenth century.",
                           "It used movable metal type.", "Books became much cheaper to make.",
                           "More people learned to read.", "Ideas spread faster across countries.",
                           "Scholars could share exact copies of their work.", "Newspapers later grew from it.",
                           "Many call it one of the most important inventions."],
    "sleep": ["Sleep lets the body and the brain recover.", "Adults need about seven to nine hours.",
              "During deep sleep the body repairs tissue.", "Dreams happen mostly in REM sleep.",
              "Poor sleep harms memory and mood.", "Screens late at night can delay sleep.",
              "A regular bedtime helps the body clock.", "Naps can help but should be short."],
    "rivers": ["Rivers carry water from high ground to the sea.", "They shape valleys over long times.",
               "Many cities were built beside rivers.", "Rivers give water for farms and drinking.",
               "Floods can spread rich soil on fields.", "Dams store water and make power.",
               "Dams can also block fish from swimming upstream.", "Clean rivers support many animals."],
    "remote work": ["Many people now work from home.", "It saves time spent travelling.",
                    "Some find it hard to separate work and rest.", "Teams use chat and video calls.",
                    "Quiet time can help deep focus.", "Some miss meeting colleagues in person.",
                    "Companies mix office days and home days.", "Clear goals help remote teams."],
}

ADVICE = {
    "learn a new language": ["practise a little every day", "learn the most common words first",
                             "listen to native speakers", "speak early even with mistakes", "review old words"],
    "save money each month": ["track what you spend", "set a fixed amount aside on payday",
                              "cook at home more often", "cancel unused subscriptions", "wait a day before big buys"],
    "plan a trip": ["choose the dates and the budget", "book travel and a place to stay",
                    "list the places to see", "check the weather", "pack light"],
    "keep a plant alive": ["give it the right light", "water when the soil is dry", "use a pot with drainage",
                           "feed it in spring", "remove dead leaves"],
    "prepare for an exam": ["make a study plan", "study in short sessions", "test yourself",
                            "sleep well the night before", "review your mistakes"],
}


def math_row(rng: random.Random) -> tuple[str, str, str]:
    """Sums of 2 to 30 numbers worked one step at a time: short to long rows with learnable reasoning."""
    terms = [rng.randint(2, 99) for _ in range(rng.choice([2, 2, 3, 4, 6, 10, 20, 30]))]
    if len(terms) == 2 and rng.random() < 0.5:
        a, b = terms
        steps = [f"I need to multiply {a} by {b}.", f"{a} times {b // 10 * 10} is {a * (b // 10 * 10)}.",
                 f"{a} times {b % 10} is {a * (b % 10)}.",
                 f"Adding them: {a * (b // 10 * 10)} + {a * (b % 10)} = {a * b}.", f"So {a} x {b} = {a * b}."]
        return f"What is {a} times {b}?", "\n".join(steps), f"{a} x {b} = {a * b}."
    steps, total = [f"I need to add {len(terms)} numbers: {', '.join(map(str, terms))}.",
                    f"Start with {terms[0]}."], terms[0]
    for term in terms[1:]:
        steps.append(f"{total} + {term} = {total + term}.")
        total += term
    steps.append(f"Let me check: the last running total is {total}.")
    return f"What is {' + '.join(map(str, terms))}?", "\n".join(steps), f"The sum is {total}."


def creative_row(rng: random.Random) -> tuple[str, str, str]:
    subject, images = rng.choice(list(SUBJECTS.items()))
    form = rng.choice(FORMS)
    picked = rng.sample(images, 3)
    reasoning = (f"Let me think about {subject}. It makes me think of {picked[0]}, {picked[1]} and {picked[2]}.\n"
                 f"A {form} should be short and vivid. I will start with {picked[0]} and end with {picked[2]}.")
    lines = [f"I remember {img}, and {subject} comes back to me." for img in picked]
    if form == "short story":
        lines = [f"Every evening she walked past {img}. It reminded her of {subject}, and of home." for img in picked]
        lines += ["In the end she stayed, and the quiet felt like a friend."] * rng.randint(0, 2)
    return f"Write a {form} about {subject}.", reasoning, "\n".join(lines)


def ideation_row(rng: random.Random) -> tuple[str, str, str]:
    topic, ideas = rng.choice(list(TOPICS.items()))
    n = rng.randint(3, len(ideas))
    picked = rng.sample(ideas, n)
    numbered = [(i, idea, rng.choice(BENEFITS)) for i, idea in enumerate(picked, 1)]
    reasoning = "\n".join([f"Let me think about ideas for {topic}. I need {n} of them."]
                          + [f"Idea {i}: {idea}, because {why}." for i, idea, why in numbered]
                          + ["These are varied enough, so I will list them."])
    answer = "\n".join(f"{i}. {idea.capitalize()}: {why}." for i, idea, why in numbered)
    return f"Give me {n} ideas for {topic}.", reasoning, answer


def summary_row(rng: random.Random) -> tuple[str, str, str]:
    """Passages of 3 to 140 sentences: the longest rows of the sample."""
    topic, sentences = rng.choice(list(PASSAGE_TOPICS.items()))
    passage = [rng.choice(sentences) for _ in range(rng.choice([3, 4, 6, 8, 12, 20, 40, 90, 140]))]
    key_points = list(dict.fromkeys(passage))[:3]
    reasoning = (f"The text is about {topic}. It has {len(passage)} sentences.\n"
                 + "\n".join(f"Main point: {s}" for s in key_points)
                 + "\nLet me keep only these main points and write them in one short paragraph.")
    answer = f"The text is about {topic}. " + " ".join(key_points)
    return f"Summarize the following text:\n\n{' '.join(passage)}", reasoning, answer


def science_row(rng: random.Random) -> tuple[str, str, str]:
    question, facts, answer = rng.choice(SCIENCE)
    asked = rng.choice(["{}", "Can you explain this: {}", "Quick question. {}", "{} Please keep it short."])
    opener = rng.choice(["Let me think about this:", "Let me recall the key facts for:", "I should explain simply:"])
    reasoning = "\n".join([f"{opener} {question}", f"First, {facts[0]}."]
                          + [f"Then, {fact}." for fact in facts[1:]] + ["Putting these together gives the answer."])
    return asked.format(question), reasoning, answer


def coding_row(rng: random.Random) -> tuple[str, str, str]:
    what, name, arg, idea, code = rng.choice(CODE_TASKS)
    asked = rng.choice(["Write a Python function `{}` that {}.", "In Python, implement `{}`: it {}.",
                        "I need a Python function `{}` that {}. Can you write it?"])
    opener = rng.choice(["Let me think about a function that", "I need code that", "The task: a function that"])
    closer = rng.choice(["Then I return the result.", "Finally I return the result.", "It must work on small inputs."])
    reasoning = f"{opener} {what}.\nIt takes {arg} as input.\nThe idea is to {idea}.\n{closer}"
    answer = f"```python\n{code}\n```\nThe function `{name}` {what}."
    return asked.format(f"{name}({arg})", what), reasoning, answer


def other_row(rng: random.Random) -> tuple[str, str, str]:
    goal, tips = rng.choice(list(ADVICE.items()))
    picked = rng.sample(tips, rng.randint(3, len(tips)))
    reasoning = "\n".join([f"Let me think about how to {goal}."]
                          + [f"Step {i}: {tip}." for i, tip in enumerate(picked, 1)] + ["That covers the basics."])
    answer = f"To {goal}:\n" + "\n".join(f"- {tip.capitalize()}." for tip in picked)
    return f"How can I {goal}?", reasoning, answer


DOMAINS = [math_row, creative_row, ideation_row, summary_row, science_row, coding_row, other_row]


def response(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def broken_lines(rng: random.Random) -> list[bytes]:
    """Two rows of every kind of damage the data stage must count and skip (never crash on)."""
    q, r, a = science_row(rng)
    rows: list[dict | str | bytes] = [
        {"prompt": q, "response": a},  # no <think>
        {"prompt": q, "response": f"{r}\n\n{a}"},
        {"prompt": q, "response": f"<think>\n{r}\n\n{a}"},  # unclosed block
        {"prompt": q, "response": f"<think>{r}"},
        {"prompt": q, "response": response(r, a) + "\n" + response(r, a)},  # two blocks
        {"prompt": q, "response": f"<think>{r}</think>{a}<think>more</think>"},
        {"prompt": q, "response": "Sure! " + response(r, a)},  # text before <think>
        {"prompt": q, "response": "Answer first. " + response(r, a)},
        {"prompt": q, "response": response(r, "")},  # empty answer
        {"prompt": q, "response": response(r, "  \n ")},
        {"prompt": q, "response": response("", a)},  # empty reasoning
        {"prompt": q, "response": response(" \n", a)},
        {"prompt": q, "response": response(f"<think>{r}", a)},  # nested tags
        {"prompt": q, "response": response(r, f"<answer>{a}</answer>")},
        {"prompt": None, "response": response(r, a)},  # null / non-string fields
        {"prompt": q, "response": 42},
        {"prompt": q},  # missing column
        {"response": response(r, a)},
        {"prompt": "", "response": response(r, a)},  # empty field
        '{"prompt": "What is 2 + 2?", "response": "<think>\\n2 + 2 = 4\\n</think>\\n\\n4"',  # malformed JSON
        "not json at all",
        b'{"prompt": "Caf\xe9 \xff?", "response": "<think>\\nbad bytes\\n</think>\\n\\nno"}',  # invalid UTF-8
        b'{"prompt": "\xc3\x28", "response": "<think>\\nbad bytes\\n</think>\\n\\nno"}',
    ]
    return [row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()
            for row in rows]


def main() -> None:
    rng = random.Random(SEED)
    lines = []
    for i in range(GOOD_ROWS):
        prompt, reasoning, answer = DOMAINS[i % len(DOMAINS)](rng)
        lines.append(json.dumps({"prompt": prompt, "response": response(reasoning, answer)}).encode())
    rng.shuffle(lines)
    for line in broken_lines(rng):
        lines.insert(rng.randrange(len(lines) - 40), line)  # keep the tail (held out for eval) clean
    SAMPLE_PATH.write_bytes(b"\n".join(lines) + b"\n")
    build_tiny_tokenizer(SAMPLE_PATH, TINY_TOKENIZER_PATH)
    print(f"wrote {len(lines)} rows to {SAMPLE_PATH} and the tokenizer {TINY_TOKENIZER_PATH}")


if __name__ == "__main__":
    main()
