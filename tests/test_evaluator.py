"""The eval loop shows its progress over every batch of the split (a long eval no longer sits
silent), counted by the loader's `eval_batch_count`."""

import pytest

from finetune_jax import progress
from finetune_jax.training import builder
from tests.helpers import tiny_config
from tests.test_sft_train import tiny_sft_config
from tests.test_token_classification import ner_config


def test_an_eval_shows_progress_over_every_batch(tiny_bert_dir, sst2_slice, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line per batch (stderr: a log)
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.train.batch_size = 16  # 40 validation rows: two full batches and a padded one
    setup = builder.build(config)
    split = setup.data.load("validation")
    capsys.readouterr()
    result = setup.evaluate(setup.pretrained_params(), split)
    assert result["examples"] == 40
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"eval: {i}/3 batches" for i in (1, 2, 3)]


@pytest.mark.parametrize("kind", ["text", "ner", "chat"])
def test_eval_batch_count_is_the_number_of_eval_batches(kind, request):
    if kind == "text":
        sst2 = request.getfixturevalue("sst2_slice")
        config = tiny_config(request.getfixturevalue("tiny_bert_dir"), sst2, batch_size=16)
    elif kind == "ner":  # 24 sentences
        config = ner_config(request.getfixturevalue("tiny_token_bert_dir"), batch_size=16)
    else:  # 8 conversations packed into 1,024-token rows: fewer rows than conversations
        overrides = {"train.batch_size": 2, "data.max_length": 1024}
        config = tiny_sft_config(request.getfixturevalue("tiny_chat_llama_dir"), **overrides)
    data = builder.build(config).data
    split = data.load("test" if kind == "chat" else "validation")
    count = sum(1 for _ in data.eval_batches(split))
    assert data.eval_batch_count(split) == count
    if kind == "chat":
        assert count < len(split) / 2  # so a count by conversations would be wrong
