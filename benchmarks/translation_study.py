"""Figures of the translation study (benchmarks/translation-study-cpu-epyc-2026-12-06.md).

Run from the repository root with the project's Python and ``PYTHONPATH=src``:

``python benchmarks/translation_study.py flops DATA_DIR STEPS FLAVOUR LAYERS [N_PROC MICRO]``
    the training FLOPs and real tokens of a run's batches, as trained: sorted by length within
    pools and trimmed (``clusterlm.data.pair_batches``), each micro-batch counted at its own
    length with ``training_flops_per_token`` (width 256, 4 heads, the data's vocabulary).
    LAYERS is the blocks, or ENCODER+DECODER for an encoder-decoder of unequal sides.
``python benchmarks/translation_study.py score NAME=FILE ...``
    BLEU and chrF (sacrebleu) of test-split translations (``clusterlm eval --split test
    --translations FILE``) on John and on Ruth + Jonah + Philemon, against the Spanish text, next
    to copying the source and word-for-word translation with FreeDict's English-Spanish
    dictionary (``dict-freedict-eng-spa``); then sample translations.
"""

from __future__ import annotations

import gzip
import re
import sys

import sacrebleu

from clusterlm.data.bible import TEST_BOOKS, read_bible
from clusterlm.data.pair_batches import JoinedPairStream, PairStream, trimmed_length
from clusterlm.data.translation import load_translation
from clusterlm.models import ModelArgs, training_flops_per_token

BOOK_SETS = {"John": ("John",), "Ruth+Jonah+Philemon": ("Ruth", "Jonah", "Phlm")}
FREEDICT = "/usr/share/dictd/freedict-eng-spa"
SEED, POOL_BATCHES, WIDTH, HEADS = 1337, 50, 256, 4
SAMPLES = ("John.1.1", "John.3.16", "John.11.35", "Ruth.1.16", "Jonah.3.4")


def flops(data: str, steps: int, flavour: str, layers: str, nproc: int, micro: int) -> None:
    task = load_translation(data)
    split, eot, vocab = task.splits["train"], task.manifest.eot_id, task.manifest.vocab_size
    seq2seq = flavour == "mbart"
    block = 96 if seq2seq else 192
    stream = (PairStream if seq2seq else JoinedPairStream)(split, eot, pool=POOL_BATCHES * micro)
    sizes = {"n_head": HEADS, "n_kv_head": HEADS, "n_embd": WIDTH, "ffn_hidden": 4 * WIDTH}
    encoder, _, decoder = layers.partition("+")
    sizes |= {"n_layer": int(encoder), "decoder_layers": int(decoder or 0)}
    args = ModelArgs(flavour=flavour, block_size=block, vocab_size=vocab, **sizes)
    print(f"{training_flops_per_token(args, block) / 1e6:.1f} MFLOP per position at {block}")
    order, lengths = stream.sample_order(SEED, block), stream.pair_lengths(block)
    total = positions = target_tokens = 0.0
    for sample in range(0, steps * nproc * micro, micro):
        pairs = [order(i) for i in range(sample, sample + micro)]
        length = trimmed_length(int(lengths[pairs].max()), block)
        total += micro * length * training_flops_per_token(args, length)
        positions += micro * length
        cut = block if seq2seq else block // 2
        target_tokens += sum(min(len(split.tgt[p]), cut) for p in pairs)
    print(
        f"{flavour} {layers} layers, {steps} steps: {total:.4g} FLOPs, {positions:.4g} "
        f"positions, {target_tokens:.4g} target tokens, {steps * nproc * micro} pairs"
    )


def dictionary() -> dict[str, str]:
    """Each FreeDict headword's first translation. The index lists a phrase under its first word
    ("in /inðbiginiŋ/", in the beginning), so of a headword's entries the one whose headline is
    the headword (any case) with the shortest pronunciation is the word itself."""
    data = gzip.open(f"{FREEDICT}.dict.dz").read()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(text: str) -> int:
        value = 0
        for char in text:
            value = value * 64 + alphabet.index(char)
        return value

    best: dict[str, tuple[int, str]] = {}  # headword -> (pronunciation length, translation)
    for line in open(f"{FREEDICT}.index", encoding="utf-8"):
        head, offset, size = line.rstrip("\n").split("\t")
        entry = data[number(offset) : number(offset) + number(size)].decode("utf-8")
        title, *senses = entry.split("\n")
        written, _, sound = title.partition(" ")
        first = re.sub(r"^\d+\. ", "", senses[0]).split(",")[0].strip() if senses else ""
        if first and written.lower() == head and len(sound) < best.get(head, (1 << 30, ""))[0]:
            best[head] = (len(sound), first)
    words = {head: translation for head, (_, translation) in best.items()}
    return words


def word_for_word(text: str, words: dict[str, str]) -> str:
    """Each English word replaced by its first translation (tried in lower case, as written, then
    without an -s, -es, -ed, -eth or -ing ending); words the dictionary lacks and punctuation
    stay."""

    def one(match: re.Match[str]) -> str:
        word = match.group(0)
        lower = word.lower()
        endings = ("s", "es", "ed", "eth", "ing")
        stems = [lower[: -len(e)] for e in endings if lower.endswith(e)]
        for candidate in (lower, word, *stems):
            if candidate in words:
                return words[candidate]
        return word

    return re.sub(r"[A-Za-z]+", one, text)


def score(files: list[str]) -> None:
    test = [p for p in read_bible().pairs if p.book in TEST_BOOKS]
    systems = {"copy the source": [p.english for p in test]}
    words = dictionary()
    systems["word for word (FreeDict)"] = [word_for_word(p.english, words) for p in test]
    for named in files:
        name, path = named.split("=", 1)
        systems[name] = open(path, encoding="utf-8").read().split("\n")[: len(test)]
        assert len(systems[name]) == len(test), f"{path}: not one line per test pair"
    print("| system | " + " | ".join(f"{s} BLEU | {s} chrF" for s in BOOK_SETS) + " |")
    for name, texts in systems.items():
        cells = []
        for books in BOOK_SETS.values():
            chosen = [i for i, p in enumerate(test) if p.book in books]
            hyp, ref = [texts[i] for i in chosen], [[test[i].spanish for i in chosen]]
            bleu, chrf = sacrebleu.corpus_bleu(hyp, ref), sacrebleu.corpus_chrf(hyp, ref)
            cells += [f"{bleu.score:.1f}", f"{chrf.score:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for ref in SAMPLES:
        i = next(i for i, p in enumerate(test) if p.ref == ref)
        print(f"\n{ref}\n  English: {test[i].english}\n  Spanish: {test[i].spanish}")
        for name, texts in systems.items():
            print(f"  {name}: {texts[i]}")


if __name__ == "__main__":
    if sys.argv[1] == "flops":
        data, steps, flavour, layers, *numbers = sys.argv[2:]
        flops(data, int(steps), flavour, layers, *(int(n) for n in numbers))  # type: ignore[arg-type]
    else:
        score(sys.argv[2:])
