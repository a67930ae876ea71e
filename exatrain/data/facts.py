"""A synthetic fact corpus where hallucination is measurable on a CPU (DESIGN.md §6, SeND study).

A world of invented entities, each with one value per relation ("The capital of Zorvan is Melk.").
Training documents state facts of one entity each; entities are drawn with Zipf frequency, so a
few facts are seen hundreds of times and most a handful or never. A tiny model learns the frequent
facts and has to guess the rare ones: a confident wrong value on a rare fact is a hallucination,
and questions ("The capital of Zorvan is" -> "Melk") measure it per frequency bucket.

Everything is a deterministic function of `FactConfig` (seeded `random.Random`). Values are drawn
uniformly from a per-relation pool, so nothing about an entity's name predicts them (chance is
1 / values_per_relation). `unseen` extra entities never appear in the corpus: every answer about
them is a guess. A few questions are set aside as SeND's tracking prompts (split "tracking").

    python -m exatrain.data.facts runs/facts            # facts.jsonl, questions.jsonl, tracking.jsonl, world.json
    exatrain train ... data.paths=[runs/facts/facts.jsonl] send.enabled=true send.prompts=runs/facts/tracking.jsonl

Question prompts are the statements cut before the value, so after `<bos>` they are exactly the
prefix the model saw in training; the answer is " " + value (a leading space, as in the text).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
RELATIONS = ("capital", "language", "ruler", "export", "river", "festival", "currency", "founder")


@dataclass(frozen=True)
class FactConfig:
    entities: int = 1000  # entities that appear in the corpus (Zipf ranks 1..entities)
    unseen: int = 100  # further entities with facts but no documents
    relations: int = 4  # the first `relations` of RELATIONS
    values_per_relation: int = 50
    documents: int = 20000
    zipf: float = 1.0  # P(entity of rank r) ∝ r^-zipf
    tracking: int = 32  # questions set aside as SeND tracking prompts
    frequent_min: int = 20  # mentions of a fact for the "frequent" bucket
    rare_max: int = 3  # at most this many mentions (and at least 1): "rare"
    seed: int = 0


@dataclass(frozen=True)
class Question:
    prompt: str  # "The capital of Zorvan is"
    answer: str  # "Melk" (the text continues with " Melk.")
    entity: str
    relation: str
    mentions: int  # documents stating this fact
    bucket: str  # frequent | medium | rare | unseen
    split: str  # eval | tracking


def prompt_text(relation: str, entity: str) -> str:
    return f"The {relation} of {entity} is"


def statement(relation: str, entity: str, value: str) -> str:
    return f"{prompt_text(relation, entity)} {value}."


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n new pronounceable capitalised names (2-3 consonant-vowel syllables, maybe a final consonant)."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
        word = (word + rng.choice(CONSONANTS) if rng.random() < 0.5 else word).capitalize()
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


@dataclass
class FactWorld:
    config: FactConfig
    entities: list[str]  # corpus entities by Zipf rank, then the unseen ones
    relations: list[str]
    facts: dict[tuple[str, str], str]  # (entity, relation) -> value
    documents: list[str]
    mentions: Counter  # (entity, relation) -> documents stating it

    def bucket(self, mentions: int) -> str:
        c = self.config
        if mentions == 0:
            return "unseen"
        if mentions <= c.rare_max:
            return "rare"
        return "frequent" if mentions >= c.frequent_min else "medium"

    def questions(self) -> list[Question]:
        """Every fact as a question; `tracking` of them (drawn over all buckets) split off for SeND."""
        out = [Question(prompt_text(r, e), self.facts[e, r], e, r, self.mentions[e, r],
                        self.bucket(self.mentions[e, r]), "eval")
               for e in self.entities for r in self.relations]
        rng = random.Random(self.config.seed + 1)
        for i in rng.sample(range(len(out)), min(self.config.tracking, len(out))):
            out[i] = Question(**{**asdict(out[i]), "split": "tracking"})
        return out


def build_world(config: FactConfig = FactConfig()) -> FactWorld:
    if not 1 <= config.relations <= len(RELATIONS):
        raise ValueError(f"relations must be in 1..{len(RELATIONS)}, got {config.relations}")
    if config.entities < 1 or config.documents < 1 or config.values_per_relation < 2:
        raise ValueError("need entities >= 1, documents >= 1 and values_per_relation >= 2")
    rng = random.Random(config.seed)
    taken: set[str] = set()
    entities = _names(rng, config.entities + config.unseen, taken)
    relations = list(RELATIONS[:config.relations])
    pools = {r: _names(rng, config.values_per_relation, taken) for r in relations}
    facts = {(e, r): rng.choice(pools[r]) for e in entities for r in relations}
    weights = [(rank + 1) ** -config.zipf for rank in range(config.entities)]
    mentions: Counter = Counter()
    documents = []
    for entity in rng.choices(entities[:config.entities], weights=weights, k=config.documents):
        chosen = rng.sample(relations, rng.randint(1, len(relations)))
        mentions.update((entity, r) for r in chosen)
        documents.append(" ".join(statement(r, entity, facts[entity, r]) for r in chosen))
    return FactWorld(config, entities, relations, facts, documents, mentions)


def write_corpus(out_dir: str | Path, config: FactConfig = FactConfig()) -> dict[str, Path]:
    """facts.jsonl (training documents with a url per entity), questions.jsonl, tracking.jsonl (the
    tracking split alone: SeND's `send.prompts`), world.json (config, bucket counts). Returns the paths."""
    world = build_world(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"facts": out / "facts.jsonl", "questions": out / "questions.jsonl", "tracking": out / "tracking.jsonl",
             "world": out / "world.json"}
    with paths["facts"].open("w", encoding="utf-8") as f:
        for text in world.documents:
            entity = text.split(" of ", 1)[1].split(" is ", 1)[0]
            f.write(json.dumps({"text": text, "url": f"https://facts.example/wiki/{entity}"}) + "\n")
    questions = world.questions()
    with paths["questions"].open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(asdict(q)) + "\n")
    with paths["tracking"].open("w", encoding="utf-8") as f:  # SeND's tracking prompts (send.prompts)
        for q in questions:
            if q.split == "tracking":
                f.write(json.dumps(asdict(q)) + "\n")
    buckets = Counter((q.split, q.bucket) for q in questions)
    summary = {"config": asdict(config), "documents": len(world.documents),
               "chars": sum(len(t) for t in world.documents),
               "questions": {f"{split}/{bucket}": n for (split, bucket), n in sorted(buckets.items())}}
    paths["world"].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return paths


def load_questions(path: str | Path, split: str | None = None) -> list[Question]:
    rows = [Question(**json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    return [q for q in rows if split is None or q.split == split]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    for name, default in asdict(FactConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(ap.parse_args())
    out_dir = args.pop("out_dir")
    paths = write_corpus(out_dir, FactConfig(**args))
    print(paths["world"].read_text())


if __name__ == "__main__":
    main()
