"""The one training loop, shared by teachers and students.

    from pipeline.train.loop import fit, sgd, cosine_schedule
    from pipeline.train.sampling import shuffled_batches

    def step(models, batch):                       # models: as given (DDP-wrapped under torchrun)
        z = models[0](batch.x)
        return {"loss": F.cross_entropy(z.float(), batch.y), "logits": z}

    state = fit([model], [opt], step=step, dataset=ds, epochs=E, runtime=rt, schedulers=[sched],
                batch_sampler=lambda e: shuffled_batches(len(ds), batch_size=128, seed=0, epoch=e))

Per step the loop zeroes every optimizer, runs ``step`` under the runtime's autocast,
backpropagates ``out["loss"]`` once, steps every optimizer then every scheduler. It never
looks at what a step computes: 0-dim entries of the step's dict are logged as ``train_<name>``
(means weighted by batch size), 1-D entries (per-mentor stats) as ``train_<name>_<k>``, and
``logits`` (a tensor, or a list for several students) give ``train_top1``/``train_top5``
(``train_top1_<i>`` for student i). Steps should cast logits to float32 before a loss (bf16 on CUDA).

Data: ``batch_sampler(epoch)`` yields arrays of row indices (shuffled, per DDP rank); the
dataset gives ``(x, y)`` for those rows through ``get_batch(rows)`` when it has that fast path,
else by stacking ``dataset[i]``. The sampler is consumed lazily. ``workers > 0`` decodes in
a DataLoader whose workers are created each epoch (after ``on_epoch_start`` picked the epoch's
view); it draws up to ``2 * workers`` batches ahead of the step from the sampler.
``Batch.rows`` lets a step gather cached targets for the same rows.

Resume: ``on_checkpoint(state, train_state)`` runs on rank 0 after every epoch; ``train_state``
(optimizers, schedulers, epoch, step, history, RNG states) fed back through
``restore_train_state`` continues to exactly the weights of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import checkpoint as ckpt
from pipeline import faults
from pipeline.errors import UserError
from pipeline.files import write_json
from pipeline.runtime import Runtime, rng_state, set_rng_state
from pipeline.train.sampling import RankBatches


@dataclass
class Batch:
    """What a step function receives: inputs and labels on the device, rows on the CPU."""

    x: torch.Tensor
    y: torch.Tensor  # int64
    rows: np.ndarray  # int64 row indices into the dataset (the cache row order)
    epoch: int  # 0-based
    step: int  # global optimizer step, 0-based
    mixed: torch.Tensor | None = None  # mixed views: the rows' mixed labels [B, C] float32 (pipeline.data.mix)


StepFn = Callable[[Sequence[nn.Module], Batch], Mapping[str, object]]


@dataclass
class LoopState:
    """Progress of a run: epochs completed, optimizer steps taken, one metrics row per epoch.

    ``seconds`` are the wall times of the epochs this process ran: logs only, never in a
    checkpoint or the history, so a rerun with the same inputs writes the same bytes."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


# --- building blocks -------------------------------------------------------------


def sgd(
    params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base lr to 0 over ``total_steps`` optimizer steps (stepped per batch)."""
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def capture_train_state(
    state: LoopState, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence = ()
) -> dict:
    """What ``--resume`` needs besides the weights (plain data for a weights_only checkpoint)."""
    return {
        "epoch": state.epoch,
        "step": state.step,
        "history": [dict(row) for row in state.history],
        "optimizers": [opt.state_dict() for opt in optimizers],
        "schedulers": [sched.state_dict() for sched in schedulers],
        "rng": rng_state(),
    }


def restore_train_state(
    train_state: dict, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence = ()
) -> LoopState:
    """Load optimizer / scheduler / RNG states saved by ``capture_train_state``; returns where to go on."""
    if len(train_state["optimizers"]) != len(optimizers) or len(train_state["schedulers"]) != len(schedulers):
        raise UserError(
            f"resume: expected {len(optimizers)} optimizers and {len(schedulers)} schedulers, found "
            f"{len(train_state['optimizers'])} and {len(train_state['schedulers'])}"
        )
    for opt, saved in zip(optimizers, train_state["optimizers"]):
        opt.load_state_dict(saved)
    for sched, saved in zip(schedulers, train_state["schedulers"]):
        sched.load_state_dict(saved)
    set_rng_state(train_state["rng"])
    return LoopState(train_state["epoch"], train_state["step"], [dict(r) for r in train_state["history"]])


# --- data ---------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    """Indexable by an array of rows: ``(x [B, ...], y [B])`` from ``get_batch`` or stacked items."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        fetch = getattr(self.dataset, "get_batch", None)
        if fetch is not None:
            x, y = fetch(rows)
            return torch.as_tensor(x), torch.as_tensor(y), rows
        items = [self.dataset[int(i)] for i in rows]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor(np.asarray([int(item[1]) for item in items]))
        return x, y, rows


INBAND_BYTES = 2**20  # a worker's tensor up to this size travels pickled in its message, not as a shared-memory file


def _inband(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    """A small tensor as a NumPy array: pickled with the worker's message instead of one shared-memory
    file (and a socket round trip to pass it) per tensor; the same bytes either way."""
    if t.numel() * t.element_size() <= INBAND_BYTES and t.dtype != torch.bfloat16 and not t.requires_grad:
        return t.numpy()
    return t


def _as_sent(item: object) -> object:
    """The DataLoader's collate function for ``_Shares``: items stay as the worker made them."""
    return item


class _Shares(torch.utils.data.IterableDataset):
    """What each DataLoader worker decodes of an epoch's ``RankBatches``: batch i goes to worker
    i mod W, the order in which a DataLoader collects its workers' items, so ``(x, y)`` come back in
    batch order and no row indices travel through its queues. ``inband``: small tensors come back
    as NumPy arrays (``_inband``; not when the DataLoader pins memory)."""

    def __init__(self, source: _Rows, batches: RankBatches, *, inband: bool) -> None:
        self.source, self.order, self.slices, self.inband = source, batches.order, batches.slices, inband

    def __iter__(self) -> Iterator[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for lo, hi in self.slices[worker::workers]:
            x, y, _ = self.source[self.order[lo:hi]]
            yield (_inband(x), _inband(y)) if self.inband else (x, y)


def iter_batches(
    dataset: torch.utils.data.Dataset, batches: Iterable[np.ndarray], *, runtime: Runtime, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """``(x, y, rows)`` for each batch of rows, ``x`` and ``y`` (int64) on the runtime's device.

    ``batches`` is consumed lazily (a streaming sampler stays in step with training); with
    ``workers > 0`` a DataLoader reads up to ``2 * workers`` batches ahead. A ``RankBatches`` is
    iterated in this process, one batch per item, while the workers decode their shares of it.
    """
    source = _Rows(dataset)
    pin = runtime.device.type == "cuda"
    if workers > 0 and isinstance(batches, RankBatches):
        decoded = iter(torch.utils.data.DataLoader(_Shares(source, batches, inband=not pin), batch_size=None,
                                                   collate_fn=_as_sent, num_workers=workers, pin_memory=pin))
        triples: Iterable = ((*map(torch.as_tensor, next(decoded)), rows) for rows in batches)
    elif workers > 0:
        triples = torch.utils.data.DataLoader(
            source,
            sampler=batches,  # type: ignore[arg-type]
            batch_size=None,
            num_workers=workers,
            pin_memory=pin,
        )
    else:
        triples = (source[rows] for rows in batches)
    for x, y, rows in triples:
        yield runtime.to_device(x), runtime.to_device(y).long(), np.asarray(rows, dtype=np.int64)


# --- metrics --------------------------------------------------------------------------


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Number of rows whose label is among the ``k`` largest logits (0-dim tensor)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == y[:, None]).any(dim=-1).sum()


class _Meter:
    """Batch-size-weighted float64 sums on the device; one sync per epoch.

    Each step's figures go into one float32 vector (the stats times the batch size, then the
    top-1/top-5 counts and plain numbers), made float64 once and added to one running vector:
    value by value the same additions as one sum per name, in a few tensor ops per step. A step
    whose names or shapes differ from the first one's moves the running vector into one sum per
    name for the rest of the epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.layout: tuple[tuple[str, int, int], ...] | None = None   # (name, ndim, size) of ``total``
        self.total: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, out: Mapping[str, object], y: torch.Tensor) -> None:
        n = y.shape[0]
        self.count += n
        scaled: list[torch.Tensor] = []
        plain: list[torch.Tensor] = []
        scaled_keys: list[tuple[str, int, int]] = []
        plain_keys: list[tuple[str, int, int]] = []
        for name, value in out.items():
            if name == "logits":
                logits = [value] if isinstance(value, torch.Tensor) else list(value)  # type: ignore[arg-type]
                for i, z in enumerate(logits):
                    suffix = "" if len(logits) == 1 else f"_{i}"
                    for k in (1, 5) if z.shape[-1] >= 5 else (1,):
                        plain.append(topk_correct(z, y, k).float())
                        plain_keys.append((f"top{k}{suffix}", 0, 1))
            elif isinstance(value, torch.Tensor) and value.ndim in (0, 1):  # 1-D: per-mentor stats
                v = value if value.dtype == torch.float32 else value.float()
                scaled.append(v.reshape(1) if value.ndim == 0 else v)
                scaled_keys.append((name, value.ndim, v.numel()))
            elif isinstance(value, (int, float)):
                plain.append(torch.tensor(float(value) * n, device=y.device))
                plain_keys.append((name, 0, 1))
        parts = ([torch.cat(scaled) * n] if scaled else []) + ([torch.stack(plain)] if plain else [])
        if not parts:
            return
        step = (torch.cat(parts) if len(parts) > 1 else parts[0]).double()
        layout = tuple(scaled_keys + plain_keys)
        if self.total is None and not self.sums:
            self.layout, self.total = layout, step
        elif self.total is not None and layout == self.layout:
            self.total += step
        else:
            self._split()
            for name, value in self._named(layout, step).items():
                self.sums[name] = self.sums[name] + value if name in self.sums else value

    @staticmethod
    def _named(layout: Sequence[tuple[str, int, int]], vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for name, ndim, size in layout:
            out[name] = vector[at] if ndim == 0 else vector[at:at + size]
            at += size
        return out

    def _split(self) -> None:
        """Move the running vector into ``sums`` (one tensor per name)."""
        if self.total is not None and self.layout is not None:
            self.sums.update(self._named(self.layout, self.total))
        self.total, self.layout = None, None

    def result(self, runtime: Runtime, *, prefix: str) -> dict[str, float]:
        self._split()
        if not self.sums:
            return {}
        names = sorted(self.sums)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums[names[0]].device)
        flat = runtime.all_reduce_sum(torch.cat([self.sums[n].reshape(-1) for n in names] + [count])).tolist()
        total = max(flat[-1], 1.0)
        out, at = {}, 0
        for name in names:           # a vector ``name`` becomes ``name_0``, ``name_1``, ...
            size = self.sums[name].numel()
            keys = [name] if self.sums[name].ndim == 0 else [f"{name}_{k}" for k in range(size)]
            out.update({f"{prefix}{key}": value / total for key, value in zip(keys, flat[at:at + size])})
            at += size
        return out


# --- the loop -------------------------------------------------------------------------------


def _finite(models: Sequence[nn.Module]) -> bool:
    """Whether every weight of ``models`` is finite (one reduction and one sync, once per epoch)."""
    flags = [torch.isfinite(p).all() for m in models for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class TrainingWarning(UserWarning):
    """A run that finished but did not learn (``learning_problem``)."""


def learning_problem(history: Sequence[Mapping[str, float]], *, num_classes: int, what: str, hint: str) -> str | None:
    """Why a finished run looks like it learned nothing, or None: its last accuracy (``val_top1``,
    else ``train_top1``) is at chance (at most 1.2 / C), or its ``train_loss`` moved by less than
    1 % from the first epoch to the last (3 epochs or more). ``hint`` names the likely cause."""
    if not history:
        return None
    last = history[-1]
    key = "val_top1" if "val_top1" in last else "val_top1_0" if "val_top1_0" in last else "train_top1"
    chance = 1.0 / num_classes
    if key in last and last[key] <= 1.2 * chance:
        return (f"{what} ended at chance accuracy ({key} {last[key]:.4f}; chance is {chance:.4f} for "
                f"{num_classes} classes): it did not learn; {hint}")
    first_loss, last_loss = history[0].get("train_loss"), last.get("train_loss")
    if len(history) >= 3 and first_loss is not None and last_loss is not None \
            and abs(first_loss - last_loss) <= 0.01 * abs(first_loss):
        return (f"{what}: train_loss did not move over {len(history)} epochs ({first_loss:.4f} -> {last_loss:.4f}): "
                f"it did not learn; {hint}")
    return None


def finish_run(history: Sequence[Mapping[str, float]], *, runtime: Runtime, num_classes: int, what: str, hint: str,
               metrics_path: str | None) -> dict:
    """The end of every training run: the last epoch's metrics; on rank 0 a ``TrainingWarning`` (also
    kept as ``metrics["warning"]``) when ``learning_problem`` finds the run learned nothing, then the
    metrics JSON at ``metrics_path``."""
    metrics = ckpt.plain(history[-1]) if history else {}
    problem = learning_problem(history, num_classes=num_classes, what=what, hint=hint)
    if problem and runtime.is_main:
        warnings.warn(problem, TrainingWarning, stacklevel=3)
        metrics["warning"] = problem
    if runtime.is_main and metrics_path:
        write_json(metrics_path, metrics)
    return metrics


def epoch_line(desc: str, row: Mapping[str, float], *, epochs: int, seconds: float) -> str:
    """``train 3/20: train_loss 0.4121 train_top1 0.8400 val_top1 0.8012 (1.9 s)``: losses and accuracies."""
    keys = [k for k in row if k.startswith(("train_loss", "train_top1", "val_top1", "val_bayes_mse"))]
    figures = " ".join(f"{k} {row[k]:.4f}" for k in keys)
    return f"{desc} {row['epoch']}/{epochs}: {figures} ({seconds:.1f} s)"


def fit(
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    step: StepFn,
    dataset: torch.utils.data.Dataset,
    batch_sampler: Callable[[int], Iterable[np.ndarray]],
    epochs: int,
    runtime: Runtime,
    schedulers: Sequence = (),
    workers: int = 0,
    start: LoopState | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int, dict], dict | None] | None = None,
    on_checkpoint: Callable[[LoopState, dict], None] | None = None,
    on_diverged: Callable[[int], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> LoopState:
    """Train ``models`` with ``step`` for epochs ``start.epoch .. epochs - 1``; returns the final state.

    ``models`` must already be on the runtime's device (``runtime.prepare``); the step receives
    them wrapped by ``runtime.wrap`` (DDP under torchrun). ``on_epoch_start(epoch)`` runs before
    the epoch's data is opened (set the view there); ``on_epoch_end(epoch, row)`` may return
    more metrics for the row (validation); ``on_checkpoint`` runs on rank 0 only. When an
    epoch's loss or the weights after it are not finite, ``on_diverged(epoch)`` may raise an error
    naming the cause (NaN targets, say); otherwise the run stops with "training diverged ... lower
    the lr", before that epoch's checkpoint. Nothing is checked per step: the epoch's loss is
    summed on the device anyway, and the weights are checked once per epoch.
    """
    state = start or LoopState()
    wrapped = [runtime.wrap(m) for m in models]
    show = progress and runtime.is_main and sys.stderr.isatty()
    for epoch in range(state.epoch, epochs):
        began = time.perf_counter()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        for m in models:
            m.train()
        batches = batch_sampler(epoch)
        meter = _Meter()
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc=f"{desc} {epoch + 1}/{epochs}", disable=not show, leave=False)
        for i, (x, y, rows) in enumerate(iter_batches(dataset, batches, runtime=runtime, workers=workers)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with runtime.autocast():
                out = step(wrapped, Batch(x, y, rows, epoch, state.step))
            out["loss"].backward()  # type: ignore[union-attr]
            for opt in optimizers:
                opt.step()
            for sched in schedulers:
                sched.step()
            state.step += 1
            meter.add(out, y)
            bar.update(1)
            if show and i % 20 == 0:
                bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}")  # type: ignore[arg-type]
        bar.close()
        row: dict = {"epoch": epoch + 1, "lr": optimizers[0].param_groups[0]["lr"] if optimizers else 0.0}
        row.update(meter.result(runtime, prefix="train_"))
        finite_weights = _finite(models)
        if not math.isfinite(row.get("train_loss", 0.0)) or not finite_weights:
            if on_diverged is not None:
                on_diverged(epoch)
            if not finite_weights:  # a NaN gradient of the epoch's last steps: the loss did not show it yet
                raise UserError(f"training diverged: the weights are NaN/Inf after epoch {epoch + 1} (train_loss "
                                f"{row.get('train_loss')}); lower the lr")
            raise UserError(f"training diverged: train_loss is {row['train_loss']} in epoch {epoch + 1}; lower the lr")
        if on_epoch_end is not None:
            row.update(on_epoch_end(epoch, row) or {})
        state.seconds.append(round(time.perf_counter() - began, 3))
        state.epoch = epoch + 1
        state.history.append(row)
        if progress and runtime.is_main:  # one line per epoch, also in batch-job logs where no bar shows
            tqdm.write(epoch_line(desc, row, epochs=epochs, seconds=state.seconds[-1]), file=sys.stderr)
        if on_checkpoint is not None and runtime.is_main:
            on_checkpoint(state, capture_train_state(state, optimizers, schedulers))
        runtime.barrier()
        faults.point("epoch")  # after the barrier: every rank knows the checkpoint is on disk
    return state
