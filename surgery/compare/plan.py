"""Everything a comparison needs before its first run, checked: the data read and split, the labels and
the metric, the model and its tokenizer, every method tried on the model, the device, the output folder,
the runs in order (seed by seed, so a comparison cut short holds whole seeds), and the header that says
all of it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .settings import Settings

__all__ = ["Comparison", "prepare"]


@dataclass
class Comparison:
    settings: Settings
    backbone: object
    methods: list
    metric: object
    device: str
    store: object
    parts: list  # per fold: (training dataset, validation dataset, the constant predictor's score)
    plans: list  # every run, in order
    done: dict  # key -> record of the runs already in the output folder
    info: dict  # title, header lines, metric, constant, device ... (results.json's "info")
    started: float = field(default_factory=time.perf_counter)

    @property
    def folds(self) -> int:
        return len(self.parts)


def _split_line(s: Settings, folds, labels, val_source) -> str:
    f = folds[0]
    strat = ", stratified by class" if labels.task == "classification" else ""
    if f.separate:
        text = f"{len(f.train)} training rows; {len(f.validation)} validation rows from {val_source}"
    elif len(folds) > 1:
        text = (f"{len(folds)} folds{strat} (split seed {s.split_seed}): {len(f.train)} training / "
                f"{len(f.validation)} validation rows in the first; a seed's score is the mean over its folds")
    else:
        text = (f"{len(f.train)} training / {len(f.validation)} validation rows ({s.validation_fraction:.0%} held "
                f"out{strat}, split seed {s.split_seed})")
    extra = [f"--train-size {s.train_size}"] if s.train_size else []
    extra += [f"validation capped at {s.max_validation} rows"] if s.max_validation else []
    return text + (f" [{'; '.join(extra)}]" if extra else "")


def _identity(s: Settings, methods, device: str) -> dict:
    from .store import identity_of_path

    ident = s.fingerprint()
    ident["methods"] = [m.label for m in methods]
    ident["model"] = identity_of_path(s.model, content=False)
    ident["data"] = identity_of_path(s.data, content=True)
    ident["validation"] = identity_of_path(s.validation, content=True) if s.validation else None
    ident["device"] = device
    return ident


def _header(s: Settings, backbone, metric, labels, folds, data_info, constant: float, steps: int, evals: int,
            device_text: str) -> list[tuple[str, str]]:
    cols = data_info["columns"]
    return [
        ("model", f"{backbone.given} ({backbone.class_name}" + "".join(f"; {n}" for n in backbone.notes) + ")"),
        ("data", f"{data_info['data']} ({data_info['format']}; text column {cols['text']!r}"
                 + (f", pair column {cols['pair']!r}" if cols["pair"] else "") + f", label column {cols['label']!r})"),
        ("task", f"{labels.task} ({labels.reason})" + (f"; {labels.num_labels} classes" if labels.names else "")),
        ("split", _split_line(s, folds, labels, data_info["validation"])),
        ("training", f"{steps} steps ({s.epochs:g} epoch{'s' * (s.epochs != 1)}"
                     + (f", at most {s.max_steps} steps" if s.max_steps else "") + f"), batch {s.batch_size}, "
                     f"AdamW lr {s.lr:g}, weight decay {s.weight_decay:g}, {s.warmup:.0%} warm-up then linear decay, "
                     f"gradient norm clipped at 1, at most {s.max_length} tokens; {evals} evaluations per run"),
        ("seeds", f"{' '.join(map(str, range(s.seeds)))} (per seed the same split, head initialisation and data "
                  "order for every method)"),
        ("device", device_text),
        ("metric", f"{metric.title} on the validation rows ({'higher' if metric.higher_is_better else 'lower'} is "
                   f"better); the constant predictor ({metric.constant_name}) scores {constant:.4g}"),
    ]


def prepare(s: Settings) -> Comparison:
    """Read, check and plan everything; nothing trains yet.

    Raises:
        CompareError: any bad input (data, labels, split, model, tokenizer, methods, output folder).
    """
    from .labels import encode_labels
    from .machine import choose_device, describe_device
    from .methods import DEFAULT_METHODS, parse_methods
    from .metrics import pick_metric
    from .models import check_methods, load_backbone
    from .reading import read_tables
    from .running import RunPlan, eval_steps, total_steps
    from .splits import make_folds
    from .store import Store

    parse_methods(s.methods or DEFAULT_METHODS)  # a spec that does not parse fails before anything is read
    train_t, val_t, data_info = read_tables(s)
    labels = encode_labels(train_t.labels, val_t.labels if val_t is not None else None, s.task, train_t.source)
    metric = pick_metric(s.metric, labels.task)
    folds = make_folds(len(train_t), labels, s, n_validation=len(val_t) if val_t is not None else None)
    backbone = load_backbone(s.model, labels, s.head)
    methods = check_methods(backbone, s.methods)
    device = choose_device(s.device)
    store = Store(s.out, _identity(s, methods, device), Settings.defaults())
    done = store.open(overwrite=s.overwrite)

    full = backbone.encode(train_t.texts, train_t.pairs, labels.train, s.max_length)
    val_full = backbone.encode(val_t.texts, val_t.pairs, labels.validation, s.max_length) if val_t else None
    parts = []
    for f in folds:
        val_labels = [(labels.validation if f.separate else labels.train)[i] for i in f.validation]
        parts.append((full.select(f.train), (val_full if f.separate else full).select(f.validation),
                      metric.constant([labels.train[i] for i in f.train], val_labels)))
    constant = sum(p[2] for p in parts) / len(parts)
    plans = []
    for seed in range(s.seeds):
        for k, (train, _, _) in enumerate(parts):
            steps = total_steps(len(train), s)
            plans += [RunPlan(m, seed, k, steps, eval_steps(steps, s.evals)) for m in methods]
    info = {
        "title": f"{Path(backbone.given.rstrip('/')).name or backbone.given} on {Path(s.data).name}: "
                 f"{labels.task}, {s.seeds} seed{'s' * (s.seeds != 1)}",
        "metric": metric.name, "metric_title": metric.title, "higher_is_better": metric.higher_is_better,
        "constant": constant, "device": describe_device(device), "last_token": backbone.last_token,
        "head": backbone.head, "command": s.command,
    }
    info["header"] = _header(s, backbone, metric, labels, folds, data_info, constant, plans[0].steps,
                             len(plans[0].evals), info["device"])
    return Comparison(s, backbone, methods, metric, device, store, parts, plans, done, info)
