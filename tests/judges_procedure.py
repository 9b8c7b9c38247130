"""The hackathon judges' evaluation cells, rebuilt by us from the public submission template's text.

Source: the "Competition evaluation" section of the organisers' submission template (a copy is in
TheIllusionOfLife/tunix, ``notebooks/submission-template.ipynb``). The judges re-run the notebook, then run
these cells in the same kernel, on the names the notebook leaves defined (``CKPT_DIR``, ``lora_policy``,
``tokenizer``, ``model_config``, ``MAX_PROMPT_LENGTH``, ``MAX_GENERATION_STEPS``, ``PROMPT_TEMPLATE``, ``INF_*``,
``SEED``, ``unrestricted_kaggle_model`` and the modules ``os``, ``re``, ``jax``, ``nnx``, ``ocp``,
``sampler_lib``). The cells are code text, so that a test can run them in the notebook's own kernel, or
``exec`` them in a namespace holding the same names (``run_cells``). They make the template's calls, in its
order, with its arguments; left out is its ``wandb.init(project='tunix-eval')`` line, a logging workaround of
theirs that reads nothing of ours. ``TunixHackathonJudge``'s body is not public: ours is a stand-in that fills
``PROMPT_TEMPLATE`` with ``.format(question=...)`` and samples with the arguments the judge is constructed with and
Tunix's default stop token (EOS only), the least a caller can pass.
"""

from __future__ import annotations

from typing import Any

# "Load the final checkpoint for single-session mode evaluation": the largest integer folder under
# CKPT_DIR/actor, its model_params restored into lora_policy's LoRA. No merge ("Tunix will take care of it").
FIND_LATEST_STEP = '''
import re

actor_ckpt_dir = os.path.join(CKPT_DIR, "actor")
latest_step = -1
if os.path.exists(actor_ckpt_dir):
    for item in os.listdir(actor_ckpt_dir):
        if os.path.isdir(os.path.join(actor_ckpt_dir, item)) and re.match(r"^\\d+$", item):
            step = int(item)
            if step > latest_step:
                latest_step = step
if latest_step == -1:
    raise FileNotFoundError(f"No checkpoints found in {actor_ckpt_dir}")
print(f"Latest checkpoint step: {latest_step}")
trained_ckpt_path = os.path.join(CKPT_DIR, "actor", str(latest_step), "model_params")
'''

RESTORE_LORA = '''
abs_params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
    nnx.state(lora_policy, nnx.LoRAParam),
)
checkpointer = ocp.StandardCheckpointer()
trained_lora_params = checkpointer.restore(trained_ckpt_path, target=abs_params)
nnx.update(
    lora_policy,
    jax.tree.map(lambda a, b: b, nnx.state(lora_policy, nnx.LoRAParam), trained_lora_params),
)
'''

SINGLE_SESSION = FIND_LATEST_STEP + RESTORE_LORA

# "Create the sampler for finetuned model".
MAKE_SAMPLER = '''
sampler = sampler_lib.Sampler(
    transformer=lora_policy,
    tokenizer=tokenizer,
    cache_config=sampler_lib.CacheConfig(
        cache_size=MAX_PROMPT_LENGTH + MAX_GENERATION_STEPS + 256,
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
    ),
)
'''

# "Evaluate": the template's call; the class is our stand-in (its questions: the kernel's JUDGE_QUESTIONS).
EVALUATE = '''
class TunixHackathonJudge:
    questions = JUDGE_QUESTIONS

    def __init__(self, temperature, top_k, top_p, max_generation_steps, seed):
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self.max_generation_steps = max_generation_steps

    def evaluate(self, sampler, prompt):
        return sampler([prompt.format(question=q) for q in self.questions],
                       max_generation_steps=self.max_generation_steps, **self.sampling)


Result = TunixHackathonJudge(INF_TEMPERATURE, INF_TOP_K, INF_TOP_P, MAX_GENERATION_STEPS, SEED).evaluate(
    sampler, PROMPT_TEMPLATE)
'''

# "Unrestricted mode": the uploaded variation, downloaded with kagglehub (the one call a test replaces), then
# the same restore. The template's comment: "may need to append actor/<step>/model_params as well".
UNRESTRICTED = '''
trained_ckpt_path = kagglehub.model_download(unrestricted_kaggle_model + "/jax/size")
''' + RESTORE_LORA
UNRESTRICTED_WITH_SUFFIX = '''
trained_ckpt_path = os.path.join(kagglehub.model_download(unrestricted_kaggle_model + "/jax/size"),
                                 "actor", str(latest_step), "model_params")
''' + RESTORE_LORA


class LocalKaggleHub:
    """``kagglehub`` with its download replaced: handle -> a local folder (only the network call is replaced)."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders

    def model_download(self, handle: str) -> str:
        return self.folders[handle]


def run_cells(namespace: dict[str, Any], *cells: str) -> dict[str, Any]:
    """Runs cells in namespace, as a kernel runs them one after another; returns the namespace."""
    for cell in cells:
        exec(compile(cell, "<judges' cell>", "exec"), namespace)
    return namespace
