#!/usr/bin/env python
"""Build the embedded demo data from the public-domain Shakespeare texts.

Writes two things (both deterministic; re-running gives identical files):

* ``data/pretrain/{train,valid}.txt``: plain text for pre-training a small
  Llama.  ``valid.txt`` is the last ~5% of every work (cut at a paragraph
  boundary, see ``split_pretrain``); it is held out to measure perplexity,
  ``train.txt`` is everything else.  Both keep the original line layout.

* ``data/tasks/shakespeare_speaker/{train,test}.json``: an LMFlow ``text2text``
  task, "who speaks these lines?".  Each instance is a passage of 1-3
  consecutive lines from one speech of one of twelve leading characters
  from ten plays (Othello/Iago and Antony/Cleopatra share a play, so part of
  the task is telling co-stars apart, not only recognising the play), e.g.::

      {"input": "Who speaks these lines?\\n<passage>\\nSpeaker:", "output": " HAMLET"}

  Classes are balanced.  Test passages come from speeches that contribute
  nothing to train, and no train passage shares a line with a test passage.
  The task's passages stay in the pre-training text on purpose: the
  fine-tune has to learn a mapping from style/content to a name, which a
  model of a few million parameters cannot get by memorising 5 MB of text.

Speaker parsing: the Gutenberg files put each speech in a paragraph whose
first line is the speaker heading ("OTHELLO.", "Ham.", "Romeo.", sometimes
without the period).  Spellings differ per file, so the classes name their
headings per play explicitly in ``CLASSES`` rather than guessing.

Usage: python tools/make_embedded_task.py [--texts data/shakespeare] [--out data]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

TASK_NAME = "shakespeare_speaker"
PROMPT = "Who speaks these lines?\n{passage}\nSpeaker:"

# label -> [(play file stem, speaker heading as written in that file)].
# Every class needs TRAIN_PER_CLASS + TEST_PER_CLASS passages of MIN_WORDS or
# more; that rules out e.g. Juliet, Cassius, Macbeth and Prospero (~180-220).
CLASSES: dict[str, list[tuple[str, str]]] = {
    "HAMLET": [("hamlet_gut", "Ham")],
    "OTHELLO": [("othello_gut", "OTHELLO")],
    "IAGO": [("othello_gut", "IAGO")],
    "ANTONY": [("antony_and_cleopatra_gut", "ANTONY")],
    "CLEOPATRA": [("antony_and_cleopatra_gut", "CLEOPATRA")],
    "LEAR": [("lear_gut", "Lear")],
    "BRUTUS": [("julius_caesar_gut", "BRUTUS")],
    "ROMEO": [("romeo_and_juliet_gut", "Romeo")],
    # Same character across three plays; "FAL" is how 1 Henry IV spells it.
    "FALSTAFF": [
        ("henry_iv_part_1_gut", "FAL"),
        ("henry_iv_part_2_gut", "FALSTAFF"),
        ("merry_wives_of_windsor_gut", "FALSTAFF"),
    ],
    "ROSALIND": [("as_you_like_it_gut", "ROSALIND")],
    "TIMON": [("timon_of_athens_gut", "TIMON")],
    "TITUS": [("tragedy_of_titus_andronicus_gut", "TITUS")],
}

TRAIN_PER_CLASS = 170
TEST_PER_CLASS = 20
MAX_LINES = 3
# Shorter passages ("Ay, my lord.") could be anyone's and only add noise.
MIN_WORDS = 6
PRETRAIN_HOLDOUT = 0.05
SEED = 1234

HEADING = re.compile(r"^([A-Z][A-Za-z' ]{0,30}?)\.?$")
# An unclosed "[" drops the rest of the speech: better lost text than a
# direction passed off as a line.
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]?", re.DOTALL)


@dataclass(frozen=True)
class Speech:
    play: str
    speaker: str  # heading as written in the file, without the period
    lines: tuple[str, ...]


def parse_speeches(path: Path) -> list[Speech]:
    """Return the speeches of a play, in order, with stage directions removed."""
    text = path.read_text(encoding="utf-8")
    paragraphs = [
        [line.strip() for line in block.split("\n") if line.strip()]
        for block in re.split(r"\n\s*\n", text)
    ]

    def heading(line: str) -> str | None:
        match = HEADING.match(line)
        return match.group(1) if match else None

    # A heading seen at least 3 times at the top of a paragraph is a real
    # speaker; a lone "Farewell." line inside a speech is not.
    counts = collections.Counter(
        heading(p[0]) for p in paragraphs if len(p) >= 2 and heading(p[0])
    )
    speakers = {name for name, n in counts.items() if n >= 3}

    speeches: list[Speech] = []
    for para in paragraphs:
        if len(para) < 2 or heading(para[0]) not in speakers:
            continue
        # A few files run two speeches together without a blank line.
        current, body = heading(para[0]), []
        for line in para[1:] + [None]:
            if line is None or heading(line) in speakers:
                cleaned = _strip_directions(body)
                if cleaned:
                    speeches.append(Speech(path.stem, current, cleaned))
                if line is not None:
                    current, body = heading(line), []
            else:
                body.append(line)
    return speeches


def _strip_directions(lines: list[str]) -> tuple[str, ...]:
    # Directions can span lines ("[Exeunt, bearing off ...\n... shot off.]").
    text = STAGE_DIRECTION.sub(" ", "\n".join(lines))
    out = (re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))
    return tuple(line for line in out if line)


def passages(speech: Speech) -> list[str]:
    """Cut a speech into consecutive chunks of up to MAX_LINES lines."""
    chunks = [speech.lines[i : i + MAX_LINES] for i in range(0, len(speech.lines), MAX_LINES)]
    return ["\n".join(c) for c in chunks if len(" ".join(c).split()) >= MIN_WORDS]


def _instance(passage: str, label: str) -> dict[str, str]:
    # Leading space: the answer continues "Speaker:" as a separate word.
    return {"input": PROMPT.format(passage=passage), "output": " " + label}


def build_task(texts: Path, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Return balanced (train, test) instances, split by speech."""
    rng = random.Random(seed)
    parsed = {
        play: parse_speeches(texts / f"{play}.txt")
        for play in sorted({p for entries in CLASSES.values() for p, _ in entries})
    }
    train: list[dict] = []
    test: list[dict] = []
    for label, entries in CLASSES.items():
        speeches = [
            s for play, name in entries for s in parsed[play] if s.speaker == name
        ]
        speeches = [s for s in speeches if passages(s)]
        rng.shuffle(speeches)
        # One passage per test speech keeps the test set varied.
        test_speeches = speeches[:TEST_PER_CLASS]
        test_passages = [rng.choice(passages(s)) for s in test_speeches]
        held_lines = {line for p in test_passages for line in p.split("\n")}
        pool = sorted(
            {
                p
                for s in speeches[TEST_PER_CLASS:]
                for p in passages(s)
                if not held_lines.intersection(p.split("\n"))
            }
        )
        if len(test_passages) < TEST_PER_CLASS or len(pool) < TRAIN_PER_CLASS:
            raise SystemExit(
                f"error: class {label} has too few passages "
                f"({len(test_passages)} test, {len(pool)} train)"
            )
        test += [_instance(p, label) for p in test_passages]
        train += [_instance(p, label) for p in rng.sample(pool, TRAIN_PER_CLASS)]

    _drop_cross_class_duplicates(train, test)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _drop_cross_class_duplicates(train: list[dict], test: list[dict]) -> None:
    # The per-class filter cannot see other classes' test lines (e.g. a line
    # two characters both say); enforce "no test line in train" globally.
    held = {line for inst in test for line in _passage_lines(inst)}
    train[:] = [inst for inst in train if not held.intersection(_passage_lines(inst))]


def _passage_lines(instance: dict) -> list[str]:
    return instance["input"].split("\n")[1:-1]


def split_pretrain(texts: Path, holdout: float = PRETRAIN_HOLDOUT) -> tuple[str, str]:
    """Return (train, valid) text: valid is the last `holdout` of each work.

    The cut moves forward to the next blank line so no speech is split
    between the two.  Every ``*_gut.txt`` (plays and poems) takes part.
    """
    train_parts, valid_parts = [], []
    for path in sorted(texts.glob("*_gut.txt")):
        lines = path.read_text(encoding="utf-8").rstrip().split("\n")
        cut = int(len(lines) * (1 - holdout))
        while cut < len(lines) and lines[cut].strip():
            cut += 1
        train_parts.append("\n".join(lines[:cut]).strip())
        valid_parts.append("\n".join(lines[cut:]).strip())
    return _join(train_parts), _join(valid_parts)


def _join(parts: list[str]) -> str:
    return "\n\n\n".join(p for p in parts if p) + "\n"


def write_json(path: Path, instances: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"type": "text2text", "instances": instances}
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    if not args.texts.is_dir() or not any(args.texts.glob("*_gut.txt")):
        raise SystemExit(f"error: no *_gut.txt files in {args.texts}")

    train, test = build_task(args.texts, args.seed)
    task_dir = args.out / "tasks" / TASK_NAME
    write_json(task_dir / "train.json", train)
    write_json(task_dir / "test.json", test)

    pre_train, pre_valid = split_pretrain(args.texts)
    (args.out / "pretrain").mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain" / "train.txt").write_text(pre_train, encoding="utf-8")
    (args.out / "pretrain" / "valid.txt").write_text(pre_valid, encoding="utf-8")

    print(
        f"{task_dir}: {len(train)} train, {len(test)} test, {len(CLASSES)} classes; "
        f"pretrain: {len(pre_train):,} train chars, {len(pre_valid):,} valid chars"
    )


if __name__ == "__main__":
    main()
