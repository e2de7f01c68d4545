"""Checkpoints of an --fsdp run: sharded with `torch.distributed.checkpoint` (DCP), and the consolidated student.

A sharded checkpoint is `checkpoint-<step>/` in the dump path, as under DDP, holding

- `__<rank>_0.distcp`: each rank's shards of the student's weights and of the AdamW state
  (tensors only, written by that rank), and DCP's `.metadata` (where each shard lies);
- `training_state.pt`: everything else a continuation needs (schedule, grad scaler, counters, the
  optimizer's hyper-parameters, every rank's RNG state), plain data and tensors that
  `torch.load(weights_only=True)` reads;
- `config.json`: the student's config (`scripts/consolidate_checkpoint.py` turns the folder into an HF folder);
- `manifest.json`, written last: the size and blake2b of every other file, each rank hashing its own
  shard. `checkpoints.checkpoint_problem` verifies it as it verifies a DDP checkpoint.

The folder is written under a hidden temporary name by all ranks and renamed into place by rank 0
once sealed, so an interrupted write never looks like a checkpoint. A resume needs the same number of
ranks (the data order depends on it). DCP's `.metadata` is a pickle; it is read here with an
unpickler that admits only DCP's own metadata classes (`SafeMetadataReader`), and only once the
manifest has vouched for it. `full_student_state` and `stock_model` make the consolidated student.
"""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from checkpoints import (CHECKPOINT_PREFIX, DCP_METADATA, MANIFEST_FILE, STATE_FILE, CheckpointWriter,
                         check_fingerprint, checkpoint_problem, is_sharded_checkpoint, load_training_state,
                         save_training_state, short_load_error, state_problem)
from atomic_files import atomic_write_text, file_blake2b, replace_folder
from utils import CliError, logger

# The globals a DCP `.metadata` pickle of torch 2.13 refers to when it describes tensors only; anything else is
# refused. Not BytesStorageMetadata: DCP loads such an entry with torch.load(weights_only=False), which runs code,
# and our checkpoints hold tensors only.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                               "TensorStorageMetadata", "ChunkStorageMetadata",
                                               "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                          torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{DCP_METADATA} refers to {module}.{name}, which DCP's metadata never holds")


def safe_metadata_reader(folder: Path):
    """A DCP `FileSystemReader` of `folder` whose `.metadata` is read by a restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeMetadataReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / DCP_METADATA
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(str(folder))


def check_metadata(folder: Path, expected: dict) -> None:
    """CliError unless DCP's `.metadata` of checkpoint `folder` describes tensors only (read with the restricted
    unpickler) and holds each tensor of `expected` (nested as for `dcp.load`) with its shape and dtype: a checkpoint
    is refused before DCP reads any shard, so nothing is ever unpickled from one."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        entries = safe_metadata_reader(folder).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 -- a refused global, a truncated pickle: one message
        raise CliError(f"checkpoint {folder}: its {DCP_METADATA} is refused ({short_load_error(err)}); a checkpoint "
                       f"of this project holds tensors only") from None
    if not isinstance(entries, dict):
        raise CliError(f"checkpoint {folder}: its {DCP_METADATA} holds no index of tensors")
    others = sorted(k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata))
    if others:
        raise CliError(f"checkpoint {folder}: its {DCP_METADATA} lists entries that are not tensors ({others[:3]}); "
                       f"a checkpoint of this project holds tensors only, so it is refused unread")
    flat, _ = flatten_state_dict(expected)
    for key, tensor in flat.items():
        entry = entries.get(key)
        if entry is None:
            raise CliError(f"checkpoint {folder} does not fit this student: it holds no {key}")
        if tuple(entry.size) != tuple(tensor.shape) or entry.properties.dtype != tensor.dtype:
            raise CliError(f"checkpoint {folder} does not fit this student: {key} is {tuple(entry.size)} "
                           f"{entry.properties.dtype} there, {tuple(tensor.shape)} {tensor.dtype} here")


# --- plain data for weights_only loading ---------------------------------------------------------------
def portable_rng(state: dict) -> dict:
    """`checkpoints.rng_state()` with NumPy's state as a tensor, so that weights_only loading reads it."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                               float(cached))}


def native_rng(state: dict) -> dict:
    """The inverse of `portable_rng`: the state `checkpoints.set_rng_state` takes."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}


def portable_state(state: dict) -> dict:
    """A training state (`CausalDistiller.save_checkpoint`) as data weights_only loading reads."""
    out = dict(state)
    out["rng"] = [portable_rng(s) for s in state["rng"]]
    if isinstance(state.get("pairing"), np.ndarray):
        out["pairing"] = torch.from_numpy(state["pairing"].astype(np.int64))
    return out


# The entries of a sharded training state and their types (checked on load).
SHARDED_STATE_FIELDS = {"scheduler": dict, "scaler": dict, "epoch": int, "n_step": int, "batch_in_epoch": int,
                        "n_tokens": int, "n_skipped_nonfinite": int, "world_size": int, "rng": list,
                        "optimizer_param_groups": list, "has_optimizer_state": bool}


# --- writing ---------------------------------------------------------------------------------------------
def _hash_files(folder: Path, names) -> dict:
    return {name: {"size": (folder / name).stat().st_size, "blake2b": file_blake2b(folder / name)} for name in names}


def write_sharded_checkpoint(writer, step: int, student: nn.Module, optimizer, state: dict, is_master: bool):
    """Write `checkpoint-<step>/` (a collective: every rank calls it). Returns the folder on rank 0, None elsewhere.

    `writer` is the run's `checkpoints.CheckpointWriter` (its dump path, room-making and error messages).
    `state` is the training state without the optimizer; the optimizer's tensors go to DCP beside the weights.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    target = writer.dump_path / f"{CHECKPOINT_PREFIX}{step}"
    tmp = writer.dump_path / f".{target.name}.tmp"
    if is_master:
        writer._make_room()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    has_optim = bool(optimizer.state)  # (torch would make up the state of an optimizer that has not stepped yet)
    osd = get_optimizer_state_dict(student, optimizer) if has_optim else {"state": {}, "param_groups": []}
    tensors = {"model": get_model_state_dict(student), "optim": osd["state"]}
    state = {**portable_state(state), "optimizer_param_groups": osd["param_groups"], "has_optimizer_state": has_optim}
    failure, mine = None, None
    try:
        dcp.save(tensors, checkpoint_id=str(tmp))
        mine = _hash_files(tmp, sorted(f.name for f in tmp.glob(f"__{dist.get_rank()}_*.distcp")))
    except Exception as err:  # noqa: BLE001 -- reported once every rank has stopped writing
        failure = err
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if is_master:
        try:
            if failure is not None or any(g is None for g in gathered):
                raise failure or RuntimeError(f"ranks {[r for r, g in enumerate(gathered) if g is None]} could not "
                                              f"write their shards")
            _seal(tmp, target, student, state, {k: v for g in gathered for k, v in g.items()})
            failure = None
        except Exception as err:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            failure = writer._write_error(target, err)
    outcome = [None if failure is None else str(failure)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise failure if isinstance(failure, CliError) else CliError(f"rank {dist.get_rank()}: {outcome[0]}")
    if not is_master:
        return None
    logger.info("sharded checkpoint written: %s (%d ranks)", target, len(gathered))
    return target


def _seal(tmp: Path, target: Path, student: nn.Module, state: dict, shards: dict) -> None:
    """Rank 0's part: the config, the training state, then the manifest (last), and the folder renamed into place."""
    student.config.to_json_file(tmp / "config.json")
    save_training_state(state, tmp / STATE_FILE)
    files = {**shards, **_hash_files(tmp, (DCP_METADATA, STATE_FILE, "config.json"))}
    atomic_write_text(tmp / MANIFEST_FILE, json.dumps({"files": dict(sorted(files.items()))}, indent=1))
    replace_folder(tmp, target)


# --- loading ---------------------------------------------------------------------------------------------
def check_engine(folder: Path, sharded: bool) -> None:
    """CliError when checkpoint `folder` was written by the other engine (sharded by --fsdp, or whole by DDP)."""
    if is_sharded_checkpoint(folder) and not sharded:
        raise CliError(f"checkpoint {folder} was written by an --fsdp run (sharded): resume it with --fsdp under "
                       f"torchrun with as many processes, or make an HF folder of it with "
                       f"scripts/consolidate_checkpoint.py")
    if sharded and not is_sharded_checkpoint(folder):
        raise CliError(f"checkpoint {folder} was written without --fsdp: resume it without --fsdp")


def load_sharded_state(folder: Path) -> dict:
    """The training state of sharded checkpoint `folder`, read with weights_only=True (`load_training_state`) and
    checked (`state_problem`, with the fields of a sharded state); CliError if damaged or crafted."""
    try:
        state = load_training_state(Path(folder) / STATE_FILE)
    except Exception as err:  # noqa: BLE001 -- a damaged or crafted file gets one clear message
        raise CliError(f"checkpoint {folder} is damaged: cannot read {STATE_FILE} ({short_load_error(err)})") from None
    problem = state_problem(state, fields=SHARDED_STATE_FIELDS)
    if problem:
        raise CliError(f"checkpoint {folder} is damaged: {problem}")
    return state


def read_sharded_checkpoint(folder: Path, student: nn.Module, optimizer, params) -> dict:
    """Verify sharded checkpoint `folder`, load its shards into the sharded `student` and `optimizer` (a
    collective) and return its training state (RNG states in `set_rng_state`'s form). CliError when the folder is
    damaged, written by another number of ranks, or for another student or data file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    folder = Path(folder)
    problem = checkpoint_problem(folder)
    if problem:
        raise CliError(f"checkpoint {folder} is damaged: {problem}")
    state = load_sharded_state(folder)
    if state["world_size"] != params.world_size:
        raise CliError(f"checkpoint {folder} was written by {state['world_size']} processes; resume with the same "
                       f"number (now {params.world_size}), or consolidate it with scripts/consolidate_checkpoint.py "
                       f"and start a new run from its weights")
    if len(state["rng"]) != params.world_size:
        raise CliError(f"checkpoint {folder} is damaged: it holds the RNG state of {len(state['rng'])} processes")
    if state.get("data_fingerprint") is not None:
        if not isinstance(state["data_fingerprint"], dict):
            raise CliError(f"checkpoint {folder} is damaged: {STATE_FILE}: data_fingerprint is not a dictionary")
        check_fingerprint(params.data_file, state["data_fingerprint"], params.data_fingerprint)
    tensors = {"model": get_model_state_dict(student)}
    if state["has_optimizer_state"]:
        tensors["optim"] = get_optimizer_state_dict(student, optimizer)["state"]
    check_metadata(folder, tensors)
    try:
        dcp.load(tensors, checkpoint_id=str(folder), storage_reader=safe_metadata_reader(folder))
    except Exception as err:  # noqa: BLE001 -- shards of another student, a refused metadata global: one message
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CliError(f"checkpoint {folder} does not fit this student or is damaged: cannot load its shards "
                       f"({type(err).__name__}: {first})") from None
    set_model_state_dict(student, tensors["model"])
    if state["has_optimizer_state"]:
        set_optimizer_state_dict(student, optimizer, {"state": tensors["optim"],
                                                      "param_groups": state["optimizer_param_groups"]})
    state["rng"] = [native_rng(s) for s in state["rng"]]
    return state


# --- the consolidated student ----------------------------------------------------------------------------
def full_student_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded student's full weights on rank 0's CPU ({} on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def stock_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A stock HF model of `config`'s family holding the tensors of `state` (no copy): built on the meta
    device, then given the tensors. What `save_pretrained` writes of it is a plain HF folder."""
    from interventions import FAMILIES

    config = copy.deepcopy(config)
    family = FAMILIES[config.model_type]
    with torch.device("meta"):
        model = family.model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise CliError(f"the weights do not fit a {family.model_class.__name__}: missing {missing}, "
                       f"unexpected {unexpected}")
    model.tie_weights()  # (the gathered copies of tied weights are equal; tied again, they are saved once)
    return model.eval()


def consolidate(folder: Path, out: Path) -> None:
    """Write sharded checkpoint `folder` as an HF model folder `out` (one process, no process group)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig

    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise CliError(f"{folder} is not a sharded checkpoint (no {DCP_METADATA}); a DDP checkpoint is already an "
                       f"HF model folder")
    problem = checkpoint_problem(folder)
    if problem:
        raise CliError(f"checkpoint {folder} is damaged: {problem}")
    config = AutoConfig.from_pretrained(folder)
    from interventions import FAMILIES

    model = FAMILIES[config.model_type].model_class(config)
    tensors = {"model": model.state_dict()}
    check_metadata(folder, tensors)
    try:
        with warnings.catch_warnings():  # (one process on purpose: DCP's warning that it assumes so is noise)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(tensors, checkpoint_id=str(folder), storage_reader=safe_metadata_reader(folder), no_dist=True)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CliError(f"checkpoint {folder}: cannot load its shards ({type(err).__name__}: {first})") from None
    out.mkdir(parents=True, exist_ok=True)
    CheckpointWriter(out).write_final(model)
    atomic_write_text(out / "consolidated_from.json", json.dumps({"checkpoint": str(folder.resolve())}, indent=1))
