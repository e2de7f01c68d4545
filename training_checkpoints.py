"""A distiller's checkpoints: what one holds (weights, optimiser, schedule, data position, every rank's RNG), writing
it (whole, or sharded under --fsdp) and continuing from it, and the final student. The file formats and their
checks are `checkpoints.py` and `sharded_checkpoints.py`; `CausalDistiller` calls these at its steps."""
from __future__ import annotations

from pathlib import Path

from checkpoints import read_checkpoint, rng_states_all_ranks, set_rng_state
from sharded_checkpoints import (check_engine, full_student_state, read_sharded_checkpoint, stock_model,
                                 write_sharded_checkpoint)
from training_log import check_replicas
from utils import CliError, logger


def save(d) -> Path | None:
    """Write `checkpoint-<step>/` of distiller `d` with everything a continuation needs (checkpoints.CheckpointWriter).

    Every rank takes part (the RNG states are gathered); the master writes, then prunes beyond
    --save_total_limit. Under --fsdp every rank writes its shards (`sharded_checkpoints.py`).
    Returns the folder on the master, None elsewhere.
    """
    # (under --fsdp the optimizer's tensors are sharded beside the weights)
    state = {} if d.fsdp is not None else {"optimizer": d.optimizer.state_dict()}
    state.update({
        "scheduler": d.scheduler.state_dict(),
        "scaler": d.scaler.state_dict(),
        "epoch": d.epoch,
        "n_step": d.n_step,
        "batch_in_epoch": d.batch_in_epoch,
        "n_tokens": d.n_tokens,
        "n_skipped_nonfinite": d.n_skipped_nonfinite,
        "pairing": getattr(d.dataset, "pairing", None),
        "world_size": d.params.world_size,
        "data_fingerprint": d.params.data_fingerprint,
        "rng": rng_states_all_ranks(d.multi_gpu),  # collective
    })
    d.last_checkpoint_step = d.n_step
    if d.fsdp is not None:
        target = write_sharded_checkpoint(d.checkpoints, d.n_step, d.student, d.optimizer, state,
                                          d.is_master)
    elif d.is_master:
        target = d.checkpoints.write(d.n_step, d.student, state)
    if not d.is_master:
        return None
    if d.on_checkpoint is not None:
        d.on_checkpoint(target)
    d.checkpoints.prune()
    return target

def load(d, folder: Path) -> None:
    """Continue distiller `d` from a checkpoint written by `save`: weights, optimiser, data position, RNG.

    A damaged checkpoint, a changed data file or another number of processes is a CliError.
    """
    p = d.params
    check_engine(folder, sharded=d.fsdp is not None)
    if d.fsdp is not None:  # (the world size and the RNG states checked, the optimizer's shards loaded)
        state = read_sharded_checkpoint(folder, d.student, d.optimizer, p)
    else:
        state = read_checkpoint(folder, d.student, p.data_file, p.data_fingerprint)
        if state["world_size"] != p.world_size:
            raise CliError(f"checkpoint {folder} was written by {state['world_size']} processes; "
                           f"resume with the same number (now {p.world_size})")
        if len(state["rng"]) != p.world_size:
            raise CliError(f"checkpoint {folder} is damaged: it holds the RNG state of {len(state['rng'])} "
                           f"processes for a run of {p.world_size}")
    try:
        if d.fsdp is None:
            d.optimizer.load_state_dict(state["optimizer"])
        d.scheduler.load_state_dict(state["scheduler"])
        d.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][p.global_rank])
    except Exception as err:  # noqa: BLE001 -- a state of another run or a damaged one: one clear message
        raise CliError(f"checkpoint {folder} is damaged or from another run: cannot restore its optimiser, "
                       f"schedule or RNG state ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                       ) from None
    d.epoch, d.n_step = state["epoch"], state["n_step"]
    d.batch_in_epoch, d.n_tokens = state["batch_in_epoch"], state["n_tokens"]
    d.n_skipped_nonfinite = state["n_skipped_nonfinite"]
    d.last_checkpoint_step = d.n_step
    logger.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", folder, d.epoch, d.n_step,
                d.batch_in_epoch)
    if d.n_step >= d.total_steps:
        logger.info("this checkpoint already reached the %d steps asked for (raise --max_steps or --n_epoch to "
                    "train further)", d.total_steps)

def save_snapshot(d) -> None:
    """The student at this step as a plain HF model folder, `snapshots/step_<n>` in --dump_path (--snapshot_interval);
    written whole or not at all. Every rank calls it (under --fsdp the gather is a collective)."""
    if d.fsdp is not None:
        full = full_student_state(d.student)
        if d.is_master:
            d.checkpoints.write_snapshot(stock_model(d.student.config, full), d.n_step)
        return
    if d.is_master:
        d.checkpoints.write_snapshot(d.student, d.n_step)


def save_final(d) -> None:
    """The student as a plain HF model folder at --dump_path (config.json + model.safetensors); under
    --fsdp the shards gathered on the master into one consolidated folder."""
    if d.fsdp is not None:
        full = full_student_state(d.student)  # (a collective)
        if d.is_master:
            d.checkpoints.write_final(stock_model(d.student.config, full))
            d.log.flush()
        return
    if d.multi_gpu:
        check_replicas(d.student, d.is_master)
    if not d.is_master:
        return
    d.checkpoints.write_final(d.student)
    d.log.flush()
