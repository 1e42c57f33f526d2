"""Development script (not part of the product): writes `arith.jsonl`, 1,200 one- and two-step
arithmetic word problems in the style of `math.jsonl` (`data::math::sample_problems`), for RL
on a small pretrained model that the standard sets leave without headroom (SmolLM2-135M-Instruct
scores 0.01 on MAWPS and 0.04 on SVAMP validation problems at temperature 0.7). Deterministic:

    python3 data/samples/make_arith.py > data/samples/arith.jsonl
"""

import json
import random

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
ITEMS = ["apples", "marbles", "stamps", "books", "shells", "cards", "pens", "stickers", "coins", "eggs"]


def problem(i, rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 9)
    kind = i % 6
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        return f"{name} had {a + b} {item} and gave away {b}. How many {item} are left?", a
    if kind == 2:
        return f"A shelf has {b} rows with {c} {item} in each row. How many {item} are on the shelf?", b * c
    if kind == 3:
        return f"{name} shares {b * c} {item} equally among {c} friends. How many {item} does each friend get?", b
    if kind == 4:
        return f"{name} buys {c} bags of {b} {item} and then loses {b - 1} of them. How many {item} remain?", c * b - (b - 1)
    return f"What is {a} plus {b}, multiplied by {c}?", (a + b) * c


def main():
    rng = random.Random(2026)
    seen = set()
    i = 0
    while len(seen) < 1200:
        q, ans = problem(i, rng)
        i += 1
        if q in seen:
            continue
        seen.add(q)
        print(json.dumps({"question": q, "answer": str(ans)}))


if __name__ == "__main__":
    main()
