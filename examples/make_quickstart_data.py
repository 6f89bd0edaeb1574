"""Writes examples/data/quickstart.jsonl: a small, original instruction set in alpaca format.

The tasks are short and answered in one fixed house style, so that a few dozen LoRA steps
visibly lower the evaluation loss. Run: python examples/make_quickstart_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Chile": "Santiago", "Ghana": "Accra", "Italy": "Rome",
            "Spain": "Madrid", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana", "Iran": "Tehran",
            "Nepal": "Kathmandu", "Greece": "Athens", "Sweden": "Stockholm", "Mexico": "Mexico City",
            "Vietnam": "Hanoi", "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Turkey": "Ankara"}
ANTONYMS = {"hot": "cold", "early": "late", "light": "dark", "open": "closed", "full": "empty", "fast": "slow",
            "high": "low", "wet": "dry", "loud": "quiet", "strong": "weak", "rich": "poor", "young": "old",
            "happy": "sad", "thick": "thin", "hard": "soft", "near": "far", "first": "last", "true": "false"}
WORDS = ["garden", "planet", "window", "silver", "rocket", "candle", "forest", "pencil", "bridge", "market",
         "orange", "castle", "dragon", "meadow", "tunnel", "violin", "harbor", "lantern", "pebble", "summit"]


def examples(rng: random.Random) -> list[dict]:
    rows = []
    for country, city in CAPITALS.items():
        rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                     "output": f"Answer: {city}. (capital of {country})"})
    for word, opposite in ANTONYMS.items():
        rows.append({"instruction": "Give the opposite of the word.", "input": word,
                     "output": f"Answer: {opposite}. (opposite of {word})"})
    for word in WORDS:
        rows.append({"instruction": "Spell the word backwards.", "input": word,
                     "output": f"Answer: {word[::-1]}. (reversed {word})"})
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"instruction": f"What is {a} plus {b}?", "input": "",
                     "output": f"Answer: {a + b}. ({a} + {b})"})
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        rows.append({"instruction": f"Multiply {a} by {b}.", "input": "",
                     "output": f"Answer: {a * b}. ({a} x {b})"})
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).parent / "data" / "quickstart.jsonl"
    rows = examples(random.Random(0))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
