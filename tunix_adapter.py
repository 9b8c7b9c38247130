"""Every use of Tunix's private API, fenced in one module and pinned to the Tunix it was written for.

Tunix 0.1.7 gives no public way to donate the model to the train step, to save custom metadata with the final
checkpoint, to read that metadata back on resume, to find the trainer's mesh, or to convert a Flax checkpoint of a
size it does not publish. Each of those is done here, and ``PINNED`` holds the SHA-256 of the source of every
private Tunix function this module copies or relies on, so a Tunix upgrade fails ``tests/test_tunix_adapter.py``
(and warns at import) instead of training wrong in silence.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import warnings
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import jax
from flax import nnx
from tunix.models.gemma import model as gemma_lib
from tunix.sft import peft_trainer

TUNIX_VERSION = "0.1.7"

# The private functions relied on, by name, with the SHA-256 of their source in TUNIX_VERSION.
PINNED = {
    # sets _train_steps and _restored_custom_metadata from the restored checkpoint
    "PeftTrainer.__init__": "37c32b59f1890c8553e6adfa6729c4a66775d8b3956fe4b8e702391de8ef98f1",
    # copied by SFTTrainer.jit_train_and_eval_step, with donation
    "PeftTrainer.jit_train_and_eval_step": "5208cb2237d70b863de3c68e6a13bfd6bf5dc3eb671eb23a32c1fdfb7255bef2",
    "PeftTrainer._shard_optimizer": "f9cfa709ff552af064be8e8ae896b2c189060efcb79be570d68763eb4c935273",
    # replaced by SFTTrainer._save_last_checkpoint
    "PeftTrainer._save_last_checkpoint": "5aa1d03c241d6090d8aaf30848601e02f060263901091fcef781500f150dff44",
    "gemma._map_linen_var_names": "5785bf662b0580e5f8f70406a381efff12e4f33aea3c2ad8978d3c37d9d11138",
    "gemma._assign_linen_params_to_nnx_state": "30153449c6351837605e6e551fc63a6e410becb8f990bbdf9ee1ecfa4b8852c1",
    # the reference of tests/test_model.py's loss test and of benchmarks/bench_loss_memory.py
    "peft_trainer._default_loss_fn": "a04af624f5ef514b4a17ef1f6280f68493dad6e175252f73a77af21b82f78b38",
    # copied, with the splash kernel in place of its scores, by model.py's fused-attention section
    "gemma.Attention.block": "ebc03bbd68c71dbdf786c0781470e58783eb28aae89874cd449ccaff7e726ee8",
}

# Tunix's own attention block, kept before model.py swaps in its own (which falls back to this one).
ATTENTION_BLOCK = gemma_lib.Attention.block


def _pinned_functions() -> dict[str, Callable[..., Any]]:
    trainer = peft_trainer.PeftTrainer
    return {"PeftTrainer.__init__": trainer.__init__,
            "PeftTrainer.jit_train_and_eval_step": trainer.jit_train_and_eval_step,
            "PeftTrainer._shard_optimizer": trainer._shard_optimizer,
            "PeftTrainer._save_last_checkpoint": trainer._save_last_checkpoint,
            "gemma._map_linen_var_names": gemma_lib._map_linen_var_names,
            "gemma._assign_linen_params_to_nnx_state": gemma_lib._assign_linen_params_to_nnx_state,
            "peft_trainer._default_loss_fn": peft_trainer._default_loss_fn,
            "gemma.Attention.block": ATTENTION_BLOCK}


def source_sha256(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def changed_private_api() -> list[str]:
    """The pinned names whose source differs from what this module was written against (empty when none)."""
    return [name for name, function in _pinned_functions().items() if source_sha256(function) != PINNED[name]]


def unpinned_tunix() -> str | None:
    """One line saying how the installed Tunix differs from the one this module was written for, or None."""
    installed = version("google-tunix")
    if installed != TUNIX_VERSION:
        return f"google-tunix {installed} is installed, but tunix_adapter.py was written for {TUNIX_VERSION}"
    if changed := changed_private_api():
        return f"google-tunix {installed}'s private {', '.join(changed)} changed since tunix_adapter.py was written"
    return None


if (_unpinned := unpinned_tunix()) is not None:
    warnings.warn(f"{_unpinned}: install requirements.txt's pins, or check this module against it", stacklevel=1)


def legacy_mesh() -> jax.sharding.Mesh:
    """The mesh of the legacy ``with mesh:`` context, which Tunix's trainer and model read (empty outside one)."""
    return jax.interpreters.pxla.thread_resources.env.physical_mesh


def sampler_compiles(sampler: Any) -> tuple[int, int]:
    """How many prefill and decode executables a Tunix Sampler has compiled (its jitted functions' caches)."""
    return sampler._compiled_prefill_fn._cache_size(), sampler._compiled_decode_fn._cache_size()


# Tunix's Flax -> NNX name and value mapping; ``Gemma.from_params`` applies it only to the sizes Tunix publishes.
map_linen_var_names = gemma_lib._map_linen_var_names
assign_linen_params_to_nnx_state = gemma_lib._assign_linen_params_to_nnx_state
# Tunix's own loss (log-softmax and a one-hot over the vocabulary): the reference the project's loss is tested against.
default_loss_fn = peft_trainer._default_loss_fn


class SFTTrainer(peft_trainer.PeftTrainer):
    """PeftTrainer that donates the model to the train step and saves ``checkpoint_metadata()`` with every
    checkpoint, the final one included; ``restored_metadata`` is what the resumed checkpoint carried."""

    checkpoint_metadata: Callable[[], dict[str, Any]] | None = None

    @property
    def restored_metadata(self) -> dict[str, Any]:
        return self._restored_custom_metadata or {}

    def custom_checkpoint_metadata(self) -> dict[str, Any]:
        return self.checkpoint_metadata() if self.checkpoint_metadata else {}

    def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False) -> tuple[Any, Any]:
        """PeftTrainer's steps, with the model donated to the train step as well as the optimizer. The step returns
        the whole model state, frozen weights included; without donation XLA writes them to fresh buffers each
        step, a second copy of the base model (benchmarks/results_tpu_fit.md). The Sampler and the trainer hold
        the model's Variables, which take the new arrays, so nothing reads a donated one."""
        if skip_jit or self._jitted_train_step_fn is not None:
            return super().jit_train_and_eval_step(skip_jit, cache_nnx_graph)
        self._shard_optimizer(legacy_mesh())  # as PeftTrainer does
        train_step = nnx.jit(self.create_train_step_fn(), donate_argnums=(0, 1))
        eval_step = nnx.jit(self.create_eval_step_fn())
        bind = (lambda f, *args: functools.partial(nnx.cached_partial(f, *args))) if cache_nnx_graph else \
            functools.partial
        self._jitted_train_step_fn = bind(train_step, self.model, self.optimizer)
        self._jitted_eval_step_fn = bind(eval_step, self.model)
        return self._jitted_train_step_fn, self._jitted_eval_step_fn

    def _save_last_checkpoint(self):
        # PeftTrainer's own final save omits custom metadata; without it a resume would replay data.
        last_saved_step = self.checkpoint_manager.latest_step()
        if last_saved_step is None or last_saved_step < self._train_steps:
            self.checkpoint_manager.save(self._train_steps, self.model, self.optimizer,
                                         save_only_lora_params=self._lora_enabled, force=True,
                                         custom_metadata=self.custom_checkpoint_metadata())
