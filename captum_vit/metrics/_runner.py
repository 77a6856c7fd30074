"""One evaluation runner: methods x metrics over a stream of batches, resumable, sharded under torchrun.

`evaluate` streams any map-style ``Dataset`` (through a ``DataLoader``
that loads only this process's batches, with workers), a ``DataLoader`` or
any iterable of batches; memory is bounded by the batch, not the dataset.
Each finished batch of each method is written to its checkpoint folder (with
the run's identity, see `._checkpoint`) and its per-image values to a
JSON-lines file; under ``torchrun`` rank ``r`` of ``W`` computes batches
``b`` with ``b % W == r`` and every rank returns the merge by batch index,
equal to a single process's result (compare at equal thread counts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import module_of
from ._checkpoint import CheckpointDirectory, method_identity, model_fingerprint, tensor_digest
from ._distributed import distributed_rank_and_size, from_every_rank
from ._evidence import bootstrap_interval, cascading_randomization
from ._registry import ExplainedBatch, MetricSpec, higher_is_better, resolve_metrics

Box = Tuple[int, int, int, int]
Method = Union[str, Callable[[Tensor, Tensor], Tensor]]


@dataclass
class EvaluationBatch:
    """One batch as the runner reads it: ``images`` ``(N, C, H, W)``, optional ``labels`` ``(N,)``, ``boxes``
    (per image a list of ``(x0, y0, x1, y1)``), ``indices`` ``(N,)`` dataset positions, and ``extra`` tensors."""

    images: Tensor
    labels: Optional[Tensor] = None
    boxes: Optional[List[List[Box]]] = None
    indices: Optional[Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)


_IMAGE_KEYS = ("images", "image", "pixel_values", "img")
_LABEL_KEYS = ("labels", "label", "target", "targets")


def as_batch(raw: Any) -> EvaluationBatch:
    """A loader's batch as `EvaluationBatch`: a tensor, ``(images, labels[, boxes])`` or a dict."""
    if isinstance(raw, EvaluationBatch):
        return raw
    if isinstance(raw, Tensor):
        return EvaluationBatch(raw)
    if isinstance(raw, dict):
        images = next((raw[k] for k in _IMAGE_KEYS if k in raw), None)
        labels = next((raw[k] for k in _LABEL_KEYS if k in raw), None)
        used = {*_IMAGE_KEYS, *_LABEL_KEYS, "boxes", "indices"}
        batch = EvaluationBatch(images, _as_labels(labels), raw.get("boxes"), raw.get("indices"),
                                {k: v for k, v in raw.items() if k not in used})
    elif isinstance(raw, (tuple, list)) and raw:
        batch = EvaluationBatch(raw[0], _as_labels(raw[1]) if len(raw) > 1 else None, raw[2] if len(raw) > 2 else None)
    else:
        raise TypeError(f"a batch must be images, (images, labels[, boxes]) or a dict; got {type(raw).__name__}.")
    if not isinstance(batch.images, Tensor):
        raise TypeError(f"a batch's images must be a tensor; got {type(batch.images).__name__} "
                        "(give the dataset a transform that makes tensors, e.g. the model's preprocessing).")
    return batch


def _as_labels(labels: Any) -> Optional[Tensor]:
    if labels is None or isinstance(labels, Tensor):
        return labels
    return torch.as_tensor(labels)


class DatasetItems(torch.utils.data.Dataset):
    """Items of any map-style dataset as ``{"images", "labels", "boxes", "indices"}``, images made tensors.

    Reads torchvision-style ``(image, label)`` pairs, Hugging Face ``datasets``
    rows (``{"image": PIL, "label": int}``) and dicts; a PIL image goes through
    ``transform`` (the model's preprocessing) into a ``(C, H, W)`` tensor.
    """

    def __init__(self, dataset: Any, transform: Optional[Callable[[Any], Tensor]] = None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, dict):
            image = next((item[k] for k in _IMAGE_KEYS if k in item), None)
            label = next((item[k] for k in _LABEL_KEYS if k in item), None)
            boxes = item.get("boxes")
        elif isinstance(item, (tuple, list)):
            image, label, boxes = item[0], item[1] if len(item) > 1 else None, item[2] if len(item) > 2 else None
        else:
            image, label, boxes = item, None, None
        if not isinstance(image, Tensor):
            if self.transform is None:
                raise TypeError(f"item {index} holds a {type(image).__name__}, not a tensor: pass transform= "
                                "(e.g. the model's preprocessing) to make tensors of it.")
            image = self.transform(image)
            image = image[0] if image.dim() == 4 else image
        return {"images": image, "labels": -1 if label is None else int(label), "boxes": boxes, "indices": index}


def collate_items(items: List[Dict[str, Any]]) -> EvaluationBatch:
    """Stack `DatasetItems` items (a label of -1 means none)."""
    labels = torch.tensor([i["labels"] for i in items])
    boxes = [i["boxes"] for i in items]
    return EvaluationBatch(torch.stack([i["images"] for i in items]), None if (labels < 0).any() else labels,
                           None if any(b is None for b in boxes) else boxes, torch.tensor([i["indices"] for i in items]))


@dataclass
class _Stream:
    """The batches one rank reads: ``(b, raw batch, whether this rank computes it)``, and what is known ahead."""

    batches: Iterator[Tuple[int, Any, bool]]
    num_batches: Optional[int]
    dataset_size: Optional[int]
    batch_size: Optional[int]


def _map_style(data: Any) -> bool:
    """A dataset read by index: a torch ``Dataset`` with a length, or a Hugging Face ``datasets.Dataset``."""
    if isinstance(data, torch.utils.data.IterableDataset):
        return False
    if isinstance(data, torch.utils.data.Dataset):
        return hasattr(data, "__len__")
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _stream(data: Any, batch_size: int, num_workers: int, transform: Any, rank: int, world: int) -> _Stream:
    """This rank's view of ``data``.

    A map-style dataset loads only this rank's batches; a ``DataLoader`` or
    other iterable is read in full by every rank (so it must give the same
    batches in the same order everywhere), which computes only its own.
    """
    if _map_style(data):
        n = len(data)
        starts = list(range(0, n, batch_size))
        mine = [b for b in range(len(starts)) if b % world == rank]
        sampler = [list(range(starts[b], min(starts[b] + batch_size, n))) for b in mine]
        loader = torch.utils.data.DataLoader(DatasetItems(data, transform), batch_sampler=sampler,
                                             num_workers=num_workers, collate_fn=collate_items)
        return _Stream(((b, raw, True) for b, raw in zip(mine, loader)), len(starts), n, batch_size)
    total = len(data) if hasattr(data, "__len__") else None
    dataset = getattr(data, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    return _Stream(((b, raw, b % world == rank) for b, raw in enumerate(data)), total, size,
                   getattr(data, "batch_size", None))


@dataclass
class EvaluationResult:
    """Per-image values of every method and metric field, in dataset order.

    ``values[method][field]`` is ``(N,)``; ``indices`` ``(N,)`` the images'
    dataset positions; ``unsupported[method]`` why a method (or metric) did
    not run; ``stages`` the randomisation stages.
    """

    values: Dict[str, Dict[str, Tensor]]
    indices: Tensor
    unsupported: Dict[str, str] = field(default_factory=dict)
    stages: List[str] = field(default_factory=list)
    #: ``(N,)`` per image: the class explained, the model's prediction, and the label (``-1``: none); ``None``
    #: for results made without them
    targets: Optional[Tensor] = None
    predicted: Optional[Tensor] = None
    labels: Optional[Tensor] = None

    def summary(self, resamples: int = 1000, seed: int = 0) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """``{method: {field: {"mean", "lo", "hi", "n", "higher_is_better"}}}``, 95 % bootstrap intervals."""
        return {m: {k: dict(bootstrap_interval(v, resamples, seed=seed), higher_is_better=higher_is_better(k))
                    for k, v in fields_.items()} for m, fields_ in self.values.items()}

    def records(self) -> Iterator[Dict[str, Any]]:
        """One dict per image and method: ``{"index", "target", "predicted", "label", "method", field: value,
        ...}`` (the class entries where the result has them)."""
        classes = {k: v for k, v in (("target", self.targets), ("predicted", self.predicted), ("label", self.labels))
                   if v is not None}
        for method, fields_ in self.values.items():
            for row in range(len(self.indices)):
                yield {"index": int(self.indices[row]), **{k: int(v[row]) for k, v in classes.items()},
                       "method": method, **{k: float(v[row]) for k, v in fields_.items()}}


@dataclass
class _Run:
    """What every batch of one run shares."""

    forward_func: Any
    methods: Dict[str, Method]
    metrics: List[MetricSpec]
    use_labels: bool
    device: Optional[torch.device]
    seed: int
    options: Dict[str, Any]
    cascade: List[Tuple[str, nn.Module]]
    method_options: Dict[str, Dict[str, Any]]
    checkpoints: Dict[str, Optional[CheckpointDirectory]]
    #: (method, model: 0 the model, i > 0 the i-th randomised copy) -> its explainer, built once per run
    built: Dict[Tuple[str, int], Callable[[Tensor, Tensor], Tensor]] = field(default_factory=dict)

    def build(self, name: str, model_index: int, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        """Method ``name`` on the model (``model_index`` 0) or a randomised copy: the caller's callable, or a
        registry method built once per run (its engine keeps what it learnt, e.g. ViT-ReciproCAM's fast-path
        verdicts); an entry whose maps draw random numbers (`MethodSpec.seeded`) is built per batch with
        ``seed``, so a sharded run equals a single process."""
        from ..methods import REGISTRY, explainer

        method = self.methods[name]
        if not isinstance(method, str):
            return method
        key = (name, model_index)
        if key in self.built and not REGISTRY[method].seeded:
            return self.built[key]
        forward_func = self.forward_func if model_index == 0 else self.cascade[model_index - 1][1]
        self.built[key] = explainer(method, forward_func, seed=seed, **self.method_options.get(name, {}))
        return self.built[key]


@dataclass(frozen=True)
class EvaluationConfig:
    """How one evaluation runs; `evaluate` takes one (or its fields as keywords, which override it).

    Attributes:
        use_labels: explain the labels instead of the predicted classes.
        batch_size: images per batch for a ``Dataset`` (the unit of work,
            of checkpoints and of sharding).
        num_workers: ``DataLoader`` workers for a ``Dataset``.
        transform: PIL image -> ``(C, H, W)`` tensor, for datasets of pictures.
        checkpoint_dir: each method's finished batches go to
            ``checkpoint_dir/<method>`` (``batch_*.pt`` with a manifest of
            the run); a later call of the same run resumes from them.
        restart: delete those checkpoints first.
        records_dir: per-image values are appended to
            ``records_dir/records.rank<r>.jsonl`` as each batch finishes.
        device: where each batch goes (default: the model's).
        progress: a progress bar with images/s (rank 0).
        seed: seeds the registry methods that draw random numbers (the random
            control) per batch, so a sharded run equals a single process.
        deletion_steps, baseline: deletion/insertion steps and the value of
            removed pixels (metrics ``deletion``, ``insertion``, ``adcc``).
        pointing_margin: pointing within this many pixels of a box.
        identity: extra fields of the run's checkpoint manifest.
        method_options: per registry method, its own options
            (`captum_vit.methods.explainer`'s ``options``, e.g.
            ``{"reciprocam": {"block": -3}}``).
    """

    use_labels: bool = False
    batch_size: int = 32
    num_workers: int = 0
    transform: Optional[Callable[[Any], Tensor]] = None
    checkpoint_dir: Optional[Union[str, Path]] = None
    restart: bool = False
    records_dir: Optional[Union[str, Path]] = None
    device: Optional[Union[torch.device, str]] = None
    progress: bool = True
    seed: int = 0
    deletion_steps: int = 16
    baseline: float = 0.0
    pointing_margin: int = 0
    identity: Optional[Dict[str, Any]] = None
    method_options: Optional[Dict[str, Dict[str, Any]]] = None

    @property
    def metric_options(self) -> Dict[str, Any]:
        """The options the metrics read (`ExplainedBatch.options`)."""
        return dict(deletion_steps=self.deletion_steps, baseline=self.baseline, pointing_margin=self.pointing_margin)

    def with_overrides(self, overrides: Dict[str, Any]) -> "EvaluationConfig":
        """This configuration with ``overrides`` (field name -> value); an unknown name is refused."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"evaluate() got unexpected keyword arguments {', '.join(unknown)}; "
                            f"EvaluationConfig has {', '.join(sorted(names))}.")
        return replace(self, **overrides)


def evaluate(
    forward_func: Any,
    methods: Union[Sequence[str], Dict[str, Method]],
    data: Any,
    metrics: Sequence[str] = ("adcc",),
    config: Optional[EvaluationConfig] = None,
    **overrides: Any,
) -> EvaluationResult:
    """Score each method with each metric on every image of ``data``.

    Args:
        forward_func: the model (or a module around it) mapping ``(B, C, H, W)`` to logits.
        methods: registry names (`captum_vit.methods.METHODS`, each built once
            per run; one that draws random numbers is built per batch with
            ``seed + batch index``), or ``{name: explain}`` with any
            ``explain(inputs, target) -> (B, 1, h, w)`` maps.
        data: a map-style ``Dataset`` (items ``(image, label[, boxes])``,
            torchvision datasets, Hugging Face ``datasets`` rows, dicts; PIL
            images need ``transform``), a ``DataLoader``, or any iterable of
            batches (a tensor, ``(images, labels[, boxes])`` or a dict).
        metrics: names from `captum_vit.metrics.METRICS` (``"insertion"``,
            ``"iou"``, ``"dice"`` select their entry; ``"known_evidence"``
            the known-evidence set).
        config: how the run goes (`EvaluationConfig`; default its defaults).
        overrides: `EvaluationConfig` fields given as keywords (e.g.
            ``batch_size=8``), over ``config``.

    Returns:
        `EvaluationResult`; ``.summary()`` gives means with 95 %
        bootstrap intervals.
    """
    config = (config or EvaluationConfig()).with_overrides(overrides)
    folders = None if config.checkpoint_dir is None else (lambda name: Path(config.checkpoint_dir) / _folder(name))
    return run_evaluation(forward_func, methods, data, metrics, config, checkpoint_folder=folders)


def run_evaluation(
    forward_func: Any,
    methods: Union[Sequence[str], Dict[str, Method]],
    data: Any,
    metrics: Sequence[str],
    config: EvaluationConfig,
    checkpoint_folder: Optional[Callable[[str], Path]] = None,
) -> EvaluationResult:
    """`evaluate`, with each method's checkpoint folder given by ``checkpoint_folder`` (method name -> folder)
    instead of ``config.checkpoint_dir`` (`captum_vit.metrics.evaluate_adcc` keeps its own layout)."""
    specs = resolve_metrics(metrics)
    batch_size = config.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    rank, world = distributed_rank_and_size()
    stream = _stream(data, batch_size, config.num_workers, config.transform, rank, world)
    model = module_of(forward_func)
    device = config.device
    if device is None and isinstance(model, nn.Module):
        device = next(model.parameters()).device
    named = {m: m for m in methods} if not isinstance(methods, dict) else dict(methods)
    cascade = _cascade(model, config.seed) if any("randomized" in s.needs for s in specs) else []
    run = _Run(forward_func, named, specs, config.use_labels, torch.device(device) if device is not None else None,
               config.seed, config.metric_options, cascade, dict(config.method_options or {}), {})
    unsupported = _probe_methods(run)
    run.checkpoints = _checkpoints(run, unsupported, checkpoint_folder, config.restart, stream, config.identity)
    parts = _run_batches(run, stream, rank, config.records_dir, config.progress)
    if world > 1:  # every rank gets every batch, keyed by batch index
        parts = {k: v for part in from_every_rank(parts) for k, v in part.items()}
    return _merged(parts, [m for m in named if m not in unsupported], unsupported, [s for s, _ in cascade])


def _checkpoints(run: _Run, unsupported: Dict[str, str], folder_of: Optional[Callable[[str], Path]], restart: bool,
                 stream: _Stream, identity: Optional[Dict[str, Any]]) -> Dict[str, Optional[CheckpointDirectory]]:
    """One checkpoint folder per method (``None`` entries without ``folder_of``); another run's is refused before
    any work where the batch size is known."""
    base = {"model": model_fingerprint(run.forward_func), "use_labels": bool(run.use_labels), "seed": run.seed,
            "metrics": [s.name for s in run.metrics], "options": run.options, "num_batches": stream.num_batches,
            "dataset_size": stream.dataset_size, "randomization_stages": [s for s, _ in run.cascade]}
    out: Dict[str, Optional[CheckpointDirectory]] = {}
    for name, method in run.methods.items():
        if name in unsupported:
            continue
        if folder_of is None:
            out[name] = None
            continue
        built = run.build(name, 0, run.seed)
        method_id = built.identity if isinstance(method, str) else method_identity(method)  # type: ignore[attr-defined]
        out[name] = CheckpointDirectory(folder_of(name), {**base, "method": method_id, **(identity or {})},
                                        restart=restart)
        out[name].check_manifest(stream.batch_size)  # every rank, before any work, when the batch size is known
    return out


def _folder(method: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in method)


def _cascade(model: Optional[nn.Module], seed: int) -> List[Tuple[str, nn.Module]]:
    """The randomised copies, built once (``depth + 2`` copies of the model)."""
    import copy

    if not isinstance(model, nn.Module):
        raise ValueError("the randomization metric needs forward_func to be the model (a module), to randomise it.")
    return [(stage, copy.deepcopy(randomised)) for stage, randomised in cascading_randomization(model, seed=seed)]


def _probe_methods(run: _Run) -> Dict[str, str]:
    """Methods that refuse the model (said, not dropped silently); named ones must be in the registry."""
    from ..adapters import UnsupportedModelError
    from ..methods import REGISTRY

    unsupported: Dict[str, str] = {}
    for name, method in run.methods.items():
        if isinstance(method, str):
            if method not in REGISTRY:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}.")
            try:
                run.build(name, 0, run.seed)
            except UnsupportedModelError as error:
                unsupported[name] = str(error)
        elif any("randomized" in s.needs for s in run.metrics):
            raise ValueError(f"the randomization metric rebuilds each method on randomised models; {name!r} is a "
                             "callable: give registry names as methods for it.")
    return unsupported


def _run_batches(run: _Run, stream: _Stream, rank: int, records_dir: Optional[Union[str, Path]],
                 progress: bool) -> Dict[Tuple[str, str, int], Tensor]:
    """Every (method, field, batch) value of this rank's batches, computed or loaded."""
    parts: Dict[Tuple[str, str, int], Tensor] = {}
    records = _Records(records_dir, rank)
    world = distributed_rank_and_size()[1]
    total = None if stream.num_batches is None else len(range(rank, stream.num_batches, world))
    bar = tqdm(total=total, desc="evaluate", unit="batch", disable=not progress or rank != 0)
    images_done, start = 0, time.perf_counter()
    for b, raw, mine in stream.batches:
        batch = as_batch(raw)
        if b == 0:  # every rank sees batch 0 of an iterable: all record its size (a rank's own first may be short)
            for folder in run.checkpoints.values():
                if folder is not None:
                    folder.check_manifest(int(batch.images.shape[0]))
        if not mine:
            continue
        if batch.indices is None:
            batch.indices = torch.arange(len(batch.images)) + b * len(batch.images)
        classes = _classes(run, batch)
        for name, values in _score_batch(run, b, batch, classes["target"]).items():
            parts.update({(name, k, b): v for k, v in values.items()})
            records.write(name, batch.indices, values)
        parts[("__indices__", "index", b)] = batch.indices
        parts.update({("__classes__", k, b): v for k, v in classes.items()})
        images_done += len(batch.images)
        bar.update()
        bar.set_postfix(images_per_s=f"{images_done / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    return parts


def _score_batch(run: _Run, b: int, batch: EvaluationBatch, target: Tensor) -> Dict[str, Dict[str, Tensor]]:
    """``{method: {field: (n,)}}`` of one batch (``target``: the classes explained): loaded from its
    checkpoint, or computed and saved."""
    digest = tensor_digest(batch.images, batch.labels if run.use_labels else None)
    out: Dict[str, Dict[str, Tensor]] = {}
    for name, folder in run.checkpoints.items():
        fields_ = [f for s in run.metrics for f in s.output_fields([st for st, _ in run.cascade])]
        saved = folder.load(b, digest, fields_) if folder is not None else None
        if saved is None:
            saved = _compute(run, name, b, batch, target)
            if folder is not None:
                folder.save(b, digest, saved)
        out[name] = saved
    return out


def _classes(run: _Run, batch: EvaluationBatch) -> Dict[str, Tensor]:
    """Per image of the batch: the class explained (the label with ``use_labels``, else the prediction), the
    model's prediction, and the label (-1 where there is none)."""
    from .._utils import forward_logits

    if run.use_labels and batch.labels is None:
        raise ValueError("use_labels=True needs labelled data: (images, labels) batches, or a dataset of "
                         "(image, label) items (CLI: a folder of class subfolders).")
    images = batch.images if run.device is None else batch.images.to(run.device)
    with torch.no_grad():
        predicted = forward_logits(run.forward_func, (images,)).argmax(1).cpu()
    labels = batch.labels.long() if batch.labels is not None else torch.full_like(predicted, -1)
    return {"target": labels if run.use_labels else predicted, "predicted": predicted, "label": labels}


def _check_needs(specs: Sequence[MetricSpec], batch: EvaluationBatch) -> None:
    for spec in specs:
        if "boxes" in spec.needs and batch.boxes is None:
            raise ValueError(f"the {spec.name} metric needs ground-truth boxes: give (image, label, boxes) items, "
                             "EvaluationBatch(boxes=...) or a boxes file (CLI: --boxes).")
        if "evidence" in spec.needs and "pair_images" not in batch.extra:
            raise ValueError(f"the {spec.name} metric reads known-evidence canvases; use evaluate_known_evidence.")
        if "grid" in spec.needs and "grid_target" not in batch.extra:
            raise ValueError(f"the {spec.name} metric reads pointing-game grids: build them with "
                             "captum_vit.metrics.build_pointing_grids and use evaluate_grid_pointing "
                             "(CLI: captum-vit evaluate DATA --metric grid_pointing, on labelled data).")


def _compute(run: _Run, name: str, b: int, batch: EvaluationBatch, target: Tensor) -> Dict[str, Tensor]:
    _check_needs(run.metrics, batch)

    device = run.device
    moved = {k: v.to(device) if isinstance(v, Tensor) and v.dim() == 4 and device is not None else v
             for k, v in batch.extra.items()}
    moved.update({k: v.to(device) for k, v in moved.items() if k.endswith("_target") and device is not None})
    images = batch.images if device is None else batch.images.to(device)
    explain = run.build(name, 0, run.seed + b)
    t = target if device is None else target.to(device)
    randomized = [(stage, run.build(name, i + 1, run.seed + 10_000 * (i + 1) + b))
                  for i, (stage, _) in enumerate(run.cascade)]
    context = ExplainedBatch(images, t, explain, run.forward_func, batch.boxes, moved, randomized, run.options)
    values: Dict[str, Tensor] = {}
    for spec in run.metrics:
        values.update(spec.compute(context))
    # a copy of each (n,) value: a view would keep its whole base (a batch of maps or images) alive for the run
    return {k: (v if v.is_floating_point() else v.float()).detach().cpu().clone() for k, v in values.items()}


class _Records:
    """Per-image values appended to ``records.rank<r>.jsonl`` as each batch finishes."""

    def __init__(self, folder: Optional[Union[str, Path]], rank: int) -> None:
        self.path = None if folder is None else Path(folder) / f"records.rank{rank}.jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, method: str, indices: Tensor, values: Dict[str, Tensor]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            for row, index in enumerate(indices.tolist()):
                record = {"index": int(index), "method": method, **{k: float(v[row]) for k, v in values.items()}}
                f.write(json.dumps(record) + "\n")


def _merged(parts: Dict[Tuple[str, str, int], Tensor], methods: List[str], unsupported: Dict[str, str],
            stages: List[str]) -> EvaluationResult:
    order = sorted({b for _, _, b in parts})
    if not order:
        raise ValueError("the data yielded no batches.")
    fields_: Dict[str, List[str]] = {}
    for method, name, _ in parts:
        if not method.startswith("__") and name not in fields_.setdefault(method, []):
            fields_[method].append(name)
    values = {m: {k: torch.cat([parts[m, k, b] for b in order]) for k in fields_[m]} for m in methods if m in fields_}
    indices = torch.cat([parts["__indices__", "index", b] for b in order])
    classes = {k: torch.cat([parts["__classes__", k, b] for b in order]) for k in ("target", "predicted", "label")}
    return EvaluationResult(values, indices, unsupported, stages, **{
        "targets": classes["target"], "predicted": classes["predicted"], "labels": classes["label"]})
