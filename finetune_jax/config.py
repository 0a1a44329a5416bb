"""The config schema: every key a run understands, with its default.

Experiment files in `configs/` start from `base_config()` and set values, so a typo in a
config file or on the command line (`--config.optim.lrr=3e-5`) is an error instead of a
silently ignored key: the ConfigDicts are locked after construction.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults for a sequence-classification fine-tune; `configs/**.py` override them."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # params init of new heads, dropout and data order (not the splits)
    c.model = _model()
    c.data = _data()
    c.optim = _optim()
    c.peft = _peft()
    c.train = _train()
    c.generate = _generate()
    c.mesh = _mesh()
    c.mesh_dcn = _mesh_dcn()
    c.sharding = _sharding()
    c.lock()
    return c


def _model() -> ml_collections.ConfigDict:
    """Which pretrained model, how it computes, how its new head starts."""
    s = ml_collections.ConfigDict()
    s.name = "all-minilm-l6-v2"  # local HF dir, packaged alias, or hub id
    s.dtype = "float32"  # compute dtype (float32 | bfloat16)
    # Storage dtype of the params: bfloat16 halves the memory of (frozen) weights; updates to
    # bf16 params lose precision, so train in float32 unless memory forces it.
    s.param_dtype = "float32"
    s.remat = "none"  # none | full | dots_saveable: recompute activations in backward
    # Run the layers as one nn.scan over params stacked along a leading `layers` axis:
    # compile time and program size stop growing with depth. Params then sit at
    # `model/layers/...` (not `model/layers_{i}/...`); rules still see per-layer paths.
    s.scan_layers = False
    s.dropout = -1.0  # <0: keep the pretrained config's dropout
    # Causal LMs: the loss applies the LM head to this many tokens of each row at a time
    # (recomputed chunk by chunk in the backward pass), so no [batch, length, vocab] float32
    # logits exist (17 GB for a 128k vocabulary at 8 x 4096 tokens); the loss's scratch is
    # then ~2 x [batch, chunk, vocab] float32, at the price of one more head matmul. 0 = full
    # logits (the plain form, for comparison); rows of at most `chunk` tokens take it anyway.
    # A length it does not divide gets a weight-0 padded last chunk.
    s.lm_loss_chunk = 512
    # The new head's bias: "zeros" (as HF) or "prior", the train labels' prior — their mean
    # for regression, log class frequencies for classification — so the first steps learn
    # the task instead of the label offset (STS-B's scores average 2.7, not 0).
    s.head_bias_init = "zeros"
    # Where the params start: "pretrained" (the checkpoint's weights; a new head from the
    # seed) | "random" (every param, backbone included, from the family's init with the run's
    # seed; no weights are read): the baseline that shows what pretraining buys.
    s.init = "pretrained"
    # Semantic segmentation heads (models/segmentation_heads.py): "linear" (DINOv2's linear
    # protocol: a per-patch classifier upsampled bilinearly) | "decoder" (two conv +
    # upsampling stages and a full-resolution pixel branch).
    s.segmentation_head = "linear"
    s.segmentation_layers = 1  # the last k blocks' patch tokens the head reads, concatenated
    s.segmentation_cls_token = False  # also the CLS token beside each patch token (per layer)
    s.decoder_channels = 128  # the decoder's first-stage width (halved twice; a multiple of 4)
    return s


def _data() -> ml_collections.ConfigDict:
    """The task, where its files are, lengths, splits and subsets.

    Grouped by who reads them: every kind, then text (classification and token
    classification), chat, image and speech keys. A key set for a kind that does not read it
    is an error naming it (`tasks/kind.py`'s `check_data_keys`); the README's key table
    lists which kind reads which.
    """
    s = ml_collections.ConfigDict()
    # -- every kind -------------------------------------------------------------------------
    # A registered task: a text preset (sst2, mrpc, rte, cola, stsb, rotten_tomatoes), a
    # generic kind (text_classification, multi_label, regression, token_classification:
    # your own files), or a chat / image / speech / NER task (`finetune_jax/tasks/`).
    s.task = "sst2"
    s.dir = ""  # local dir with the task's files; "" = load from the HF hub
    # Per split, a path or glob (relative to data.dir when that is set). All "" = the
    # preset's files; any set = these files only (a split left "" is not available).
    s.files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
    s.eval_split = "validation"  # evaluated every train.eval_every steps; picks "best"
    # Selection set: this many train rows are held out (fixed by split_seed, not by seed) and
    # evaluated as split "holdout"; set eval_split="holdout" to select on them.
    s.holdout_rows = 0
    s.max_train_rows = 0  # train on a random subset of this many rows; 0 = all
    s.max_eval_rows = 0  # evaluate a random subset of this many rows (holdout too); 0 = all
    s.split_seed = 0  # draws holdout and subsets; the same for every seed of a sweep
    # Draw the holdout and the row caps per class, in proportion (classification tasks:
    # text or image; ELPV stratifies by defect grade x cell type, so its binary and
    # 4-grade tasks share one split). Needs labels known before the split.
    s.stratify = False
    # -- several kinds ----------------------------------------------------------------------
    # An HF dataset (`datasets.load_dataset` name, or a save_to_disk dir) for text tasks with
    # format "hub", image_hub, speech and translation tasks.
    s.hub_name = ""
    # The label column (text and image tables / hub datasets): class names, a list of names
    # (jsonl / parquet) or names joined by label_delimiter (csv / tsv) for multi_label, a
    # float for regression. "" = the task's ("label"; multi_label: "labels").
    s.label_column = ""
    # Class names, index = class id (text, token and image classification). () = read from
    # the train split (sorted unique values), printed at start and saved as
    # <workdir>/label_names.json, which eval / export / predict read back so ids never shift.
    s.label_names = ()
    # Tokens per row: text rows; token classification: word pieces; chat rows; speech: the
    # decoder's row (prompt + transcript tokens + EOS); translation: the source and the
    # target row each (longer ones are cut, with a warning saying how many).
    s.max_length = 64
    # Tokenized splits (<cache_dir>/text_tokens) and log-mel features
    # (<cache_dir>/audio_features); "" = $FINETUNE_JAX_CACHE (or ~/.cache/finetune_jax).
    s.cache_dir = ""
    # -- text (classification; the first three also token classification) -------------------
    # csv | tsv | jsonl | parquet | hub (token classification also conll); "" = the
    # preset's, else the train file's extension. "hub" loads data.hub_name.
    s.format = ""
    s.text_columns = ()  # the 1 or 2 text columns; () = the preset's ("text")
    s.label_delimiter = "|"  # multi_label in csv / tsv: "sports|politics" = two labels
    s.label_range = ()  # regression: (low, high) a score must lie in; () = any finite float
    s.buckets = (16, 32, 64)  # padded lengths (also translation): bounds the compiled shapes
    s.prefetch = 2  # training batches prepared ahead in a background thread; 0 = in the step
    # -- token classification (NER) ----------------------------------------------------------
    s.tokens_column = "tokens"  # jsonl / parquet / hub: the list of words of a sentence
    s.tags_column = "tags"  # ... and the list of their tags (names, or ids with label_names)
    s.tag_scheme = "IOB2"  # IOB2 (= BIO) | IOB1: how the files' tags mark entity starts
    # Which word pieces carry a word's tag: "first" (the rest are ignored, as BERT's paper
    # and transformers' examples) | "all" (later pieces of a B- word get its I- tag).
    s.label_pieces = "first"
    # -- chat (causal-LM SFT) ------------------------------------------------------------------
    s.packing = True  # several examples per max_length row
    # -- image classification ------------------------------------------------------------------
    # Output side of the model's image processor (resize + centre crop keep its ratio, e.g.
    # DINOv2's 256/224); 0 = as the model saved it. Any multiple of the patch size works:
    # the position grid is interpolated.
    s.image_size = 0
    s.augment = True  # random resized crop + flip on training batches (never on eval)
    s.augment_scale = (0.35, 1.0)  # area fraction range of the random crop
    s.augment_flip = True  # random horizontal flips in the augmentation
    s.image_column = "image"  # table and hub tasks: the image (path) column
    # Image files that do not open (checked as a split loads, before step 1): "error" stops
    # naming them all; "skip" leaves them out of the split and prints how many.
    s.bad_images = "error"
    # -- object detection (image keys above apply too: image_size, augment*, image_column) -----
    # Boxes per image the targets are padded to (fixed batch shapes); an image with more is an
    # error naming it.
    s.max_boxes = 100
    s.max_detections = 100  # detections kept per image (top scores), as COCO's mAP scores
    # IoU over which a lower-scored box of the same class is suppressed (on device, after the
    # heatmap's 3x3 peak picking); 1 = no NMS.
    s.nms_iou = 0.6
    s.objects_column = "objects"  # hub datasets: {"bbox": [...], "category": [...]} per image
    s.box_format = "xywh"  # hub datasets' boxes: xywh (COCO: corner, width, height) | xyxy
    # predict: draw each image's detections scoring at least this on its picture
    # (--pictures); every detection goes to the output file whatever its score.
    s.draw_score = 0.3
    # -- semantic segmentation (image keys above apply too: image_size, augment*, image_column) --
    s.mask_dir = "masks"  # folders: the sub-folder of each split holding one mask per image
    s.mask_column = "mask"  # hub datasets: the column of masks (images of class ids)
    s.ignore_index = 255  # mask value of pixels no loss or metric counts
    # Training batches are crop_size x crop_size crops (placed by the augmentation: with
    # augment_scale near (crop_size / image side)^2 the items keep their size), while eval
    # and predict see whole images at image_size; 0 = image_size. Crops cost the backbone
    # (crop_size / image_size)^2 of a whole image per training example.
    s.crop_size = 0
    # -- speech recognition ---------------------------------------------------------------------
    # Audio window in seconds: 30 is Whisper's own; a shorter one uses the first encoder
    # positions only (much cheaper; see README "Fine-tune Whisper" for its effect on WER).
    s.audio_seconds = 30.0
    s.audio_column = "audio"  # hub / table speech tasks: the audio column
    s.transcript_column = "text"  # ... and the reference transcript column
    # -- translation -----------------------------------------------------------------------------
    s.source_column = "en"  # jsonl / csv / tsv / parquet / hub rows: the text to translate
    s.target_column = "pt_BR"  # ... and its reference translation (what training imitates)
    return s


def _optim() -> ml_collections.ConfigDict:
    """AdamW, its schedule, and which params train at what lr (rules as data)."""
    s = ml_collections.ConfigDict()
    s.lr = 1e-4  # peak learning rate, reached after warmup
    s.schedule = "linear"  # linear | cosine | constant (after warmup)
    s.warmup_fraction = 0.1  # of train.max_steps: linear warmup from 0 to lr
    s.b1 = 0.9  # AdamW first-moment decay
    s.b2 = 0.999  # AdamW second-moment decay
    s.eps = 1e-8  # AdamW denominator epsilon
    s.weight_decay = 0.01  # decoupled (AdamW), on the params decay_rules select
    s.clip_norm = 1.0  # global norm over trainable leaves; <=0 disables
    s.state_dtype = "float32"  # storage dtype of AdamW's moments (mu, nu): float32 | bfloat16
    # How updates land in bf16-stored params and moments: auto | nearest | stochastic | kahan
    # (README "bf16 storage that trains like float32"); auto = the measured best wherever
    # model.param_dtype or state_dtype is bfloat16, nothing extra in float32.
    s.bf16_rounding = "auto"
    # Which params train, and at what lr multiplier: a preset, or explicit rules.
    # full | linear_probe | bitfit | top_k_layers | llrd | lora | rules; lora (alias peft)
    # trains the adapter params of any peft.method + the head.
    s.preset = "full"
    s.top_k = 2  # for top_k_layers
    s.llrd_decay = 0.8  # for llrd: layer i of N gets decay**(N - i)
    # The task head the presets train (linear_probe, bitfit, top_k_layers, lora): a regex;
    # "auto" = the model family's head for the task's kind (BERT's sequence head:
    # classifier + pooler; "" for an LM head tied to the embedding).
    s.head = "auto"
    # Finds a param's layer index (group 1) for top_k_layers / llrd; "auto" = the family's
    # (`.*/layer_(\d+)/.*` for BERT and ViT, `.*/layers_(\d+)/.*` for Llama and Whisper).
    s.layer = "auto"
    # (regex, label) pairs used when preset == "rules"; label: "trainable", "frozen" or an
    # lr multiplier (float). First full match wins; every param must be matched.
    s.rules = ()
    # (regex, bool): which params get weight decay (none for biases and norms).
    s.decay_rules = (
        (r".*/bias", False),
        (r".*LayerNorm/.*", False),
        (r".*norm/.*", False),
        (r".*", True),
    )
    return s


def _peft() -> ml_collections.ConfigDict:
    """Parameter-efficient fine-tuning: the method, and what it adapts."""
    s = ml_collections.ConfigDict()
    # lora | dora | ia3 | prompt (README "PEFT methods"). lora adds (x A) B to the targeted
    # kernels; dora also a trained magnitude per output feature; ia3 a trained scale of their
    # output (keys, values) or input (peft.feedforward); prompt peft.num_virtual_tokens
    # trained input embeddings. Train it with optim.preset=lora (alias peft: the adapter
    # params + head) or explicit optim.rules.
    s.method = "lora"
    # lora / dora: the rank of A and B; 0 with method lora = no PEFT at all. ia3 and prompt
    # have no rank and ignore it (and peft.alpha).
    s.rank = 0
    s.alpha = 16.0  # lora / dora: the update is scaled by alpha / rank
    s.dropout = 0.0  # lora / dora: on the adapter branch's input only
    # lora / dora / ia3: a regex full-matching the '/'-joined paths of the kernels adapted.
    # "auto" = the family's: lora / dora its attention query/value kernels (BERT, ViT:
    # attention/(query|value); Llama: self_attn/(q_proj|v_proj); Whisper: also
    # encoder_attn); ia3 HF PEFT's (BERT: key, value and both output projections; Llama:
    # k_proj, v_proj, down_proj). prompt adapts no kernel: leave it "auto".
    s.targets = "auto"
    # ia3: which of the targets are scaled on their input (HF PEFT's feedforward_modules);
    # "auto" = the family's (BERT: .*/output/kernel; Llama: .*/mlp/down_proj/kernel).
    s.feedforward = "auto"
    # prompt: trained virtual tokens prepended to every input (decoders and encoders);
    # they start as the embeddings of random vocabulary tokens.
    s.num_virtual_tokens = 20
    # QLoRA: none | nf4 | int8 | q4_1. The frozen kernels peft.quantize_targets matches are
    # stored quantized on the devices and dequantized inside each layer, under any method's
    # adapter: nf4 (QLoRA's NormalFloat4, blocks of 64, double-quantized absmax: 4.127
    # bits/weight), int8 (per output feature absmax: 8 bits + a float per feature) or q4_1
    # (llama.cpp's blocks of 32 with f16 scale and minimum: 5 bits; a Q4_1 GGUF such as the
    # packaged SmolLM2 keeps its own blocks, exactly). Embeddings, norms and the LM head stay
    # float. README "QLoRA".
    s.quantize = "none"
    # peft.quantize != none: a regex full-matching the '/'-joined paths of the kernels
    # stored quantized; "auto" = the family's attention and MLP projections (Llama:
    # self_attn/(q|k|v|o)_proj, mlp/(gate|up|down)_proj).
    s.quantize_targets = "auto"
    return s


def _train() -> ml_collections.ConfigDict:
    """Batch, steps, logging, evals, checkpoints, selection and fault handling."""
    s = ml_collections.ConfigDict()
    s.batch_size = 32  # global, over all processes
    s.microbatches = 1  # gradient accumulation inside the step: batch_size / microbatches each
    s.max_steps = 1000  # optimizer steps; the lr schedule ends here
    # Intervals in steps; 0 = none periodic. The last step always logs, evaluates (the best
    # checkpoint and the summary need one eval) and saves; an eval also logs and saves.
    s.log_every = 20
    s.eval_every = 100  # on data.eval_split
    s.checkpoint_every = 100  # in <workdir>/checkpoints
    s.keep_checkpoints = 2  # the last K, plus the best by train.metric
    s.metric = ""  # "" = the task's main metric
    s.patience = 0  # evals without improvement before stopping; 0 = never stop early
    s.async_checkpoint = True  # write checkpoints in the background (Orbax)
    # False: a run with frozen params (LoRA, linear probe, ...) checkpoints only what trains
    # and streams the frozen ones from model.name again on resume / eval / export / predict,
    # refusing if they changed; True: checkpoints hold the frozen params too (for a source
    # that will not stay readable).
    s.checkpoint_frozen = False
    s.nonfinite = "halt"  # halt: stop with an error naming step and param | skip: drop the update
    s.progress = True  # tqdm bar; False: one plain line of train metrics per log step
    # After the last step, evaluate the best checkpoint (by train.metric on data.eval_split)
    # on this split, e.g. "validation" when selecting on "holdout"; "" = skip.
    s.final_split = ""
    return s


def _generate() -> ml_collections.ConfigDict:
    """Sample generations the eval script writes for causal-LM tasks; for speech and
    translation tasks, `max_new_tokens` and `num_beams` shape the outputs of every eval."""
    s = ml_collections.ConfigDict()
    # Sample generations written by the eval script for causal-LM tasks.
    s.num_samples = 16  # prompts of the eval split to generate for; 0 = none
    s.max_new_tokens = 256  # per generation (and per speech transcript or translation)
    s.temperature = 0.0  # 0 = greedy
    s.top_k = 0  # sample among the k most likely tokens; 0 = all
    s.batch_size = 8  # prompts (or clips) generated at once
    s.seed = 0  # sampling seed (temperature > 0)
    # Speech transcripts and translations: beam search of this width, 1 = greedy. transformers'
    # algorithm and length penalty (generation_config.json's `length_penalty`, default 1.0:
    # a hypothesis scores sum log p / generated tokens); K rows of decoder cache per input.
    s.num_beams = 1
    return s


def _mesh() -> ml_collections.ConfigDict:
    """Device mesh axes over all devices of all processes."""
    s = ml_collections.ConfigDict()
    # Mesh axes over all devices of all processes; one size may be -1 (= the rest).
    # data: pure data parallel; fsdp: batch split AND params/optimizer state sharded (ZeRO-3
    # style); tensor: heads / MLP / vocab split inside each layer (Megatron style).
    s.data = -1
    s.fsdp = 1  # see above
    s.tensor = 1  # see above
    return s


def _mesh_dcn() -> ml_collections.ConfigDict:
    """Multi-slice / multi-host: how many slices each mesh axis spans over the data-centre
    network (DCN); `mesh` sizes are then per slice. All 1: one slice (or no such split)."""
    s = ml_collections.ConfigDict()
    s.data = 1  # slices the data axis spans
    s.fsdp = 1  # slices the fsdp axis spans
    s.tensor = 1  # slices the tensor axis spans
    return s


def _sharding() -> ml_collections.ConfigDict:
    """Logical axis name -> mesh axis table for params and activations."""
    s = ml_collections.ConfigDict()
    # Logical axis name -> mesh axis (or None = replicated). In order, each rule takes its
    # logical axis if the mesh axes are still free in that array and (for params) split the
    # dimension evenly; otherwise a later rule for the same name may (see param_shardings).
    s.rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("activation_embed", None),
        # vocab before embed: the embedding table and the LM head split their vocabulary over
        # fsdp (vocab-parallel), so no device ever gathers a whole [embed, vocab] matrix or its
        # gradient; a vocabulary fsdp does not divide (BERT's 30,522) falls to the next rule.
        ("vocab", ("fsdp", "tensor")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("kv", None),
        ("mlp", "tensor"),
        ("position", None),
        ("patch", None),  # a ViT patch's pixel values (patch embedding kernel rows)
        ("token_type", None),
        ("classes", None),
        # Per-block statistics of a quantized kernel (peft.quantize: NF4's absmax per 64
        # weights, Q4_1's scale and minimum per 32) along an input dim, 1/64 (1/32) of its
        # size: split like that dim where it divides, else replicated.
        ("embed_blocks", "fsdp"),
        ("embed_blocks", None),
        ("mlp_blocks", "tensor"),
        ("mlp_blocks", None),
        ("heads_blocks", "tensor"),
        ("heads_blocks", None),
        ("kv_blocks", None),
        ("lora_rank", None),  # LoRA's rank dim; its other dims follow the base weight's
        ("virtual_tokens", None),  # prompt tuning's virtual tokens (peft.method=prompt)
        ("layers", None),  # leading layer axis of stacked params (model.scan_layers)
    )
    return s


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], source: str
) -> ml_collections.ConfigDict:
    """Sets dotted keys (`optim.lr`) in a locked config, in place; returns it.

    An unknown key or section, or a value of the wrong type, is an error naming the key and
    `source` (where the override was written, e.g. "sweep experiments/x/sweep.py").
    """
    for key, value in overrides.items():
        problem = key_problem(config, key)
        if problem:
            raise KeyError(f"unknown config key {key!r} in {source}{problem}")
        *sections, leaf = key.split(".")
        node = config
        for part in sections:
            node = node[part]
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except TypeError as e:
            raise TypeError(f"config key {key!r} in {source}: {e}") from None
    return config


def key_problem(config: ml_collections.ConfigDict, key: str) -> str:
    """Why dotted `key` names no value of `config`, as the tail of a message: ": 'optimizer'
    is not a config section; did you mean 'optim'? ..." or "; keys there: ..., lr, ...;
    did you mean 'lr'?"; "" when it names one."""
    *sections, leaf = key.split(".")
    node = config
    for i, part in enumerate(sections):
        where = ".".join(sections[: i + 1])
        if part not in node:
            known = sorted(k for k in node.keys() if isinstance(node[k], ml_collections.ConfigDict))
            hint = did_you_mean(part, known)
            return (
                f": {where!r} is not a config section{'; ' + hint if hint else ''} (sections "
                f"there: {', '.join(known) or 'none'})"
            )
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            return f": {where!r} is a value, not a config section"
    if leaf in node:
        return ""
    hint = did_you_mean(leaf, node.keys())
    return f"; keys there: {', '.join(sorted(node.keys()))}{'; ' + hint if hint else ''}"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """The phrase "did you mean 'optim'?" for the choices closest to `name`, or "".

    difflib's default cutoff (0.6): ml_collections' 0.75 finds nothing for 'optimizer' vs
    'optim'. A choice that `name` starts with (or that starts with `name`) always counts.
    """
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=2, cutoff=0.6)
    close += [c for c in choices if c not in close and (name.startswith(c) or c.startswith(name))]
    if not close or name in close:
        return ""
    return "did you mean " + " or ".join(repr(c) for c in close[:2]) + "?"
