"""The ``kdcache`` command line: thin click wrappers around the library.

    kdcache --help
    kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet

Every command calls one library function. A user's mistake raises ``UserError`` and ends
here as one line on stderr and exit status 2, never a traceback.

Names and defaults have one source each: the choices of ``--dataset``, ``--loss``, ``--method``
(and the archs listed in the help) are the library's registries, read whenever click validates
or prints help, so a name registered after import is a choice too; option defaults are the
fields of ``TeacherConfig``, ``DistillConfig`` and ``CacheConfig``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
import warnings
from typing import Iterator, Sequence

import click

from pipeline import __version__
from pipeline.cache import CacheConfig, cache_teacher, cache_teachers, one_pass_configs
from pipeline.cache.spot_check import DEFAULT_PAIRS, spot_check
from pipeline.cli_manifest import manifest_group
from pipeline.cli_store import store_group
from pipeline.cli_options import (
    OneLineErrors,
    Greedy,
    GreedyCommand,
    ListsNames,
    LocalPath,
    StorePath,
    Numbers,
    RegistryChoice,
    config_default,
    training_options,
    view_options,
)
from pipeline.errors import UserError
from pipeline.files import check_distinct, check_writable, write_json
from pipeline.inspect import (
    format_report,
    inspect_stores,
    report_json,
    write_report,
    write_samples,
)
from pipeline.inspect_rank import LABEL_ISSUE_MODES, check_ranking_options, label_issue_ranks, rank_samples
from pipeline.inspect_report import write_page
from pipeline.manifest import load_manifest
from pipeline.methods import METHODS
from pipeline.methods.teacher_losses import TEACHER_LOSSES
from pipeline.models import MODELS
from pipeline.runtime import is_main_process
from pipeline.store import codecs
from pipeline.store.schema import DEFAULT_ROWS_PER_BLOCK, Layout, human_bytes, plan_bytes
from pipeline.store.verify import verify_store
from pipeline.teachers import teacher_source
from pipeline.train import (
    DistillConfig,
    EvaluateConfig,
    TeacherConfig,
    distill,
    parse_options,
    student_paths,
    train_teacher,
)
from pipeline.train.loop import TrainingWarning
from pipeline.train.student import CACHE_MODES


def _option_list(given: Sequence[str], flag: str) -> dict:
    """``KEY=VALUE`` options of a repeatable, comma-separated flag (``--augment-option n=2,m=9``)."""
    return parse_options([pair for text in given for pair in text.split(",") if pair.strip()], flag=flag)


def _probability(flag: str, value: str | None) -> float | None:
    """A number in [0, 1] given as text, or None; anything else is the user's one-line error."""
    if value is None:
        return None
    try:
        p = float(value)
    except ValueError:
        p = None
    if p is None or not 0.0 <= p <= 1.0:
        raise UserError(f"{flag}: expected a probability in [0, 1], found {value!r}")
    return p


def _view_values(options: dict) -> dict:
    """``options`` with the text of ``view_options``' flags parsed (``--augment-option``, ``--erase``,
    ``--mix-option``)."""
    return {**options, "augment_options": _option_list(options["augment_options"], "--augment-option"),
            "erase": _probability("--erase", options["erase"]),
            "mix_options": _option_list(options["mix_options"], "--mix-option")}


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdcache")
def cli() -> None:
    """kdcache: cache frozen teachers' logits once, distill students from the cache.

    \b
    Typical flow:
      kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet
      kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss ce --out models/ce.pt
      kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train --views 1 --out caches/train/ce.zarr
      kdcache verify caches/train/ce.zarr
      kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet --student mlp --out models/kd.pt
      kdcache evaluate models/kd.pt --manifest data_manifests/synthetic.parquet --split test
    """


# --- manifest --------------------------------------------------------------
cli.add_command(manifest_group)   # kdcache manifest build|check (pipeline.cli_manifest)
cli.add_command(store_group)      # kdcache store copy (pipeline.cli_store)


# --- train-teacher / evaluate ----------------------------------------------
@cli.command("train-teacher")
@click.option("--manifest", required=True, type=LocalPath(dir_okay=False, path_type=str), help="Manifest (.parquet).")
@click.option("--arch", required=True, metavar="ARCH", cls=ListsNames, names=MODELS.names, help="Model name.")
@click.option("--arch-option", "arch_options", multiple=True, metavar="KEY=VALUE", default=(), show_default=True,
              help="A size option of the arch (repeatable): mlp hidden=64, depth=3; cnn width=16.")
@click.option("--weights", type=LocalPath(dir_okay=False, path_type=str), default=config_default(TeacherConfig, "weights"),
              help="Fine-tune: start from these weights (a kdcache checkpoint or state_dict; every key and shape must match).")
@click.option("--loss", type=RegistryChoice(TEACHER_LOSSES.names), default=config_default(TeacherConfig, "loss"), show_default=True,
              help="ce: cross-entropy; mse: mean squared error of softmax vs one-hot.")
@click.option("--out", required=True, type=LocalPath(dir_okay=False, path_type=str),
              help="Checkpoint to write (rewritten atomically after every epoch).")
@training_options(TeacherConfig)
def train_teacher_command(arch_options: tuple[str, ...], **options) -> None:
    """Train a teacher with cross-entropy or MSE on the train split of a manifest.

    SGD with momentum, cosine learning rate per step, epoch e on augmentation view e + 1;
    a checkpoint (with optimizer state) is written after every epoch.

    \b
    Examples:
      kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss mse --out models/mse.pt --weight-decay 5e-3
      kdcache train-teacher --manifest data_manifests/cifar100.parquet --arch resnet56 --loss ce --epochs 240 --lr 0.05 --workers 4 --out models/r56.pt
      kdcache train-teacher --manifest data_manifests/fashion.parquet --arch cnn --arch-option width=16 --out models/cnn16.pt   # a smaller peer
      kdcache train-teacher ... --weights models/r56.pt --lr 0.01 --epochs 20 --out models/r56_ft.pt   # fine-tune
      kdcache train-teacher ... --out models/r56.pt --resume models/r56.pt      # after an interruption
    """
    with training_warning_last():
        metrics = train_teacher(TeacherConfig(arch_options=parse_options(arch_options, flag="--arch-option"), **options))
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    shown = {k: v for k, v in metrics.items() if k.startswith(("train_", "val_"))}
    _wrote(f"wrote {options['out']} ({metrics.get('epoch', 0)} epochs): "
           + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())), metrics)


@cli.command("evaluate")
@click.argument("checkpoint", type=LocalPath(dir_okay=False, path_type=str))
@click.option("--manifest", required=True, type=LocalPath(dir_okay=False, path_type=str), help="Manifest (.parquet).")
@click.option("--split", default=config_default(EvaluateConfig, "split"), show_default=True,
              help="Split to score (view 0, the evaluation transform).")
@click.option("--out", type=LocalPath(dir_okay=False, path_type=str), default=None, help="Also write the metrics as JSON.")
@click.option("--batch-size", type=int, default=config_default(EvaluateConfig, "batch_size"), show_default=True)
@click.option("--workers", type=int, default=config_default(EvaluateConfig, "workers"), show_default=True,
              help="DataLoader workers decoding images.")
@click.option("--device", default=config_default(EvaluateConfig, "device"), show_default=True,
              help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--strict/--no-strict", default=config_default(EvaluateConfig, "strict"), show_default=True,
              help="Refuse a checkpoint trained on another manifest (otherwise: warn).")
def evaluate_command(checkpoint: str, manifest: str, out: str | None, **options) -> None:
    """Score a checkpoint on a split: top-1/top-5 accuracy and cross-entropy; on synthetic data
    also MSE and CE to the exact Bayes posterior, agreement with it, and its accuracy (the ceiling).

    \b
    Example:
      kdcache evaluate models/mse.pt --manifest data_manifests/synthetic.parquet --split test --out metrics/mse_test.json
    """
    cfg = EvaluateConfig(**options)
    if out:
        check_distinct({"--out": out}, {"CHECKPOINT": checkpoint, "--manifest": manifest})
        check_writable(out, what="--out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cfg.score(checkpoint, manifest)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    split = cfg.split
    percent = {"top1", "top5", "bayes_agree", "bayes_top1"}
    click.echo(f"{checkpoint} on {split} ({result['n']} samples)")
    for key in ("top1", "top5", "ce", "bayes_top1", "bayes_agree", "bayes_mse", "bayes_ce"):
        if key in result:
            value = f"{100 * result[key]:.2f} %" if key in percent else f"{result[key]:.5f}"
            click.echo(f"  {key:<12} {value:>10}")
    if out:
        write_json(out, result)


# --- cache / verify / plan -------------------------------------------------
@cli.command("cache", cls=GreedyCommand)
@click.option("--teacher", cls=Greedy, required=True,
              help="A kdcache checkpoint; an arch name with --weights (kdcache's, any torchvision classification "
                   "model, timm:NAME); or module:function of your code returning an nn.Module. Several (the flag "
                   "repeated, or several after it): all cached in one pass over the views.")
@click.option("--weights", cls=Greedy, type=LocalPath(dir_okay=False, path_type=str),
              help="Weights of an arch or module:function teacher: a state_dict or .safetensors file (read as data "
                   "only). Several teachers: one --weights per --teacher, in the same order.")
@click.option("--manifest", required=True, type=LocalPath(dir_okay=False, path_type=str), help="Manifest (.parquet).")
@click.option("--split", default=config_default(CacheConfig, "split"), show_default=True, help="Split to cache.")
@click.option("--views", type=int, default=config_default(CacheConfig, "views"), show_default=True,
              help="Number of views V (view 0 = eval transform).")
@click.option("--out", cls=Greedy, type=StorePath(path_type=str),
              help="Store to write (a .zarr directory, or a bucket URL s3://bucket/prefix/t.zarr): one per --teacher, in order.")
@click.option("--out-dir", type=StorePath(file_okay=False, path_type=str), default=None,
              help="Instead of --out: write each teacher's store as DIR/<teacher file stem>.zarr.")
@click.option("--dtype", type=RegistryChoice(codecs.dtypes), default=config_default(CacheConfig, "dtype"), show_default=True,
              help="Dtype of the stored logits; int8: dense logits quantized per row (entropy, p_gt are always "
                   "exact float32).")
@click.option("--storage", type=RegistryChoice(codecs.CODECS.names), default=config_default(CacheConfig, "storage"), show_default=True,
              help="dense logits [V,N,C]; top-k values/indices + logsumexp; sampled: class ids and counts of k draws "
                   "from the teacher's softmax (an unbiased KD estimate at --temperature).")
@click.option("--k", type=int, default=config_default(CacheConfig, "k"),
              help="Classes kept per sample (--storage topk) or drawn per sample (--storage sampled).")
@click.option("--temperature", type=float, default=config_default(CacheConfig, "temperature"),
              help="--storage sampled: draw from softmax(logits / T) (default T = 1); distill with the same T.")
@click.option("--rows-per-block", type=int, default=config_default(CacheConfig, "rows_per_block"),
              help=f"Rows per block (= chunk, the unit of work and resume); default {DEFAULT_ROWS_PER_BLOCK}, less for huge C.")
@click.option("--micro-batch", type=int, default=config_default(CacheConfig, "micro_batch"), show_default=True,
              help="Teacher batch size inside a block.")
@click.option("--shard", default=config_default(CacheConfig, "shard"),
              help="i/n: compute every n-th block starting at i (SLURM array jobs).")
@click.option("--scheduler", default=config_default(CacheConfig, "scheduler"),
              help="Address of a running dask scheduler: one task per block.")
@click.option("--local-workers", type=int, default=config_default(CacheConfig, "local_workers"),
              help="Start a dask LocalCluster of N worker processes.")
@click.option("--ship-inputs/--no-ship-inputs", default=config_default(CacheConfig, "ship_inputs"),
              help="Send the teachers' checkpoints and manifests with the dask tasks (default with --scheduler: "
                   "workers need only the stores and the data); --no-ship-inputs: they read the caller's paths.")
@click.option("--worker-data-root", default=config_default(CacheConfig, "worker_data_root"),
              help="Where the --scheduler's workers find the manifest's data (default: its absolute root here).")
@click.option("--overwrite", is_flag=True, default=config_default(CacheConfig, "overwrite"), help="Delete an existing store first.")
@click.option("--device", default=config_default(CacheConfig, "device"), show_default=True,
              help="auto (cuda with bf16 autocast if present), cpu, cuda:0 ...")
@click.option("--threads", type=int, default=config_default(CacheConfig, "threads"),
              help="Torch CPU threads per process; keep it the same across jobs for bit-identical stores.")
@click.option("--workers", type=int, default=config_default(CacheConfig, "workers"), show_default=True,
              help="DataLoader workers decoding images.")
@click.option("--views-seed", type=int, default=config_default(CacheConfig, "views_seed"), show_default=True,
              help="Seed of the random views.")
@view_options(CacheConfig)
@click.option("--name", cls=Greedy,
              help="Teacher name recorded in the store (default: the checkpoint's or weights file's stem). Several "
                   "teachers: one --name per --teacher, in the same order.")
@click.option("--progress/--no-progress", default=config_default(CacheConfig, "progress"), show_default=True,
              help="Progress bar (rows/s) on stderr.")
def cache_command(teacher: tuple[str, ...], out: tuple[str, ...], out_dir: str | None, weights: tuple[str, ...],
                  name: tuple[str, ...], **options) -> None:
    """Run frozen teachers over every sample and view of a split; write each one's targets to a Zarr store.

    Several teachers are cached in one pass: each view of each image is decoded and augmented
    once. Resumable: rerun the same command after an interruption and only missing blocks are
    computed. Reopening a store with another teacher, manifest, views or storage is refused.

    \b
    Examples:
      kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train --views 2 --out caches/train/ce.zarr
      kdcache cache --teacher models/ce.pt models/mse.pt --out-dir caches/train ...   # caches/train/ce.zarr, mse.zarr
      kdcache cache --teacher a.pt --teacher b.pt --out caches/a.zarr --out caches/b.zarr ...
      kdcache cache --teacher resnet18 --weights weights/r18.pt ...      # an arch name + a state_dict
      kdcache cache --teacher my_models:build_teacher ...                # your code (--weights optional)
      kdcache cache --teacher resnet18 timm:resnet10t --weights r18.pt r10t.safetensors --name r18 r10t --out-dir caches/train ...
      kdcache cache ... --storage topk --k 20
      kdcache cache ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
      kdcache cache ... --local-workers 4
      kdcache cache ... --scheduler tcp://head:8786 --out s3://bucket/caches/train/ce.zarr   # workers: the bucket + data
      kdcache cache ... --views 16 --augment randaugment --augment-option n=2,m=9 --erase 0.25
      kdcache cache ... --views 32 --augment trivialaugment
      kdcache cache ... --views 16 --mix mixup,cutmix --mix-option mixup_alpha=0.8,cutmix_alpha=1.0,switch_prob=0.5
    """
    configs = one_pass_configs(teacher, out=out, out_dir=out_dir, weights=weights, names=name,
                               **_view_values(options))
    files = {**{f"--teacher ({t})": t for t in teacher if Path(t).is_file()},
             **{f"--weights ({w})": w for w in weights}}
    check_distinct({f"--out ({cfg.out})": cfg.out for cfg in configs}, {"--manifest": configs[0].manifest, **files})
    results = [cache_teacher(configs[0])] if len(configs) == 1 else cache_teachers(configs)
    for cfg, result in zip(configs, results):
        if result.complete:
            stats = result.stats or {}
            click.echo(f"{cfg.out}: complete ({result.computed} blocks computed by this run); accuracy "
                       f"{stats.get('accuracy')}, mean entropy {stats.get('mean_entropy')}, mean p_gt "
                       f"{stats.get('mean_p_gt')}")
        else:
            click.echo(f"{cfg.out}: {result.computed} blocks computed by this run, {result.missing} still missing "
                       "(other shards); the last job to finish marks the store complete")


@cli.command("verify")
@click.argument("stores", nargs=-1, required=True, type=StorePath(path_type=str))
@click.option("--sample-rows", type=int, default=4096, show_default=True,
              help="Rows whose entropy, p_gt, pred are recomputed from the stored logits (0: none).")
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Compare every chunk with its CRC-32 (--no-checksums: faster, misses changed bytes).")
@click.option("--teacher", default=None,
              help="Also run this teacher again (a checkpoint, ARCH with --weights, module:function) on --rows "
                   "(view, row) pairs rebuilt from the store's manifest and views, and compare with the stored targets.")
@click.option("--weights", type=LocalPath(dir_okay=False, path_type=str), default=None,
              help="Weights of an arch or module:function --teacher.")
@click.option("--rows", type=int, default=None,
              help=f"(view, row) pairs the --teacher spot-check recomputes (default {DEFAULT_PAIRS}).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pairs the spot-check draws.")
@click.option("--device", default="auto", show_default=True, help="Device of the --teacher spot-check: auto, cpu, cuda:0 ...")
def verify_command(stores: tuple[str, ...], sample_rows: int, checksums: bool, teacher: str | None,
                   weights: str | None, rows: int | None, seed: int, device: str) -> None:
    """Check cache stores: attrs, shapes, markers, chunks, checksums, NaN/Inf, recomputed targets.

    With --teacher, a store that passes is also spot-checked: the teacher runs again on
    --rows (view, row) pairs drawn by --seed over its views (view 0 included) and blocks,
    rebuilt from the manifest and view spec the store records, and each stored logit,
    entropy, p_gt and pred is compared within the store's rounding; one line per store
    gives the largest logit difference and the top-1 agreement, or MISMATCH and the first
    bad view and row. It finds a changed data file, library or augmentation, or a store
    cached by another teacher.

    Exit status 1 when any store is incomplete, inconsistent or mismatched.

    \b
    Examples:
      kdcache verify caches/train/ce.zarr caches/train/mse.zarr
      kdcache verify --sample-rows 0 --no-checksums caches/train/ce.zarr     # markers, files, NaN only
      kdcache verify caches/train/ce.zarr --teacher models/teachers/ce.pt --rows 256
      kdcache verify caches/train/r18.zarr --teacher resnet18 --weights weights/r18.pt --rows 64 --seed 1
    """
    if sample_rows < 0:
        raise UserError(f"--sample-rows: expected an integer >= 0 (0: no recomputation), found {sample_rows}")
    source = None
    if teacher is None:
        if rows is not None or weights is not None:
            raise UserError(f"{'--rows' if rows is not None else '--weights'}: expected only with --teacher, found no --teacher")
    else:
        if rows is not None and rows < 1:
            raise UserError(f"--rows: expected an integer >= 1 ((view, row) pairs to recompute), found {rows}")
        source = teacher_source(teacher, weights)
        if source.weights_file is not None and not Path(source.weights_file).is_file():
            raise UserError(f"--teacher {teacher}: expected a checkpoint file, found none at {source.weights_file}")
    failed = 0
    for store in stores:
        report = verify_store(store, sample_rows=sample_rows, checksums=checksums)
        click.echo(str(report))
        failed += not report.ok
        if source is not None and report.ok:
            result = spot_check(store, source, rows=DEFAULT_PAIRS if rows is None else rows, seed=seed, device=device)
            click.echo(result.line)
            failed += not result.ok
    if failed:
        raise click.exceptions.Exit(1)


@cli.command("plan")
@click.option("--num-samples", type=int, default=None, help="N (or take it from --manifest/--split).")
@click.option("--num-classes", type=int, default=None, help="C (or take it from --manifest).")
@click.option("--manifest", type=LocalPath(dir_okay=False, path_type=str), default=None, help="Manifest giving N and C.")
@click.option("--split", default=config_default(CacheConfig, "split"), show_default=True, help="Split of --manifest.")
@click.option("--views", type=int, default=config_default(CacheConfig, "views"), show_default=True, help="Views V per sample.")
@click.option("--num-teachers", type=int, default=1, show_default=True, help="Number of stores (one per teacher).")
@click.option("--dtype", type=RegistryChoice(codecs.dtypes), default=config_default(CacheConfig, "dtype"), show_default=True)
@click.option("--storage", type=RegistryChoice(codecs.CODECS.names), default=config_default(CacheConfig, "storage"), show_default=True)
@click.option("--k", type=int, default=None, help="Classes kept (--storage topk) or drawn (--storage sampled).")
@click.option("--rows-per-block", type=int, default=None, help=f"As for `kdcache cache` (default {DEFAULT_ROWS_PER_BLOCK}, less for huge C).")
@click.option("--mixed", is_flag=True, default=False,
              help="Views mixed with `kdcache cache --mix`: count the partner and lambda arrays (12 bytes per sample-view).")
def plan_command(num_samples: int | None, num_classes: int | None, manifest: str | None, split: str, views: int,
                 num_teachers: int, dtype: str, storage: str, k: int | None, rows_per_block: int | None,
                 mixed: bool) -> None:
    """Bytes a cache will take on disk, per array and in total, before anything runs.

    \b
    Examples:
      kdcache plan --num-samples 1281167 --num-classes 1000 --views 4 --num-teachers 3
      kdcache plan --manifest data_manifests/imagenet100.parquet --split train --storage topk --k 20
      kdcache plan --num-samples 1281167 --num-classes 1000 --dtype int8
      kdcache plan --num-samples 1281167 --num-classes 1000 --storage sampled --k 12
      kdcache plan --num-samples 1281167 --num-classes 1000 --views 16 --mixed
    """
    if manifest:
        m = load_manifest(manifest)
        num_samples = num_samples or len(m.split(split).sample_id)
        num_classes = num_classes or m.num_classes
    if not num_samples or not num_classes:
        raise UserError("plan: expected --num-samples and --num-classes, or --manifest, found neither")
    layout = Layout(num_samples=num_samples, num_classes=num_classes, num_views=views, kind=storage, k=k,
                    dtype=dtype, rows_per_block=rows_per_block, mixed=mixed)
    sizes = plan_bytes(layout, teachers=num_teachers)
    on_disk = sum(sizes[name] for name in layout.payload_arrays()) / (num_teachers * num_samples * views)
    click.echo(f"{num_teachers} store(s): N={num_samples} C={num_classes} V={views} {layout.codec.describe()}, "
               f"{layout.num_blocks} blocks of {layout.rows_per_block} rows")
    for name, nbytes in sizes.items():
        click.echo(f"  {name:<14} {human_bytes(nbytes):>12}  ({nbytes} bytes)")
    click.echo(f"  logit payload: {layout.payload_bytes_per_row():.1f} bytes per sample-view "
               f"({', '.join(layout.payload_arrays())}; {on_disk:.1f} on disk with the padded last block)")


# --- distill ---------------------------------------------------------------
@cli.command("distill", cls=GreedyCommand)
@click.option("--method", required=True, type=RegistryChoice(METHODS.names), help="Distillation method (docs/methods.md).")
@click.option("--mentors", cls=Greedy, default=config_default(DistillConfig, "mentors"), type=StorePath(path_type=str),
              help="Cache stores, teacher first (several after one flag, or the flag repeated).")
@click.option("--manifest", required=True, type=LocalPath(dir_okay=False, path_type=str), help="Manifest (.parquet).")
@click.option("--student", required=True, metavar="ARCH", cls=ListsNames, names=MODELS.names, help="Student arch.")
@click.option("--student-b", metavar="ARCH", default=config_default(DistillConfig, "student_b"),
              help="Second student's arch, one of the --student names (dual, dml); saved as OUT with suffix _b.")
@click.option("--student-option", "student_options", multiple=True, metavar="KEY=VALUE", default=(), show_default=True,
              help="A size option of the student's arch (repeatable): mlp hidden=64, depth=3; cnn width=16.")
@click.option("--student-b-option", "student_b_options", multiple=True, metavar="KEY=VALUE", default=(), show_default=True,
              help="Same for the second student.")
@click.option("--out", required=True, type=LocalPath(dir_okay=False, path_type=str),
              help="Student checkpoint (rewritten atomically after every epoch).")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A method option (repeatable), e.g. T=4, tau=12, round_ranks=2, reference_code=true.")
@click.option("--online", is_flag=True, default=config_default(DistillConfig, "online"),
              help="Run the --teachers live instead of reading a cache.")
@click.option("--teachers", cls=Greedy, default=config_default(DistillConfig, "teachers"), metavar="TEACHER",
              help="With --online: teachers, teacher first (several after one flag, or the flag repeated), each as "
                   "kdcache cache --teacher takes it: a checkpoint, an arch name or timm:NAME with --teacher-weights, "
                   "or module:function.")
@click.option("--teacher-weights", cls=Greedy, default=config_default(DistillConfig, "teacher_weights"),
              type=LocalPath(dir_okay=False, path_type=str),
              help="With --online: one weights file per --teachers, in the same order (as kdcache cache --weights).")
@click.option("--input-size", type=int, default=config_default(DistillConfig, "input_size"),
              help="Side of the students' input images: the teachers' crops and flips, resized to it (default: the "
                   "cache's own size; a 224 px teacher's cache, a 160 px student).")
@click.option("--input-mean", type=Numbers(), default=config_default(DistillConfig, "input_mean"),
              help="The students' normalization mean per channel, e.g. 0.5,0.5,0.5 (default: the cache's views').")
@click.option("--input-std", type=Numbers(), default=config_default(DistillConfig, "input_std"),
              help="The students' normalization std per channel (default: the cache's views').")
@training_options(DistillConfig)
@click.option("--views", type=int, default=config_default(DistillConfig, "views"),
              help="Views V without a cache (default 1): epoch e uses view e mod V. With a cache: taken from it.")
@click.option("--view-schedule", metavar="cycle|random", default=config_default(DistillConfig, "view_schedule"),
              show_default=True,
              help="cycle: epoch e replays view e mod V; random: each row a view drawn per epoch from --seed "
                   "(0..V-1 equally likely; the cache in memory), so V >= epochs gives fresh views most epochs.")
@click.option("--train-split", default=config_default(DistillConfig, "train_split"),
              help="Split to train on (default: the stores' split, else train).")
@click.option("--init", type=LocalPath(dir_okay=False, path_type=str), default=config_default(DistillConfig, "init"),
              help="Start student A from these weights (a checkpoint or state_dict).")
@click.option("--init-b", type=LocalPath(dir_okay=False, path_type=str), default=config_default(DistillConfig, "init_b"),
              help="Same for student B.")
@click.option("--cache-mode", type=click.Choice(CACHE_MODES), default=config_default(DistillConfig, "cache_mode"),
              show_default=True,
              help="Read the cache into memory or stream it by blocks (auto: memory when it fits the budget).")
@click.option("--memory-budget-mb", type=int, default=config_default(DistillConfig, "memory_budget_mb"),
              help="Memory for the cache per process (default: a quarter of RAM shared by the local ranks).")
@click.option("--mentor-stats", type=LocalPath(dir_okay=False, path_type=str),
              default=config_default(DistillConfig, "mentor_stats"),
              help="CSV of per-mentor stats per epoch (classroom: rank, active, temperature); "
                   "default OUT stem + _mentors.csv.")
@view_options(DistillConfig, without_mentors=True)
def distill_command(option_pairs: tuple[str, ...], student_options: tuple[str, ...],
                    student_b_options: tuple[str, ...], **options) -> None:
    """Train a student from cached teacher targets (or live teachers with --online).

    Epoch e replays view e mod V of the cache (or, with --view-schedule random, each row a view
    drawn per epoch), so the student sees the pixels its teachers saw.
    SGD with momentum and a cosine schedule; a checkpoint (with the train state) after every
    epoch. Under torchrun each rank takes its slice of every batch (DDP).

    \b
    Examples:
      # single teacher
      kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet --student mlp --out models/kd.pt --option T=4
      # a smaller student: size options of its arch
      kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet --student mlp --student-option hidden=32 --student-option depth=1 --out models/kd_small.pt
      # several teachers (weighted by their confidence)
      kdcache distill --method ca-wkd --mentors caches/train/r56.zarr caches/train/r110.zarr --manifest data_manifests/cifar100.parquet --student mobilenet_v2 --out models/cawkd.pt
      # classroom: teacher first, then peers; mentor ranks/temperatures per epoch in models/room_mentors.csv
      kdcache distill --method classroom --mentors caches/train/vgg13.zarr caches/train/r20.zarr caches/train/r8.zarr --manifest data_manifests/cifar100.parquet --student mobilenet_v2 --option tau=12 --out models/room.pt
      # dual students of two archs, separate optimizers: models/dual.pt and models/dual_b.pt
      kdcache distill --method dual --mentors caches/train/r50.zarr --manifest data_manifests/imagenet100.parquet --student resnet18 --student-b mobilenet_v2 --workers 8 --out models/dual.pt
      # online: live teachers, no cache (the same training, for checks or without a cache)
      kdcache distill --method kd --online --teachers models/ce.pt --manifest data_manifests/synthetic.parquet --student mlp --out models/kd_online.pt
      kdcache distill --method kd --online --teachers resnet18 --teacher-weights r18.pt --manifest data_manifests/imagenet100.parquet --student mobilenet_v2 --out models/kd_r18.pt
      # a 160 px student from the cache of a 224 px teacher: the same crops, resized
      kdcache distill --method kd --mentors caches/train/r50.zarr --manifest data_manifests/imagenet100.parquet --student resnet18 --input-size 160 --out models/kd160.pt
      # several GPUs; resume after an interruption
      torchrun --nproc_per_node 4 -m pipeline.cli distill --method kd --mentors caches/train/r56.zarr ... --out models/kd.pt
      kdcache distill ... --out models/kd.pt --resume models/kd.pt
      # the live teacher on 16 RandAugmented views, the ones `kdcache cache --views 16 --augment randaugment` stores
      kdcache distill --method kd --online --teachers models/ce.pt --manifest data_manifests/fashion-mnist.parquet --student cnn --views 16 --augment randaugment --out models/kd_ra.pt
      # a cache of 64 views: a random view per image and epoch
      kdcache distill --method kd --mentors caches/train/r56_v64.zarr --manifest data_manifests/cifar100.parquet --student resnet20 --view-schedule random --out models/kd_random.pt
    """
    config = DistillConfig(options=parse_options(option_pairs),
                           student_options=parse_options(student_options, flag="--student-option"),
                           student_b_options=parse_options(student_b_options, flag="--student-b-option"),
                           **_view_values(options))
    with training_warning_last():
        metrics = distill(config)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    shown = {k: v for k, v in metrics.items() if k == "train_loss" or k.startswith(("train_top1", "val_top1"))}
    paths = " and ".join(str(p) for p in student_paths(config.out, 2 if config.student_b else 1))
    _wrote(f"wrote {paths} ({metrics.get('epoch', 0)} epochs): "
           + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())), metrics)


@contextlib.contextmanager
def training_warning_last() -> Iterator[None]:
    """Hold back ``TrainingWarning`` (a run that did not learn): the command prints it as its last line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        yield


def _wrote(line: str, metrics: dict) -> None:
    """The run's last line: what it wrote, or, when it did not learn, that warning after it."""
    click.echo(line)
    if metrics.get("warning"):
        click.echo(f"warning: {metrics['warning']}", err=True)


# --- inspect ---------------------------------------------------------------
@cli.command("inspect")
@click.argument("stores", nargs=-1, required=True, type=StorePath())
@click.option("--out", type=LocalPath(file_okay=False), default=None,
              help="Folder for report.html (tables, figures, galleries of the samples to look at), galleries/*.png, "
                   "summary.json, per_class.csv, entropy_hist.csv and plots (with matplotlib).")
@click.option("--bins", type=int, default=20, show_default=True, help="Bins of the entropy and confidence histograms.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON instead of the table.")
@click.option("--samples", type=LocalPath(dir_okay=False), default=None,
              help="Parquet file: one row per sample and view with each teacher's pred, p_gt and entropy, "
                   "the source and label, and how much the teachers disagree.")
@click.option("--view", type=int, default=0, show_default=True,
              help="The cached view the galleries rank and show (0: the plain evaluation view; the only one "
                   "of stores of mixed views).")
@click.option("--top", type=int, default=16, show_default=True, help="Samples per gallery.")
@click.option("--per-class", type=int, default=4, show_default=True,
              help="Samples per class and ranking in the per-class galleries (0: none).")
@click.option("--label-issues", is_flag=True,
              help="Rank label issues with cleanlab (extra [labels]) on the teachers' probabilities: a gallery in "
                   "report.html and a rank column in --samples. A hint: teachers trained on the split are overconfident.")
@click.option("--label-issue-probs", default="mean", show_default=True,
              help="mean: one ranking on the probabilities averaged over the teachers; each: one per teacher.")
def inspect_command(stores: tuple[str, ...], out: str | None, bins: int, as_json: bool, samples: str | None,
                    view: int, top: int, per_class: int, label_issues: bool, label_issue_probs: str) -> None:
    """How uncertain are cached teachers: accuracy, entropy, confidence weight, p_gt, calibration.

    With several stores of the same split it also prints how often the teachers
    agree, the oracle accuracy and how often each is the most confident in the truth. With --out,
    report.html shows the samples to look at: the most uncertain, those the teachers disagree on,
    and those whose label every teacher contradicts, overall and per class.

    \b
    Examples:
      kdcache inspect caches/train/ce.zarr
      kdcache inspect caches/train/ce.zarr caches/train/mse.zarr --out reports/inspect
      kdcache inspect caches/train/ce.zarr caches/train/mse.zarr --samples reports/samples.parquet
      kdcache inspect caches/train/ce.zarr --out reports/inspect --label-issues --top 32
    """
    check_ranking_options(view=view, top=top, per_class=per_class)
    if label_issue_probs not in LABEL_ISSUE_MODES:
        raise UserError(f"--label-issue-probs: expected one of {', '.join(LABEL_ISSUE_MODES)}, "
                        f"found {label_issue_probs!r}")
    if label_issues and not (out or samples):
        raise UserError("--label-issues: expected --out DIR (a gallery) or --samples FILE (a rank column) to write to")
    check_distinct({"--out": out, "--samples": samples}, {f"STORES ({store})": store for store in stores})
    report = inspect_stores(list(stores), bins=bins)
    check_ranking_options(view=view, top=top, per_class=per_class, num_views=report["stores"][0]["num_views"],
                          mixed=any(s.get("mixed") for s in report["stores"]))
    click.echo(report_json(report).rstrip("\n") if as_json else format_report(report))
    names = [str(s["teacher"]) for s in report["stores"]]
    issues = label_issue_ranks(list(stores), teachers=names, view=view, how=label_issue_probs) if label_issues else None
    if out:
        ranked = rank_samples(list(stores), teachers=names, view=view, top=top, per_class=per_class)
        for path in write_report(report, out) + write_page(report, list(stores), out=out, ranked=ranked,
                                                           label_issues=issues):
            click.echo(f"wrote {path}", err=True)
    if samples:
        extra = {("label_issue_rank" if name == "mean" else f"{name}_label_issue_rank"): rank
                 for name, rank in (issues or {}).items()}
        rows = write_samples(list(stores), samples, extra=extra, extra_view=view)
        click.echo(f"wrote {samples} ({rows} rows)", err=True)


def main() -> None:
    cli(prog_name="kdcache")


if __name__ == "__main__":
    sys.exit(main())
