"""Where generation ends: format compliance and tokens generated after ``</answer>``, judged as the hackathon does.

For each trained run, the final LoRA generates greedily for the held-out prompts twice, with the run's generation
budget: once as the judges' template does it (its ``Sampler`` and a stand-in ``TunixHackathonJudge`` that passes no
stop tokens, so Tunix stops only on the tokenizer's EOS: ``tests/judges_procedure.py``), once as our evaluation
does (``model.generate``: stop at ``<end_of_turn>`` or EOS). A run trained before the rows ended in EOS shows
what the judges would have read; one trained after, that the output ends where the answer ends either way.
Writes ``benchmarks/results_stop_tokens.md``.

    .venv/bin/python benchmarks/bench_stop_tokens.py --preset cpu-tiny --data DATA --run NAME=RUN [--run NAME=RUN]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench_data_prep import cpu_model  # noqa: E402
from judges_procedure import EVALUATE, MAKE_SAMPLER, run_cells  # noqa: E402

import config  # noqa: E402
import data_prep  # noqa: E402
import eval_samples  # noqa: E402
import kaggle_weights  # noqa: E402
from chat_format import END_OF_TURN, PROMPT_TEMPLATE, check_format, tokens_after_answer  # noqa: E402

RESULTS_PATH = Path(__file__).with_name("results_stop_tokens.md")


def judged_outputs(lora_policy: object, tokenizer: object, questions: list[str], max_prompt_length: int,
                   budget: int) -> list[list[int]]:
    """Generated tokens per question, as the template's cells generate them (no stop tokens passed: EOS only)."""
    from tunix.generate import sampler as sampler_lib

    kernel = {"sampler_lib": sampler_lib, "lora_policy": lora_policy, "tokenizer": tokenizer,
              "model_config": lora_policy.config, "MAX_PROMPT_LENGTH": max_prompt_length,
              "MAX_GENERATION_STEPS": budget, "PROMPT_TEMPLATE": PROMPT_TEMPLATE, "JUDGE_QUESTIONS": questions,
              "INF_TEMPERATURE": 0, "INF_TOP_K": 1, "INF_TOP_P": None, "SEED": 42}
    result = run_cells(kernel, MAKE_SAMPLER, EVALUATE)["Result"]
    return [[int(t) for t in tokens] for tokens in result.tokens]


def measure(cfg: config.Config, run_dir: Path, data_dir: Path) -> dict[str, dict[str, float]]:
    """Compliance, outputs that close </answer>, tokens after it and budget hits, per stop rule."""
    import jax

    from model import build_model, generate, make_mesh
    from rundir import checkpoint_step, restore_lora

    budget = data_prep.resolve_max_new_tokens(cfg, data_dir)
    prompts = eval_samples.eval_prompts(cfg, data_dir)
    tokenizer = kaggle_weights.load_tokenizer(cfg.model)
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        lora_policy = build_model(cfg, mesh)
        restore_lora(lora_policy, run_dir, checkpoint_step(run_dir))
        ours = generate(lora_policy, tokenizer, prompts, dataclasses.replace(cfg.eval, max_new_tokens=budget),
                        "tuned", show_progress=False)
        judged = judged_outputs(lora_policy, tokenizer, [p["prompt"] for p in prompts],
                                data_prep.prompt_budget(cfg.data), budget)
    outputs = {
        "EOS only (Sampler default, the judges' call)": [
            (tokenizer.decode(t), len(t), tokens_after_answer(t, tokenizer.decode)) for t in judged],
        f"{END_OF_TURN} or EOS (our evaluation)": [
            (r["output"], r["generated_tokens"], r["tokens_after_answer"]) for r in ours]}
    rows = {}
    for rule, samples in outputs.items():
        after = [n for _, _, n in samples if n is not None]
        rows[rule] = {
            "prompts": len(samples), "compliant": sum(check_format(text, n >= budget).ok for text, n, _ in samples),
            "closed": len(after), "after_mean": statistics.fmean(after) if after else float("nan"),
            "after_max": max(after, default=0), "budget_hits": sum(n >= budget for _, n, _ in samples),
            "budget": budget}
    return rows


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| run | stop tokens | well-formed | close `</answer>` | tokens after `</answer>`, mean / max "
             "| hit the budget |", "|---|---|---|---|---|---|"]
    for run, rows in results.items():
        lines += [f"| {run} | {rule} | {r['compliant']}/{r['prompts']} | {r['closed']}/{r['prompts']} | "
                  f"{r['after_mean']:.1f} / {r['after_max']} | {r['budget_hits']}/{r['prompts']} "
                  f"(budget {r['budget']}) |" for rule, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--data", required=True, help="prepared data: held-out prompts and the generation budget")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    args = parser.parse_args()
    cfg = config.get_config(args.preset, {"data.out_dir": args.data})
    load_before = os.getloadavg()[0]
    results = {}
    for item in args.run:
        name, _, run_dir = item.partition("=")
        results[name] = measure(cfg, Path(run_dir), Path(args.data))
        print(table({name: results[name]}))
    command = " ".join(["benchmarks/bench_stop_tokens.py", *sys.argv[1:]])
    RESULTS_PATH.write_text(f"""# Where generation ends, under the judges' stop rule and ours

Command: `.venv/bin/python {command}`

Machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {platform.python_version()}; 1-minute load average
{load_before:.1f} before and {os.getloadavg()[0]:.1f} after. Preset `{args.preset}`: every held-out prompt of the
prepared data, greedy, the run's generation budget. "EOS only" is the hackathon template's Sampler called by a
stand-in judge that passes no stop tokens (Tunix then stops on the tokenizer's EOS alone); well-formed is
`chat_format.check_format` of the whole output (a trailing `{END_OF_TURN}` is allowed, anything after it is text
outside the tags), and an output that hit the budget is not well-formed. Tokens after `</answer>` count the
outputs that close it.

{table(results)}
""")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
