"""What a distillation run reports and checks besides its losses: `TrainingLog` (log lines,
TensorBoard, W&B) and, under DDP, `check_replicas` (every rank holds the same student)."""
from __future__ import annotations

from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch import nn

from utils import logger


class TrainingLog:
    """What a run reports every --log_interval steps: a log line, TensorBoard scalars
    (<dump_path>/log/train) and, with --is_wandb, Weights & Biases. The master rank's job."""

    def __init__(self, params, dump_path: Path):
        self.params = params
        self.dump_path = Path(dump_path)
        self.tb = None

    def open(self) -> None:
        """Open TensorBoard's writer (and W&B with --is_wandb); once."""
        if self.tb is not None:
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.dump_path / "log" / "train"), flush_secs=30)
        if self.params.is_wandb:
            import wandb

            wandb.init(project="causal-distill", name=self.params.run_name, config=vars(self.params))

    def write(self, step: int, values: dict[str, float], lr: float, tok_s: float, n_skipped: int, bar) -> None:
        """Log the mean `values` of the losses since the last log, the learning rate and the speed."""
        for k, v in values.items():
            self.tb.add_scalar(f"losses/{k}", v, step)
        self.tb.add_scalar("learning_rate/lr", lr, step)
        self.tb.add_scalar("speed/real_tokens_per_s", tok_s * self.params.world_size, step)
        self.tb.add_scalar("memory/rss_gib", psutil.Process().memory_info().rss / 2**30, step)
        if self.params.device.type == "cuda":
            self.tb.add_scalar("memory/cuda_max_allocated_gib", torch.cuda.max_memory_allocated() / 2**30, step)
        if n_skipped:
            self.tb.add_scalar("faults/skipped_nonfinite_steps", n_skipped, step)
        if self.params.is_wandb:
            import wandb

            wandb.log({**{f"loss/{k}": v for k, v in values.items()}, "lr": lr, "tok_s": tok_s}, step=step)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
        logger.info("step %d | %s | lr %.2e | %.0f tok/s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                    lr, tok_s)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_replicas(student: nn.Module, is_master: bool) -> None:
    """Under DDP, check that every rank holds the same student weights (bitwise), and say so."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in student.parameters()])
    digest = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(flat.numel(), device=flat.device,
                                                                                dtype=torch.float64)).sum()])
    gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"student weights differ across ranks: {[g.tolist() for g in gathered]}")
    if is_master:
        logger.info("all %d ranks hold identical student weights (digest %s)", len(gathered),
                    [f"{x:.6e}" for x in gathered[0].tolist()])
