"""Regenerates the embedded default corpus and tokenizer of trainer-svc (deterministic).

    .deps/venv/bin/python trainer-svc/assets/make_assets.py

Writes, beside this file:
  math.jsonl   synthetic arithmetic word problems, one JSON object {"text": ...} per line
  prose.txt    plain sentences about everyday things, one document per line
  tokenizer.json  a byte-level BPE (vocab 1024) trained on both, with <|bos|> <|eos|> <|pad|>
  config.yaml  the default expert-group data config that points at the two files
"""
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(42)

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mo", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "pencils", "marbles", "books", "coins", "stickers", "cookies", "stamps", "shells", "cards"]
PLACES = ["the market", "school", "the park", "the library", "a shop", "the fair"]


def math_doc():
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    n1, n2 = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    place = rng.choice(PLACES)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{n1} has {a} {item}. {n2} gives {n1} {b} more {item} at {place}. How many {item} does {n1} have now?"
        s = f"{n1} starts with {a} and gets {b} more, so {a} + {b} = {a + b}. The answer is {a + b}."
    elif kind == 1:
        big = a + b
        q = f"{n1} had {big} {item} and gave {b} of them to {n2}. How many {item} are left?"
        s = f"We subtract: {big} - {b} = {a}. The answer is {a}."
    elif kind == 2:
        q = f"Each box at {place} holds {c} {item}. {n1} buys {b} boxes. How many {item} is that in total?"
        s = f"We multiply: {b} * {c} = {b * c}. The answer is {b * c}."
    elif kind == 3:
        total = b * c
        q = f"{n1} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"
        s = f"We divide: {total} / {c} = {b}. The answer is {b}."
    else:
        q = f"Compute {a} + {b} * {c}."
        s = f"Multiplication comes first: {b} * {c} = {b * c}, then {a} + {b * c} = {a + b * c}. The answer is {a + b * c}."
    return f"Question: {q}\nSolution: {s}"


SUBJECTS = ["The old dog", "A small bird", "My neighbour", "The teacher", "Our cat", "The baker", "A tired traveller",
            "The river", "The wind", "A young girl", "The farmer", "The city"]
VERBS = ["walks slowly past", "looks at", "sings near", "waits beside", "runs towards", "sleeps under", "talks about",
         "dreams of", "paints", "remembers"]
OBJECTS = ["the green hill", "a quiet house", "the tall tree", "the morning light", "an empty street", "the blue sea",
           "a warm kitchen", "the busy station", "the garden gate", "the winter sky"]
TAILS = ["every morning", "before the rain", "after dinner", "on a sunny day", "in the evening", "without a word",
         "with great care", "for a long time"]


def prose_doc():
    sents = []
    for _ in range(rng.randint(2, 5)):
        sents.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}.")
    return " ".join(sents)


def main():
    math_docs = [math_doc() for _ in range(4000)]
    prose_docs = [prose_doc() for _ in range(4000)]
    with open(os.path.join(HERE, "math.jsonl"), "w") as f:
        for d in math_docs:
            f.write(json.dumps({"text": d, "source": "synthetic-math"}) + "\n")
    with open(os.path.join(HERE, "prose.txt"), "w") as f:
        for d in prose_docs:
            f.write(d + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(math_docs + prose_docs, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    tok.save(os.path.join(HERE, "tokenizer.json"))
    print("vocab", tok.get_vocab_size(), "ids", [tok.token_to_id(s) for s in specials])


if __name__ == "__main__":
    main()
