"""eval_samples: prompt files, the report from hand-made records, and generation with a tiny model."""

import json

import jax
import numpy as np
import pytest

import chat_format
import data_prep
import eval_samples
import kaggle_weights
import rundir
from chat_format import check_format
from config import ConfigError, get_config
from model import build_model, build_sampler, generate, make_mesh, padded_prompt_length

GOOD = "<reasoning>Two and two make four.</reasoning>\n<answer>4</answer>"


def test_prompt_files_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a?", "domain": "math"}\n\n{"prompt": "b?"}\n')
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second prompt  \n")
    assert eval_samples.load_prompts(jsonl) == [{"domain": "math", "prompt": "a?"},
                                                {"domain": "custom", "prompt": "b?"}]
    assert eval_samples.load_prompts(text, default_domain="x") == [{"domain": "x", "prompt": "first prompt"},
                                                                   {"domain": "x", "prompt": "second prompt"}]


def test_shipped_prompts_cover_the_judged_domains():
    prompts = eval_samples.load_prompts(eval_samples.PROMPTS_PATH)
    assert 25 <= len(prompts) <= 40
    assert {p["domain"] for p in prompts} == {"creative writing", "creative ideation", "summarization",
                                              "basic science", "math", "coding", "other"}


def test_eval_prompts_choice(tmp_path):
    (tmp_path / "eval_prompts.jsonl").write_text('{"prompt": "held", "reference": "r"}\n' * 3)
    tiny = get_config("cpu-tiny", {"eval.num_prompts": "2"})
    assert eval_samples.eval_prompts(tiny, tmp_path) == [{"domain": "held-out", "prompt": "held"}] * 2
    assert len(eval_samples.eval_prompts(get_config("kaggle"), tmp_path)) == 30
    (tmp_path / "mine.txt").write_text("only one\n")
    own = get_config("cpu-tiny", {"eval.prompts": str(tmp_path / "mine.txt")})
    assert eval_samples.eval_prompts(own, tmp_path) == [{"domain": "custom", "prompt": "only one"}]
    (tmp_path / "eval_prompts.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds no prompts"):
        eval_samples.eval_prompts(get_config("cpu-tiny"), tmp_path)


def _record(model, domain, text, truncated=False, batch=0, speed=100.0, prompt=0):
    check = check_format(text, truncated)
    return {"model": model, "domain": domain, "prompt": f"{domain} question {prompt}", "output": text,
            "reasoning": check.reasoning, "answer": check.answer, "format_ok": check.ok, "reason": check.reason,
            "reasoning_tokens": None if check.reasoning is None else len(check.reasoning.split()),
            "answer_tokens": None if check.answer is None else len(check.answer.split()),
            "truncated": truncated, "generated_tokens": len(text.split()), "batch": batch, "tokens_per_s": speed}


def test_report_and_summary_from_hand_made_records(tmp_path):
    records = [
        _record("tuned", "math", "<reasoning>a b c</reasoning><answer>x</answer>", batch=0, speed=10.0),
        _record("tuned", "math", "<reasoning>a b c d e</reasoning><answer>x y</answer>", batch=0, speed=10.0, prompt=1),
        _record("tuned", "coding", "<reasoning>a</reasoning><answer>x y z</answer>", batch=1, speed=50.0),
        _record("tuned", "coding", "<reasoning>a b", truncated=True, batch=1, speed=50.0, prompt=1),
        _record("base", "math", "just an answer", batch=0, speed=20.0),
        _record("base", "math", "<reasoning>a</reasoning><answer>x</answer>", batch=0, speed=20.0, prompt=1),
        _record("base", "coding", "more text", batch=1, speed=30.0),
        _record("base", "coding", "<reasoning>a</reasoning>", batch=1, speed=30.0, prompt=1),
    ]
    losses = {"tuned": {"loss": 1.5, "perplexity": 4.4817, "loss_tokens": 100},
              "base": {"loss": 2.5, "perplexity": 12.1825, "loss_tokens": 100}}
    summary = eval_samples.summarize(records, losses)
    meta = {"run": "runs/x", "step": 7, "preset": "cpu-tiny", "prompts": 4, "decoding": "greedy"}
    eval_samples.write_outputs(tmp_path, records, summary, meta)

    saved = json.loads((tmp_path / "summary.json").read_text())
    tuned, base = saved["models"]["tuned"], saved["models"]["base"]
    assert (tuned["compliant"], tuned["samples"], tuned["compliance"]) == (3, 4, 0.75)
    assert (base["compliant"], base["compliance"]) == (1, 0.25)
    assert tuned["failures"] == {"truncated": 1}
    assert base["failures"] == {"missing_reasoning": 2, "missing_answer": 1}
    assert tuned["reasoning_tokens_mean"] == 3 and tuned["reasoning_tokens_median"] == 3
    assert tuned["answer_tokens_mean"] == 2 and tuned["answer_tokens_median"] == 2
    assert tuned["truncation_rate"] == 0.25 and base["truncation_rate"] == 0
    assert tuned["tokens_per_s"] == 50.0  # the first batch (compilation) is left out
    assert tuned["domains"]["coding"] == {"samples": 2, "compliant": 1, "compliance": 0.5}
    assert (tuned["loss"], base["perplexity"], saved["step"]) == (1.5, 12.1825, 7)

    report = (tmp_path / "report.md").read_text()
    assert "| format compliance (at the budget) | 75.0% (3/4) | 25.0% (1/4) |" in report
    assert "| format compliance within 1,024 tokens | — | — |" in report  # unknown: no budget of 1,024 or more
    assert "| missing_reasoning | 0 | 2 |" in report
    assert "| coding | 50.0% (1/2) | 0.0% (0/2) |" in report
    assert "| eval loss | 1.5000 | 2.5000 |" in report
    assert "fails: `truncated`" in report and "### math" in report
    first = report.index("math question 0")  # both models' outputs under their prompt, side by side
    assert first < report.index("**tuned**", first) < report.index("**base**", first) < report.index("math question 1")
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "lengths.png").stat().st_size > 0


def test_compliance_within_1024_tokens_and_the_length_plot(tmp_path):
    """Outputs that finished well-formed before 1,024 tokens still pass there; longer ones would have been cut."""
    short, long_ok, long_cut = (_record("tuned", "math", GOOD) | {"generated_tokens": n} for n in (300, 1500, 1024))
    truncated = _record("tuned", "math", "<reasoning>a b", truncated=True) | {"generated_tokens": 2048}
    records = [short, long_ok, long_cut, truncated]
    assert [eval_samples.compliant_within(r, 1024) for r in records] == [True, False, False, False]
    summary = eval_samples.summarize(records, max_new_tokens=2048)["tuned"]
    assert (summary["compliance"], summary["compliance_at_1024"], summary["truncation_rate"]) == (0.75, 0.25, 0.25)
    assert (summary["generated_tokens_median"], summary["generated_tokens_max"]) == (1262, 2048)
    assert eval_samples.summarize(records, max_new_tokens=768)["tuned"]["compliance_at_1024"] is None
    meta = {"run": "r", "step": 1, "preset": "p", "prompts": 4, "decoding": "greedy", "max_new_tokens": 2048}
    eval_samples.write_outputs(tmp_path, records, {"tuned": summary}, meta, np.array([900, 1400, 1990]))
    report = (tmp_path / "report.md").read_text()
    assert "| format compliance within 1,024 tokens | 25.0% |" in report
    assert "| generated tokens, median / max | 1262 / 2048 |" in report
    assert (tmp_path / "lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_only_report_has_losses_and_no_samples(tmp_path):
    summary = eval_samples.summarize([], {"tuned": {"loss": 1.0, "perplexity": 2.718, "loss_tokens": 5}})
    eval_samples.write_outputs(tmp_path, [], summary, {"run": "r", "step": 1, "preset": "p", "prompts": 0,
                                                       "decoding": "none"})
    report = (tmp_path / "report.md").read_text()
    assert "| eval loss | 1.0000 |" in report and "## Samples" not in report and "compliance" not in report
    assert "generated tokens" not in report
    assert not (tmp_path / "lengths.png").exists()


def test_a_generation_is_checked_and_its_sections_measured_in_tokens():
    tokenizer = kaggle_weights.load_tokenizer(get_config("cpu-tiny").model)
    sample = {"model": "tuned", "domain": "math", "prompt": "2 + 2?", "truncated": False, "generated_tokens": 20,
              "batch": 0, "tokens_per_s": 10.0}
    good = eval_samples.checked(sample | {"output": GOOD + "<end_of_turn>"}, tokenizer)
    assert good == sample | {"output": GOOD + "<end_of_turn>", "reasoning": "Two and two make four.", "answer": "4",
                             "format_ok": True, "reason": None, "reasoning_tokens": good["reasoning_tokens"],
                             "answer_tokens": 1}
    assert good["reasoning_tokens"] == len(tokenizer.encode("Two and two make four.")) > 1
    cut = eval_samples.checked(sample | {"output": "<reasoning>two and", "truncated": True}, tokenizer)
    assert (cut["format_ok"], cut["reason"], cut["reasoning"], cut["reasoning_tokens"]) == (False, "truncated", None,
                                                                                           None)


def test_generate_with_the_tiny_model():
    cfg = get_config("cpu-tiny", {"eval.max_new_tokens": "16", "eval.batch_size": "2"})
    tokenizer = kaggle_weights.load_tokenizer(cfg.model)
    mesh = make_mesh(cfg)
    prompts = [{"domain": "math", "prompt": "What is 2 + 2?"}, {"domain": "other", "prompt": "Say hello."}]
    with jax.set_mesh(mesh):
        records = generate(build_model(cfg, mesh), tokenizer, prompts, cfg.eval, "tuned")
    assert [(r["model"], r["domain"], r["prompt"]) for r in records] == [("tuned", p["domain"], p["prompt"])
                                                                        for p in prompts]
    for r in records:
        assert 0 < r["generated_tokens"] <= 16 and r["truncated"] == (r["generated_tokens"] == 16)
        assert r["tokens_per_s"] > 0 and isinstance(r["output"], str)
        assert set(r) == {"model", "domain", "prompt", "output", "truncated", "generated_tokens", "tokens_after_answer",
                          "batch", "tokens_per_s"}  # generation only: evaluation checks the format (checked)
        assert r["tokens_after_answer"] is None  # an untrained model writes no </answer>


def test_cli_stops_with_one_line_on_a_missing_run_dir(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: run directory .*missing does not exist"):
        eval_samples.main(["--preset", "cpu-tiny", "--run", str(tmp_path / "missing")])


def test_cli_compares_the_tuned_run_with_the_base(tiny_run_dir, tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    read_back = []  # the checkpoint is resolved once and read back whole once, then restored
    arrays_problem = rundir._arrays_problem
    monkeypatch.setattr(rundir, "_arrays_problem", lambda *a: read_back.append(a[1]) or arrays_problem(*a))
    eval_samples.main(["--preset", "cpu-tiny", "--run", str(tiny_run_dir), "--out", str(out), "--compare-base",
                       "--data.out_dir", str(tiny_data_dir), "--eval.num_prompts", "2",
                       "--eval.max_new_tokens", "16", "--eval.batch_size", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert read_back == [summary["step"]] == [rundir.newest_good_step(tiny_run_dir)]
    assert summary["max_new_tokens"] == 16 and "(set by --eval.max_new_tokens)" in summary["decoding"]
    tuned, base = summary["models"]["tuned"], summary["models"]["base"]
    assert tuned["loss"] < base["loss"] - 0.5  # the run's LoRA was loaded, and the base has none
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in samples) == ["base", "base", "tuned", "tuned"]
    assert f"{tuned['loss']:.4f}" in (out / "report.md").read_text()
    assert (out / "lengths.png").stat().st_size > 0


def test_cpu_tiny_evaluation_budget_covers_the_longest_completion(tiny_run_dir, tiny_data_dir, tmp_path):
    """With no --eval.max_new_tokens the budget is derived from the data, and the truncation rate is reported."""
    out = tmp_path / "eval"
    eval_samples.main(["--preset", "cpu-tiny", "--run", str(tiny_run_dir), "--out", str(out),
                       "--data.out_dir", str(tiny_data_dir), "--eval.num_prompts", "1", "--eval.batch_size", "1"])
    summary = json.loads((out / "summary.json").read_text())
    longest = max(data_prep.completion_lengths(tiny_data_dir, split).max() for split in data_prep.SPLITS)
    assert summary["max_new_tokens"] == summary["eval"]["max_new_tokens"] == data_prep.generation_budget(
        tiny_data_dir) >= longest
    assert f"at most {summary['max_new_tokens']} new tokens (derived" in summary["decoding"]
    sample = json.loads((out / "samples.jsonl").read_text())
    tuned = summary["models"]["tuned"]
    assert tuned["truncation_rate"] == sample["truncated"] == (sample["generated_tokens"] >= summary["max_new_tokens"])
    assert "| truncation rate (hit the budget) |" in (out / "report.md").read_text()


# Gemma3's case is slow-marked: the default run checks the same path on Gemma2, CI both.
@pytest.mark.parametrize("preset", ["cpu-tiny", pytest.param("cpu-tiny-gemma3", marks=pytest.mark.slow)])
def test_a_sampler_with_its_default_stop_token_stops_right_after_the_answer(tmp_path, preset):
    """Trained rows end <end_of_turn> EOS: each tiny model trained to recite a few rows, then sampled as the judges'
    cells sample (the template's Sampler, no stop tokens passed, so Tunix stops on EOS alone), ends each well-formed
    output within a token of </answer> (its <end_of_turn>) instead of running on to the budget."""
    from judges_procedure import EVALUATE, MAKE_SAMPLER, run_cells
    from tunix.generate import sampler as sampler_lib

    import train_sft
    from chat_format import PROMPT_TEMPLATE, tokens_after_answer
    from rundir import checkpoint_step, restore_lora

    cfg = get_config(preset, {
        "data.out_dir": str(tmp_path / "data"), "data.stop": "16", "data.eval_rows": "1", "data.max_len": "256",
        "run.out_dir": str(tmp_path / "run"), "run.micro_batch": "2", "run.max_steps": "80", "run.epochs": "1000",
        "run.eval_every": "1000", "run.checkpoint_every_steps": "1000", "run.time_budget_min": "0",
        "eval.generate_every": "0"})
    data_dir = data_prep.prepare(cfg, show_progress=False)
    train_sft.train(cfg, data_dir)
    tokenizer = kaggle_weights.load_tokenizer(cfg.model)
    trained = [row.prompt for row in data_prep.process_rows(tokenizer, data_prep.read_source(cfg.data), cfg.data)
               if row.example is not None][:-1]  # the last kept row is held out
    budget = data_prep.resolve_max_new_tokens(cfg, data_dir)
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        lora_policy = build_model(cfg, mesh)
        restore_lora(lora_policy, cfg.run.out_dir, checkpoint_step(cfg.run.out_dir))
        kernel = run_cells({
            "sampler_lib": sampler_lib, "lora_policy": lora_policy, "tokenizer": tokenizer,
            "model_config": lora_policy.config, "MAX_PROMPT_LENGTH": data_prep.prompt_budget(cfg.data),
            "MAX_GENERATION_STEPS": budget, "PROMPT_TEMPLATE": PROMPT_TEMPLATE, "JUDGE_QUESTIONS": trained,
            "INF_TEMPERATURE": 0, "INF_TOP_K": 1, "INF_TOP_P": None, "SEED": 42}, MAKE_SAMPLER, EVALUATE)
    outputs = [([int(t) for t in tokens], text) for tokens, text in zip(kernel["Result"].tokens,
                                                                        kernel["Result"].text, strict=True)]
    well_formed = [tokens for tokens, text in outputs if check_format(text, len(tokens) >= budget).ok]
    assert len(well_formed) >= len(outputs) // 2 > 0
    assert all(tokens_after_answer(tokens, tokenizer.decode) <= 2 for tokens in well_formed)


def test_generation_stops_at_end_of_turn_for_either_model(each_tiny_model, tiny_preset):
    """A turn ends at <end_of_turn> for either model (google/tunix#842: a Gemma3-1B sampler that stops on EOS alone
    runs on). The weights are set so that greedy decoding emits <end_of_turn> at once and after every
    <end_of_turn>: the layers add nothing (their post-norms scale by 1 + -1) and <end_of_turn>'s embedding is the
    prompt's last token's, doubled."""
    import jax.numpy as jnp
    from flax import nnx

    cfg = get_config(tiny_preset, {"eval.max_new_tokens": "8", "eval.batch_size": "1"})
    tokenizer = kaggle_weights.load_tokenizer(cfg.model)
    prompts = [{"domain": "math", "prompt": "What is 2 + 2?"}]
    last = tokenizer.encode(chat_format.build_prompt(prompts[0]["prompt"]))[-1]
    end_of_turn = tokenizer.piece_to_id(chat_format.END_OF_TURN)
    saved = jax.tree.map(jnp.copy, nnx.state(each_tiny_model, nnx.Param))
    post_norms = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("post_ffw_norm"), nnx.PathContains(
        "post_attn_norm" if tiny_preset == "cpu-tiny" else "post_attention_norm")))
    embedding = nnx.state(each_tiny_model, nnx.PathContains("input_embedding"))
    try:
        nnx.update(each_tiny_model, jax.tree.map(lambda x: -jnp.ones_like(x), nnx.state(each_tiny_model, post_norms)))
        nnx.update(each_tiny_model, jax.tree.map(lambda e: e.at[end_of_turn].set(2 * e[last]), embedding))
        [record] = generate(each_tiny_model, tokenizer, prompts, cfg.eval, "tuned", show_progress=False)
        assert record["generated_tokens"] == 0 and not record["truncated"]
        # without <end_of_turn> among the stop tokens the same sampler runs on to the budget, emitting only it
        prompt_len = padded_prompt_length(tokenizer, prompts)
        sampler = build_sampler(each_tiny_model, tokenizer, prompt_len, 8)
        out = sampler([chat_format.build_prompt(prompts[0]["prompt"])], max_generation_steps=8,
                      max_prompt_length=prompt_len, eos_tokens=[tokenizer.eos_id()])
        assert list(out.tokens[0]) == [end_of_turn] * 8
    finally:
        nnx.update(each_tiny_model, saved)
