"""A run directory: its layout, its one writer, its checkpoints and what they hold, and the paths every stage checks
before it imports anything heavy.

    RUN/config.json                       the settings and the data manifest the run was trained with
    RUN/run.lock                          held by the one process that trains into RUN (process 0 of several)
    RUN/actor/<step>/                     orbax checkpoints: LoRA (model_params), optimizer state, resume metadata;
                                          RUN/actor/<step>/model_params is where the hackathon's template finds
                                          the LoRA (its CKPT_DIR = the run directory)
    RUN/actor/<step>.damaged-<time>       a checkpoint that could not be restored, set aside (never deleted)

A stage resolves the checkpoint step it loads once (``checkpoint_step``: the newest that reads back whole, damaged
newer ones set aside) and passes it down to ``restore_lora``. Standard library only at module level: every stage
script runs ``settings_from_argv`` (settings, paths, saved runs) before JAX is imported; the few functions that read
arrays import orbax and JAX inside.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from config import REAL_MODEL_SIZES, Config, ConfigError, DataConfig, model_sizes, parse_argv

# Where a run keeps its orbax checkpoints, one folder per step (checkpoint_dir): the one name of the layout.
CHECKPOINT_SUBDIR = "actor"
# Where runs made before kept the same checkpoints: such a run stops with one line naming the mv that fixes it.
OLD_CHECKPOINT_SUBDIR = "checkpoints"
# The items of a training checkpoint, and the custom metadata a resume needs (data position, step plan).
CHECKPOINT_ITEMS = ("model_params", "optimizer_state")
RESUME_METADATA = ("data_iterator", "planned_steps")
# The lock file of a run directory (one writer per run).
RUN_LOCK = "run.lock"
# What the hackathon's submission template appends to unrestricted_kaggle_model ("USER/MODEL") to download the
# unrestricted-mode model: the framework and variation that export.py --upload USER/MODEL publishes.
JUDGED_VARIATION = "jax/size"
# Local data sources: JSON lines or Parquet.
SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Model fields that set the tiny model's tensor shapes (the real model is named by its name alone).
TINY_SIZE_FIELDS = ("name", "num_layers", "vocab_size", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads",
                    "head_dim")


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder of a run's step checkpoints; a run in the old layout (RUN/checkpoints only) stops every stage
    with one line saying how to move it."""
    old, new = Path(run_dir) / OLD_CHECKPOINT_SUBDIR, Path(run_dir) / CHECKPOINT_SUBDIR
    if old.expanduser().is_dir() and not new.expanduser().exists():
        raise ConfigError(f"{run_dir} keeps its checkpoints in {OLD_CHECKPOINT_SUBDIR}/, where the hackathon's "
                          f"template does not look: move them with `mv {old} {new}`")
    return new


def saved_steps(run_dir: str | Path) -> list[int]:
    """The step directories of a run, newest first (set-aside ``<step>.damaged-*`` and orbax temporaries are not
    steps)."""
    ckpt_dir = checkpoint_dir(run_dir).expanduser()
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


# ----------------------------------------------------------------------------- one writer


class RunLock:
    """One run directory, one writer: an OS lock on ``RUN/run.lock`` that this process holds until ``close()`` (or
    the end of its ``with`` block) or its death: the OS drops it even on SIGKILL, so a killed run never blocks its
    re-run. Taking it while another process holds it stops with one line naming the holder."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = _try_lock(self.run_dir)
        if isinstance(handle, str):
            raise ConfigError(f"{self.run_dir} is being trained by {handle}: wait for it to finish or stop it, "
                              f"or pass another --out")
        self._handle = handle

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _try_lock(run_dir: Path) -> TextIO | str:
    """The locked, holder-stamped lock file, or the holder's description when another process has it."""
    handle = (run_dir / RUN_LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


# ----------------------------------------------------------------------------- verdicts on checkpoints


def checkpoint_problem(run_dir: str | Path, step: int, read_arrays: bool = True) -> str | None:
    """Why checkpoint ``step`` cannot be resumed from, or None: its metadata must read with the data position and
    step plan, each item's tree metadata must read, and (``read_arrays``) every array of the LoRA weights and the
    optimizer state must read back. Without ``read_arrays`` it needs only the standard library."""
    step_dir = checkpoint_dir(run_dir) / str(step)
    try:
        custom = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"its _CHECKPOINT_METADATA does not read ({type(err).__name__})"
    if not isinstance(custom, dict) or any(key not in custom for key in RESUME_METADATA):
        return "its _CHECKPOINT_METADATA lacks the data position and step plan"
    for item in CHECKPOINT_ITEMS:
        try:
            json.loads((step_dir / item / "_METADATA").read_text())["tree_metadata"]
        except (OSError, ValueError, TypeError, KeyError) as err:
            return f"its {item}/_METADATA does not read ({type(err).__name__})"
    return _arrays_problem(run_dir, step) if read_arrays else None


def _arrays_problem(run_dir: str | Path, step: int) -> str | None:
    """Why the arrays of checkpoint ``step`` do not read back (which item, in words), or None when all of them do."""
    # Imported here, as in every function that reads arrays: the rest of this module runs before JAX is imported.
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    # Each process reads for itself: orbax otherwise makes every process of a multi-process run take part in each
    # call, and processes that meet different steps (one already set aside) would wait for each other for ever.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    options = ocp.CheckpointManagerOptions(create=False, multiprocessing_options=alone)
    for item in CHECKPOINT_ITEMS:
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_one_array_at_a_time(),
                                              multiprocessing_options=alone)
        try:
            with ocp.CheckpointManager(checkpoint_dir(run_dir).resolve(), options=options,
                                       item_handlers={item: handler}) as mgr:
                saved = mgr.item_metadata(step)[item]
                as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved,
                                        is_leaf=lambda x: hasattr(x, "shape"))
                mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(restore_args=as_numpy)}))
        except Exception as err:  # orbax and tensorstore fail in many ways; any of them means damage
            return f"its {item} arrays do not read back ({_error_kind(err)})"
    return None


def _error_kind(err: Exception) -> str:
    """An exception's type, and tensorstore's status code (NOT_FOUND, OUT_OF_RANGE, DATA_LOSS ...) when its message
    starts with one: a kind of failure in a few words, not a message of paths."""
    code = re.match(r"[A-Z][A-Z_]+(?=: )", str(err))
    return f"{type(err).__name__}: {code.group()}" if code else type(err).__name__


@functools.cache
def _one_array_at_a_time() -> Any:
    """Orbax's array type handlers, reading each array's metadata and values one at a time. Orbax opens a tree's
    arrays concurrently in an event loop of its own and closes that loop at the first failure; the opens still in
    flight then report into the closed loop, each with a traceback on stderr ("Event loop is closed", dozens for
    one damaged checkpoint). Opened in turn, a failed one leaves nothing in flight."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    class InTurn:
        async def metadata(self, infos: Any) -> list[Any]:
            metadata = []
            for info in infos:  # a loop, not a comprehension: super() needs the method's own frame
                metadata += await super().metadata([info])
            return metadata

        async def deserialize(self, infos: Any, args: Any = None) -> list[Any]:
            arrays = []
            for info, arg in zip(infos, args or [ocp.RestoreArgs()] * len(infos), strict=True):
                arrays += await super().deserialize([info], [arg])
            return arrays

    class ArraysInTurn(InTurn, ocp.type_handlers.ArrayHandler):
        pass

    class NumpyArraysInTurn(InTurn, ocp.type_handlers.NumpyHandler):
        pass

    return ocp.type_handlers.create_type_handler_registry((jax.Array, ArraysInTurn()),
                                                          (np.ndarray, NumpyArraysInTurn()))


def step_verdicts(run_dir: str | Path, read_arrays: bool = True) -> Iterator[tuple[int, str | None]]:
    """Each step of a run, newest first, with why it cannot be resumed from (None: it can): lazily, so that a
    caller stops reading checkpoints at the one it wants."""
    for step in saved_steps(run_dir):
        yield step, checkpoint_problem(run_dir, step, read_arrays)


def newest_good_step(run_dir: str | Path, read_arrays: bool = True, set_aside_damaged: bool = False,
                     lock: RunLock | None = None) -> int | None:
    """The newest checkpoint step of a run that can be resumed from, or None. With ``set_aside_damaged``, each
    damaged newer checkpoint is reported in one line and renamed out of the way (``set_aside``; ``lock``: this
    process already holds the run's lock), so that training, evaluation, export and --init-from all go on from
    the newest good one."""
    for step, problem in step_verdicts(run_dir, read_arrays):
        if problem is None:
            return step
        if set_aside_damaged:
            set_aside(run_dir, step, problem, lock)
    return None


def keep_newest_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` step checkpoints of a run: orbax's own rule after each save, applied
    again at the end of a run for a process killed between a save and orbax's clean-up."""
    for step in saved_steps(run_dir)[keep:]:
        shutil.rmtree(checkpoint_dir(run_dir) / str(step))


def set_aside(run_dir: str | Path, step: int, problem: str, lock: RunLock | None = None) -> None:
    """Renames a damaged step directory to ``<step>.damaged-<time>`` (never deletes it), unless another process is
    writing the run or this is not process 0 of a multi-process run (whose run files are process 0's); either way
    says so in one line. ``lock``: this process holds the run's lock already."""
    import jax

    run_dir = Path(run_dir)
    step_dir = checkpoint_dir(run_dir) / str(step)
    where = f"checkpoint {step_dir} cannot be restored: {problem};"
    if jax.process_index() != 0:
        print(f"{where} left in place for process 0 to set aside")
        return
    handle = None if lock is not None else _try_lock(run_dir.resolve())
    if isinstance(handle, str):
        print(f"{where} left in place while {handle} trains into {run_dir}")
        return
    try:
        target = step_dir.with_name(f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        step_dir.rename(target)
        print(f"{where} set aside as {target}")
    finally:
        if handle is not None:
            handle.close()


def checkpoint_step(run_dir: str | Path, step: int | None = None) -> int:
    """The checkpoint step a stage loads from a run directory, resolved once, before any model is built: ``step``
    if given and it reads back whole, else the newest good one (damaged newer ones set aside). A missing run,
    checkpoint or step stops with one line."""
    run_dir = existing_run_dir(run_dir)
    if step is None:
        if (newest := newest_good_step(run_dir, set_aside_damaged=True)) is None:
            raise ConfigError(f"no checkpoint that can be restored in {checkpoint_dir(run_dir)}: train first with "
                              f"`python train_sft.py --out {run_dir}` or point at another run directory")
        return newest
    problem = checkpoint_problem(run_dir, step) if step in saved_steps(run_dir) else "missing"
    if problem is None:
        return step
    if problem != "missing":
        set_aside(run_dir, step, problem)
    raise ConfigError(f"{run_dir} has no checkpoint at step {step} that can be restored: it has steps "
                      f"{sorted(saved_steps(run_dir))}")


# ----------------------------------------------------------------------------- what a saved run holds


def saved_lora_shape(run_dir: str | Path, step: int | None = None) -> tuple[Path, dict[str, int]] | None:
    """The checkpoint folder at ``step`` (default: the newest whose metadata reads) of a run and the rank,
    layers and width of its LoRA, read from orbax's JSON tree metadata without JAX; None if none reads."""
    for saved_step in saved_steps(run_dir) if step is None else [step]:
        step_dir = checkpoint_dir(run_dir).expanduser() / str(saved_step)
        try:  # keys are paths such as ("layers", "0", "attn", "q_einsum", "w_lora_a", "value")
            tree = json.loads((step_dir / "model_params" / "_METADATA").read_text())["tree_metadata"]
            shapes = {tuple(k["key"] for k in v["key_metadata"]): v["value_metadata"]["write_shape"]
                      for v in tree.values()}
            ranks = {shape[-1] for key, shape in shapes.items() if key[-2].endswith("_lora_a")}
            layers = {key[1] for key in shapes if key[0] == "layers"}
            width = shapes[("layers", "0", "attn", "q_einsum", "w_lora_a", "value")][0]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if len(ranks) == 1:
            return step_dir, {"rank": ranks.pop(), "num_layers": len(layers), "embed_dim": width}
    return None


def _run_identity(c: dict[str, Any]) -> dict[str, Any]:
    """What a run's LoRA weights fit, from its config as a dict: the model (its name, or the tiny model's sizes)
    and the LoRA's rank and target modules."""
    model_keys = ("name",) if c["model"]["name"] in REAL_MODEL_SIZES else TINY_SIZE_FIELDS
    return {**{f"model.{k}": c["model"][k] for k in model_keys},
            **{f"lora.{k}": c["lora"][k] for k in ("rank", "module_path")}}


def existing_run_dir(run_dir: str | Path) -> Path:
    """A run directory a stage reads: it must exist and keep its checkpoints where they belong (one line naming
    the fix, if not)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist: pass the --out of a train_sft.py run")
    checkpoint_dir(run_dir)
    return run_dir


def check_saved_run(run_dir: str | Path, cfg: Config, flag: str, step: int | None = None) -> None:
    """A run directory a stage resumes, starts from or loads must exist and must have been trained for the model
    and LoRA these settings build: by its config.json, or without one by its checkpoint's LoRA shapes. Standard
    library only, so it stops a mismatch before JAX is imported; restoring checks tensor by tensor as well."""
    run_dir = existing_run_dir(run_dir)
    path = run_dir / "config.json"
    if path.exists():
        try:
            theirs = _run_identity(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} does not read as a run's config: restore it, or pass another {flag}") from None
        ours = _run_identity(cfg.to_dict())
        if diff := [k for k in ours if theirs.get(k) != ours[k]]:
            raise ConfigError(f"{run_dir} was trained with " + ", ".join(f"--{k} {theirs.get(k)}" for k in diff)
                              + " but this run has " + ", ".join(f"--{k} {ours[k]}" for k in diff)
                              + f": use that run's settings, or pass another {flag}")
        return
    saved = saved_lora_shape(run_dir, step)
    if saved is None:
        return
    step_dir, theirs = saved
    ours = {"rank": cfg.lora.rank, **{k: model_sizes(cfg.model)[k] for k in ("num_layers", "embed_dim")}}
    if theirs != ours:
        raise ConfigError(f"checkpoint {step_dir} holds LoRA rank {theirs['rank']} on {theirs['num_layers']} "
                          f"layers of width {theirs['embed_dim']}, but these settings build rank {ours['rank']} "
                          f"on {ours['num_layers']} layers of width {ours['embed_dim']}: use that run's --preset, "
                          f"--model.* and --lora.rank, or another {flag}")


def check_same_tokenizer(run_dir: str | Path, data_dir: str | Path) -> None:
    """A LoRA trained on other token ids is silently meaningless: refuse it (by the tokenizer digests of the run's
    recorded data manifest and of the prepared data's)."""
    path = Path(run_dir) / "config.json"
    theirs = json.loads(path.read_text()).get("data_manifest", {}) if path.exists() else {}
    ours = json.loads((Path(data_dir) / "manifest.json").read_text())
    if theirs.get("tokenizer_sha256", ours["tokenizer_sha256"]) != ours["tokenizer_sha256"]:
        raise ConfigError(f"run {run_dir} was trained with tokenizer {theirs['tokenizer']} "
                          f"(sha256 {theirs['tokenizer_sha256'][:12]}) but {data_dir} uses {ours['tokenizer']} "
                          f"(sha256 {ours['tokenizer_sha256'][:12]}): set --model.tokenizer_path to the run's")


def check_training_start(cfg: Config, resuming: bool, data_dir: Path | None = None) -> None:
    """Can training into ``--out`` start or resume with these settings? The run there, and for a new run (not
    ``resuming``) the ``--init-from`` run, must fit the model and LoRA these settings build and, once the data is
    prepared (``data_dir``), its tokenizer. The preflight asks before JAX is imported, train() again before the
    model is built."""
    out_dir = Path(cfg.run.out_dir).expanduser()
    runs = [(out_dir, "--out")] if out_dir.is_dir() else []
    if cfg.run.init_from and not resuming:
        runs.append((Path(cfg.run.init_from), "--init-from"))
    for run_dir, flag in runs:
        check_saved_run(run_dir, cfg, flag)
        if data_dir is not None:
            check_same_tokenizer(run_dir, data_dir)


# ----------------------------------------------------------------------------- a run's LoRA weights


def restore_lora(model: Any, run_dir: str | Path, step: int) -> None:
    """Loads the LoRA weights of checkpoint ``step`` (resolved by checkpoint_step) of a run directory into model.
    Stops with one line naming both sides when they were trained for another model size or LoRA rank."""
    import orbax.checkpoint as ocp
    from flax import nnx

    run_dir = Path(run_dir)
    target = nnx.state(model, nnx.LoRAParam)
    with ocp.CheckpointManager(checkpoint_dir(run_dir).resolve(), item_handlers={
            item: ocp.PyTreeCheckpointHandler() for item in CHECKPOINT_ITEMS}) as mgr:
        saved = mgr.item_metadata(step)["model_params"]
        _check_compatible(run_dir, saved, target)
        restored = mgr.restore(step, args=ocp.args.Composite(model_params=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    nnx.update(model, restored.model_params)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"layers/0/attn/q_einsum/w_lora_a" -> shape`` for a model state or a checkpoint's metadata alike."""
    import jax

    def name(key: Any) -> str:
        return str(next(getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)))

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(map(name, path)).removesuffix("/value"): tuple(leaf.shape) for path, leaf in flat}


def _check_compatible(run_dir: Path, saved: Any, target: Any) -> None:
    want, got = _shapes(target), _shapes(saved)
    if want == got:
        return
    theirs = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else None
    where = (f"model {theirs['model']['name']} with LoRA rank {theirs['lora']['rank']}" if theirs else
             f"{len(got)} LoRA tensors")
    first = next((k for k in want if got.get(k) != want[k]), next(iter(got), "?"))
    raise ConfigError(f"checkpoint {run_dir} holds {where} ({first}: {got.get(first)}) but this model needs "
                      f"{want.get(first)}: use the run's preset/--model.*/--lora.rank or another --run")


# ----------------------------------------------------------------------------- preflight: paths, before JAX


def settings_from_argv(argv: list[str] | None, stage: str, doc: str) -> tuple[Config, argparse.Namespace]:
    """A stage's settings from its command line (config.parse_argv), with its paths and saved runs checked
    (preflight); exits with one line on error. Each stage script calls it before its heavy imports, so that a
    bad setting or path stops in about a second."""
    try:
        cfg, args = parse_argv(argv, stage, doc)
        preflight(cfg, stage, args)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return cfg, args


def preflight(cfg: Config, stage: str, args: argparse.Namespace) -> None:
    """What a stage reads must be readable, what it writes writable, and a saved LoRA it loads must fit the
    settings. Standard library only: it runs before JAX, Tunix or a model is loaded."""
    d, r = cfg.data, cfg.run
    for flag, path in (("--out", r.out_dir), ("--data", d.out_dir), ("--init-from", r.init_from),
                       ("--data.continue_from", d.continue_from), ("--run", getattr(args, "run", None))):
        check_file_system_path(path, flag)
    if stage == "train_sft" and "data.out_dir" in args.overrides:  # prepared data given: it is not rebuilt
        if not _is_file(Path(d.out_dir) / "manifest.json"):
            raise ConfigError(f"--data {d.out_dir} holds no prepared data (no manifest.json): run "
                              f"`python data_prep.py --preset {cfg.preset} --data {d.out_dir}` first")
    elif stage in ("data_prep", "train_sft", "eval_samples"):  # these prepare the data, or reuse a preparation
        local_source(d)
        if not _is_file(Path(d.out_dir).expanduser() / "manifest.json"):
            check_writable_dir(d.out_dir, "--data")
    if stage == "train_sft":
        check_writable_dir(r.out_dir, "--out")
        check_training_start(cfg, newest_good_step(r.out_dir, read_arrays=False) is not None)
    if stage in ("eval_samples", "export"):
        check_saved_run(args.run, cfg, "--run", args.step)
        check_writable_dir(args.out or Path(args.run) / "eval", "--out")
    if stage == "export":
        check_export_dir(args.out, args.format, args.upload)
    if stage == "eval_samples" and cfg.eval.prompts and not Path(cfg.eval.prompts).is_file():
        raise ConfigError(f"--eval.prompts {cfg.eval.prompts} does not exist: pass a .jsonl or a text file of prompts")


def check_file_system_path(path: str | Path | None, flag: str) -> None:
    """Run and data directories are file-system paths, shared by a pod slice's hosts through a mount: a URL stops."""
    if path and "://" in str(path):
        raise ConfigError(f"{flag} {path} is a URL: the run's lock (an OS file lock that process 0 holds) and the "
                          "memory-mapped data need a file system; mount the bucket on every host (gcsfuse "
                          "--implicit-dirs BUCKET ~/bucket) and pass the path under it")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """A directory a stage writes into must be one, or be creatable, and must take a new file: checked by creating
    it (and any missing folder above it) and a probe file in it, then removing what the check created. Permission
    bits do not tell: as root, os.access says yes under /proc, where nothing can be created."""
    path = Path(path).expanduser()
    missing = [p for p in (path, *path.parents) if not _exists(p)]  # deepest first
    # Each fact is looked up again where it is used: another process checking the same path (the hosts of one run)
    # may create and remove the folders in between.
    if _exists(path) and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory: pass a directory")
    existing = next(p for p in (path, *path.parents) if _exists(p))
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable (no write permission on {existing}): pass a writable "
                          "directory")
    try:
        for attempt in range(3):  # a folder another process's check created may vanish under this one's probe
            path.mkdir(parents=True, exist_ok=True)
            try:
                handle, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        what = "cannot be created" if missing else "is not writable"
        raise ConfigError(f"{flag} {path} {what} ({err.strerror}): pass a directory that can be written") from None
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):  # not empty: another process writes there now
                folder.rmdir()


def _exists(path: Path) -> bool:
    """Whether a path exists; False for one the system cannot even look up (a name too long, say)."""
    try:
        return path.exists()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def upload_handle(model: str) -> str:
    """``--upload USER/MODEL`` -> the handle the template downloads, USER/MODEL/jax/size."""
    if len(model.split("/")) != 2 or not all(model.split("/")):
        raise ConfigError(f"--upload {model!r} is not a Kaggle model: pass OWNER/MODEL (the upload goes to "
                          f"OWNER/MODEL/{JUDGED_VARIATION}, where the judges' template downloads it)")
    return f"{model}/{JUDGED_VARIATION}"


def check_export_dir(out_dir: str | Path, fmt: str, upload_model: str) -> None:
    """An export replaces its output folder whole (a variation must hold nothing else): it must be new, empty or an
    earlier export (it has export.json). Only the orbax export is uploaded, to ``upload_handle(upload_model)``."""
    out_dir = Path(out_dir).expanduser()
    check_writable_dir(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "export.json").is_file():
        raise ConfigError(f"--out {out_dir} holds files that are not an export (no export.json), which the export "
                          "would replace: pass a new or empty directory")
    if upload_model:
        upload_handle(upload_model)
        if fmt != "orbax":
            raise ConfigError("--upload publishes the orbax export, which the judges' template loads: "
                              "drop --upload or use --format orbax")


def local_source(data_cfg: DataConfig) -> Path | None:
    """The local file ``--data.source`` names, checked to be a readable file; None for a Hugging Face dataset."""
    path = Path(data_cfg.source).expanduser()
    if path.suffix not in SOURCE_SUFFIXES and not path.exists():
        return None
    if path.is_dir():
        raise ConfigError(f"source {path} is a directory, not a .jsonl/.parquet file: set --data.source to a file")
    if not path.is_file():
        raise ConfigError(f"source file {path} does not exist: set --data.source")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"source file {path} is not readable (no read permission): set --data.source")
    if path.suffix == ".parquet" and not _has_parquet_markers(path):
        raise ConfigError(f"source {path} is not a Parquet file (no PAR1 marker at its start and end): "
                          "re-download it, or name a JSON-lines file .jsonl")
    return path


def _has_parquet_markers(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        return size >= 12 and head == b"PAR1" and f.read(4) == b"PAR1"
