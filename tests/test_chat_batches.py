"""SFT data: record loading, assistant-only masks, packing, resumable batches, and the packed
loss equalling the unpacked loss on a real (tiny) Llama."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from finetune_jax.data import chat_batches
from finetune_jax.data.text_sources import DataError
from finetune_jax.hf import model_files
from finetune_jax.tasks import losses
from tests.helpers import SHARED_DATA, load_llama

GSM8K = SHARED_DATA / "gsm8k"
ALPACA_EVAL = SHARED_DATA / "alpaca_eval" / "alpaca_eval_text_davinci_003.json"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, built from the packaged GGUF once (~8 s)."""
    transformers = pytest.importorskip("transformers")
    try:
        path = model_files.resolve_gguf("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _synthetic(n: int = 40, max_length: int = 60, seed: int = 0) -> list[chat_batches.Example]:
    """Random token ids (vocab 256) with a trained reply after a random-length prompt."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(2, max_length + 1))
        ids = rng.integers(1, 256, size=length).astype(np.int32)
        trained = np.arange(length) >= rng.integers(1, length)
        examples.append((ids, trained))
    return examples


def _segments(rows, r):
    """[(segment id, start, end)] of row r, in order."""
    segment_ids = rows["segment_ids"][r]
    spans = []
    for s in np.unique(segment_ids[segment_ids > 0]):
        where = np.flatnonzero(segment_ids == s)
        assert where.tolist() == list(range(where[0], where[-1] + 1))  # contiguous
        spans.append((int(s), int(where[0]), int(where[-1]) + 1))
    return spans


# ------------------------------------------------------------------------------- loading


def test_load_gsm8k_train_and_test():
    train = chat_batches.load_records(GSM8K)  # a directory means its {split}.jsonl
    test = chat_batches.load_records(GSM8K, "gsm8k", split="test")
    assert (len(train), len(test)) == (7473, 1319)
    first = json.loads((GSM8K / "train.jsonl").read_text().split("\n")[0])
    assert train[0] == [
        {"role": "user", "content": first["question"]},
        {"role": "assistant", "content": first["answer"]},
    ]
    assert all(c[1]["content"].rsplit("\n", 1)[-1].startswith("#### ") for c in train)
    assert chat_batches.load_records(GSM8K / "train.jsonl", limit=5) == train[:5]


def test_load_alpaca_eval_json_array():
    records = chat_batches.load_records(ALPACA_EVAL)
    raw = json.loads(ALPACA_EVAL.read_text())
    assert len(records) == len(raw) == 805
    assert records[10] == [
        {"role": "user", "content": raw[10]["instruction"]},
        {"role": "assistant", "content": raw[10]["output"]},
    ]
    assert chat_batches.load_records(ALPACA_EVAL, "alpaca", limit=3) == records[:3]


def test_load_messages_and_alpaca_input(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    lines = [json.dumps({"messages": conversation, "id": i}) for i in range(3)]
    path = _write(tmp_path, "chat.jsonl", "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    assert chat_batches.load_records(path) == [conversation] * 3
    rows = [
        {"instruction": "Add.", "input": "2 3", "output": "5"},
        {"instruction": "Hi", "input": "", "output": "Yo"},
    ]
    path = _write(tmp_path, "alpaca.jsonl", "\n".join(json.dumps(r) for r in rows))
    records = chat_batches.load_records(path)
    assert records[0][0]["content"] == "Add.\n\n2 3" and records[1][0]["content"] == "Hi"
    assert records[0][1] == {"role": "assistant", "content": "5"}


@pytest.mark.parametrize(
    "name, text, fmt, message",
    [
        (
            "bad.jsonl",
            '{"question": "q", "answer": "a"}\n\n{"question": "q",\n',
            "auto",
            "line 3: invalid JSON",
        ),
        (
            "bad.jsonl",
            '{"question": "q", "answer": "a"}\n{"question": "q"}\n',
            "auto",
            "line 2: missing key 'answer'",
        ),
        (
            "bad.jsonl",
            '{"question": "q", "answer": 7}\n',
            "gsm8k",
            "line 1: 'answer' must be a string",
        ),
        (
            "bad.jsonl",
            '{"instruction": "i", "output": "o"}\n',
            "gsm8k",
            "line 1: missing key 'question'",
        ),
        ("bad.jsonl", '{"text": "hello"}\n', "auto", "line 1: cannot tell the format"),
        ("bad.jsonl", '["not", "an", "object"]\n', "auto", "line 1: expected a JSON object"),
        (
            "bad.jsonl",
            '{"messages": [{"role": "user", "content": "q"}]}\n',
            "auto",
            "line 1: no assistant",
        ),
        (
            "bad.jsonl",
            '{"messages": [{"role": "bot", "content": "q"}]}\n',
            "auto",
            "line 1: messages[0] needs a 'role'",
        ),
        (
            "bad.json",
            '[\n  {"instruction": "i", "output": "o"},\n  {"instruction": "i"}\n]\n',
            "auto",
            "line 3: missing key 'output'",
        ),
        (
            "bad.json",
            '[\n  {"instruction": "i", "output": "o"},\n\n  {"instruction": \n]',
            "auto",
            "line 5: invalid JSON",
        ),
        (
            "bad.json",
            '[\n  {"instruction": "i", "output": "o"}\n  {"instruction": "i", "output": "o"}]',
            "auto",
            "line 3: expected ','",
        ),
        ("empty.jsonl", "\n", "auto", "holds no records"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, text, fmt, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=re.escape(message)) as error:
        chat_batches.load_records(path, fmt)
    assert str(path) in str(error.value)


def test_a_record_that_is_not_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl' line 2, byte 50: b'\\xe9' is not UTF-8"):
        chat_batches.load_records(path)


def test_missing_files_and_formats_are_clear(tmp_path):
    with pytest.raises(DataError, match=r"no validation.jsonl .*train.jsonl"):
        chat_batches.load_records(GSM8K, split="validation")
    with pytest.raises(DataError, match="does not exist"):
        chat_batches.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown format"):
        chat_batches.load_records(GSM8K, "sharegpt")


# ------------------------------------------------------------------------------ encoding


def _trained_runs(ids, trained):
    """Contiguous runs of trained tokens, as token-id lists."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    return [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]


def test_gsm8k_trains_exactly_the_answer_and_end_token(tokenizer):
    conversation = chat_batches.load_records(GSM8K, limit=1)[0]
    ids, trained = chat_batches.encode_conversation(conversation, tokenizer, max_length=1024)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert ids.dtype == np.int32 and trained.dtype == bool
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[trained]) == conversation[1]["content"] + "<|im_end|>"
    assert len(_trained_runs(ids, trained)) == 1
    # The template's "\n" after <|im_end|> ends the row and is not trained.
    assert tokenizer.decode(ids[-1:]) == "\n" and not trained[-1]
    assert tokenizer.decode(ids[~trained]).endswith("<|im_start|>assistant\n\n")


def test_multi_turn_trains_every_assistant_reply_and_nothing_else(tokenizer):
    conversation = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks!"},
    ]
    ids, trained = chat_batches.encode_conversation(conversation, tokenizer, max_length=1024)
    replies = [tokenizer.decode(run) for run in _trained_runs(ids, trained)]
    assert replies == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    untrained = tokenizer.decode(ids[~trained])
    assert all(m["content"] in untrained for m in conversation if m["role"] != "assistant")
    short_ids, short_trained = chat_batches.encode_conversation(
        conversation, tokenizer, max_length=40
    )
    assert (
        short_ids.tolist() == ids[:40].tolist() and short_trained.tolist() == trained[:40].tolist()
    )


def test_batched_encoding_matches_one_at_a_time(tokenizer):
    conversations = chat_batches.load_records(ALPACA_EVAL, limit=6)
    batched = chat_batches.encode_conversations(conversations, tokenizer, max_length=128)
    for conversation, (ids, trained) in zip(conversations, batched):
        one_ids, one_trained = chat_batches.encode_conversation(
            conversation, tokenizer, max_length=128
        )
        assert ids.tolist() == one_ids.tolist() and trained.tolist() == one_trained.tolist()


def test_templates_that_cannot_locate_replies_are_rejected(tokenizer):
    conversation = chat_batches.load_records(GSM8K, limit=1)[0]
    original = tokenizer.chat_template
    try:  # a message count in the header changes as messages are added: not prefix-stable
        tokenizer.chat_template = (
            "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        with pytest.raises(chat_batches.TemplateError, match="not prefix-stable"):
            chat_batches.encode_conversation(conversation, tokenizer, 512)
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        )
        with pytest.raises(chat_batches.TemplateError, match="not closed by '<|im_end|>'"):
            chat_batches.encode_conversation(conversation, tokenizer, 512)
    finally:
        tokenizer.chat_template = original
    with pytest.raises(chat_batches.TemplateError, match="not in the vocabulary"):
        chat_batches.encode_conversation(
            conversation, tokenizer, 512, end_token="<|no such token|>"
        )


@pytest.mark.slow  # encodes all 7,473 GSM8K conversations: ~5-10 s
def test_gsm8k_train_packs_densely_at_512(tokenizer):
    examples = chat_batches.encode_conversations(
        chat_batches.load_records(GSM8K), tokenizer, max_length=512
    )
    rows = chat_batches.pack(examples, 512)
    assert rows["input_ids"].shape == (3277, 512)
    assert chat_batches.packing_efficiency(rows) > 0.96
    assert chat_batches.packing_efficiency(chat_batches.pack(examples, 512, packed=False)) < 0.45
    assert rows["loss_mask"].sum() == sum(int(t[1:].sum()) for _, t in examples)


# ------------------------------------------------------------------------------- packing


def test_packing_keeps_examples_whole_and_separate():
    examples = _synthetic(n=60)
    examples.append((np.arange(1, 101, dtype=np.int32), np.arange(100) >= 50))  # > row_length
    rows = chat_batches.pack(examples, 64)
    assert {k: (v.shape, v.dtype.name) for k, v in rows.items()} == {
        **{k: ((len(rows["input_ids"]), 64), "int32") for k in chat_batches.ROW_FIELDS},
        "loss_mask": ((len(rows["input_ids"]), 64), "float32"),
    }
    truncated = [(ids[:64], trained[:64]) for ids, trained in examples]
    found = []
    for r in range(len(rows["input_ids"])):
        segments = _segments(rows, r)
        assert [s for s, _, _ in segments] == list(range(1, len(segments) + 1))
        end = segments[-1][2]  # real tokens first, padding only after the last segment
        assert rows["attention_mask"][r, :end].all() and not rows["attention_mask"][r, end:].any()
        assert not rows["segment_ids"][r, end:].any() and not rows["loss_mask"][r, end:].any()
        for _, a, b in segments:
            ids = rows["input_ids"][r, a:b]
            match = [i for i, (e, _) in enumerate(truncated) if e.tolist() == ids.tolist()]
            found.append(match[0])
            trained = truncated[match[0]][1]
            assert rows["positions"][r, a:b].tolist() == list(range(b - a))
            assert rows["targets"][r, a : b - 1].tolist() == ids[1:].tolist()
            # The last token's "next token" belongs to another segment (or padding): no loss.
            assert rows["loss_mask"][r, a:b].tolist() == [*trained[1:].astype(float), 0.0]
    assert sorted(found) == list(range(len(examples)))  # every example exactly once
    assert rows["loss_mask"].sum() == sum(t[1:].sum() for _, t in truncated)


def test_unpacked_rows_hold_one_example_each_in_order():
    examples = _synthetic(n=10)
    rows = chat_batches.pack(examples, 64, packed=False, pad_id=7)
    assert len(rows["input_ids"]) == 10
    for r, (ids, _) in enumerate(examples):
        assert rows["input_ids"][r, : len(ids)].tolist() == ids.tolist()
        assert (rows["input_ids"][r, len(ids) :] == 7).all()
        assert set(rows["segment_ids"][r].tolist()) <= {0, 1}
        assert rows["attention_mask"][r].sum() == len(ids)


def test_packing_is_deterministic_and_efficient():
    examples = _synthetic(n=300)
    first, second = chat_batches.pack(examples, 128), chat_batches.pack(examples, 128)
    for key in chat_batches.ROW_FIELDS:
        np.testing.assert_array_equal(first[key], second[key])
    total = sum(len(ids) for ids, _ in examples)
    assert chat_batches.packing_efficiency(first) == total / first["input_ids"].size
    assert len(first["input_ids"]) <= -(-total // 128) + 1  # at most one row above the bound
    with pytest.raises(ValueError):
        chat_batches.pack([(np.zeros(0, np.int32), np.zeros(0, bool))], 64)


# ------------------------------------------------------------------------------ batching


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in chat_batches.ROW_FIELDS:
            np.testing.assert_array_equal(a[key], b[key])


def _rows_of(batch, rows):
    """Row indices of `rows` that a batch holds (each row's tokens are unique here)."""
    keys = {r.tobytes(): i for i, r in enumerate(rows["input_ids"])}
    return [keys[r.tobytes()] for r in batch["input_ids"]]


def test_epochs_are_seeded_permutations():
    rows = chat_batches.pack(_synthetic(n=200), 64)
    batches = chat_batches.SFTBatches(rows, 8, seed=5)
    steps = batches.steps_per_epoch
    epoch0 = sum((_rows_of(b, rows) for b in _take(batches, steps)), [])
    expected = np.random.default_rng([5, 0]).permutation(len(rows["input_ids"]))[: steps * 8]
    assert epoch0 == expected.tolist()
    assert batches.state() == {"epoch": 1, "batch_in_epoch": 0}
    assert sum((_rows_of(b, rows) for b in _take(batches, steps)), []) != epoch0


@pytest.mark.parametrize("skip", [3, 10, 25])  # mid-epoch, at an epoch boundary, later epoch
def test_restore_continues_exactly(skip):
    rows = chat_batches.pack(_synthetic(n=150), 64)
    make = lambda: chat_batches.SFTBatches(rows, 8, seed=11)
    assert make().steps_per_epoch == 10
    original = make()
    _take(original, skip)
    saved = json.loads(json.dumps(original.state()))  # must survive a JSON checkpoint
    continued = _take(original, 20)
    resumed = make()
    resumed.restore(saved)
    _assert_same(_take(resumed, 20), continued)
    with pytest.raises(ValueError):
        resumed.restore({"epoch": 0, "batch_in_epoch": 10})


def test_process_slices_concatenate_to_the_global_batch():
    rows = chat_batches.pack(_synthetic(n=150), 64)
    whole = _take(chat_batches.SFTBatches(rows, 8, 4), 30)
    parts = [_take(chat_batches.SFTBatches(rows, 8, 4, p, 2), 30) for p in range(2)]
    for step, batch in enumerate(whole):
        for key in chat_batches.ROW_FIELDS:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
    with pytest.raises(ValueError, match="divisible"):
        chat_batches.SFTBatches(rows, 10, 0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        chat_batches.SFTBatches(rows, 1000, 0)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_in_order(process_count):
    rows = chat_batches.pack(_synthetic(n=20), 64, packed=False)
    per_process = [
        list(chat_batches.eval_batches(rows, 8, p, process_count)) for p in range(process_count)
    ]
    assert [len(b) for b in per_process] == [3] * process_count  # ceil(20 / 8)
    merged = {
        key: np.concatenate([b[key] for step in zip(*per_process) for b in step])
        for key in chat_batches.ROW_FIELDS
    }
    for key in chat_batches.ROW_FIELDS:  # 20 rows in order, then 4 all-zero padding rows
        np.testing.assert_array_equal(merged[key][:20], rows[key])
        assert not merged[key][20:].any()


# ------------------------------------------------------------------- the loss on a real model


def test_causal_lm_loss_is_masked_float32_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]], np.float32)
    logits[0, 2] = np.nan  # a masked position's garbage must not leak into the sum
    total, count = losses.causal_lm_loss(logits.astype(jax.numpy.bfloat16), targets, mask)
    total32, _ = losses.causal_lm_loss(logits, targets, mask)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = np.where(mask > 0, picked, 0).sum()
    assert total.dtype == count.dtype == np.float32 and float(count) == 5.0
    np.testing.assert_allclose(float(total32), expected, rtol=1e-6)
    np.testing.assert_allclose(float(total), expected, rtol=2e-2)


def test_packed_loss_equals_unpacked_loss_on_tiny_llama(tiny_llama_dir):

    _, module, params = load_llama(tiny_llama_dir)
    examples = _synthetic(n=16, max_length=40, seed=3)
    packed, unpacked = (
        chat_batches.pack(examples, 64),
        chat_batches.pack(examples, 64, packed=False),
    )
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])  # several examples per row

    def forward(batch, use_segments):
        logits = module.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            segment_ids=batch["segment_ids"] if use_segments else None,
            positions=batch["positions"],
        )
        return logits, losses.causal_lm_loss(logits, batch["targets"], batch["loss_mask"])

    forward = jax.jit(forward, static_argnums=1)
    packed_logits, (packed_sum, packed_count) = forward(packed, True)
    unpacked_logits, (unpacked_sum, unpacked_count) = forward(unpacked, True)
    assert float(packed_count) == float(unpacked_count) > 0
    np.testing.assert_allclose(float(packed_sum), float(unpacked_sum), rtol=1e-5)

    # Stronger: every example's logits are the same wherever it sits. The control without
    # segment ids (examples attending to each other) shows this comparison can fail.
    leaky_logits, _ = forward(packed, False)
    where = {}  # example tokens -> (row, start) in the packed rows
    for r in range(len(packed["input_ids"])):
        for _, a, b in _segments(packed, r):
            where[packed["input_ids"][r, a:b].tobytes()] = (r, a)
    leak = 0.0
    for u, (ids, _) in enumerate(examples):
        r, a = where[ids.tobytes()]
        alone = np.asarray(unpacked_logits[u, : len(ids)])
        np.testing.assert_allclose(packed_logits[r, a : a + len(ids)], alone, atol=1e-5)
        leak = max(leak, float(np.abs(leaky_logits[r, a : a + len(ids)] - alone).max()))
    assert leak > 1e-3
