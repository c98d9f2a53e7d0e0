"""``convert``: a surgered checkpoint to a plain one.

Converting drops the ``*.mixout_target`` tensors, restores ``config.json`` from the change
record and copies every other byte as it is: a Mixout layer keeps its weight under the
original key, so the plain weights *are* the surgered weights minus the targets, bit for
bit. Safetensors data is copied file to file by the kernel, so memory stays flat.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import configs, interrupts
from ..record import CONFIG_KEY, TARGET_SUFFIX, Record, no_plain_form
from .atomic import check_dst, close_quietly, fsync_dir, signal_pending, signals_blocked, write_json
from .common import (CONFIG_NAME, SAFE_INDEX, CheckpointError, CheckpointWarning, fmt_bytes, is_target_key, lexists,
                     os_error, printable)
from .layout import Checkpoint, _Items, _Source, dst_name, open_checkpoint, output_metadata
from .leftovers import Leftover, find_leftovers, remove_leftovers
from .modes import copy_mode, data_mode, dir_mode, umask
from .safetensors_file import Progress, copy_range, end_file, write_safetensors
from .swap import Staging
from .trust import SourceTree, changed, identity

__all__ = ["restore_config", "Plan", "plan_convert", "execute", "convert"]


def restore_config(config: dict[str, Any], record: Record | None = None) -> tuple[dict[str, Any], list[tuple]]:
    """A copy of a saved ``config.json`` dict restored by :func:`surgery.configs.restore_config`
    (the record's changes to the saved model's own config undone, the ``surgery`` key removed).
    Returns ``(config, [(path, saved_value, restored_value)])``; the input is not modified."""
    out = copy.deepcopy(config)
    return out, configs.restore_config(out, record)


def _refuse_layered(src: Path, record: Record | None, ck: Checkpoint) -> None:
    """A layer-weighted MSD head (its record entry, or its weights without a record) has no plain form
    (torch-free: the record and the tensor names only)."""
    why = no_plain_form(record, "surgery convert")
    if why:
        raise CheckpointError(src, why)
    key = "layer_pool.layer_weights"
    if any(k == key or k.endswith("." + key) for s in ck.sources for k in s.entries):
        raise CheckpointError(src, f"holds {key!r}, the learned layer weights of a layer-weighted MSD head, which a "
                                   "plain checkpoint cannot hold (plain transformers would drop them); keep the "
                                   "surgered checkpoint and load it into a surgered pretrained model")


@dataclass
class Plan:
    """What :func:`convert` does (``--dry-run`` prints :meth:`describe`)."""

    ck: Checkpoint
    dst: Path
    record: Record | None
    record_source: str | None
    files: list[tuple[_Source, str, list[str], list[str]]]  # (source, dst name, kept keys, dropped keys)
    config: dict[str, Any] | None  # restored config.json (directories)
    config_changes: list[tuple]
    index: dict[str, Any] | None  # DST index (sharded)
    warnings: list[str]
    leftovers: list[Leftover] = field(default_factory=list)  # temporaries of earlier runs beside DST
    notes: list[str] = field(default_factory=list)  # what could not be finished once DST was in place

    @property
    def kept_bytes(self) -> int:
        return sum(src.entries[k].nbytes for src, _, kept, _ in self.files for k in kept)

    @property
    def dropped(self) -> list[str]:
        return [k for _, _, _, d in self.files for k in d]

    @property
    def dropped_bytes(self) -> int:
        return sum(src.entries[k].nbytes for src, _, _, d in self.files for k in d)

    @property
    def surgered(self) -> bool:
        return self.record is not None or bool(self.dropped)

    def describe(self) -> str:
        ck = self.ck
        lines = [f"convert {ck.path} ({ck.describe()})", f"     -> {self.dst}"]
        if self.record is not None:
            lines.append(f"  record: {self.record_source}")
        elif self.dropped:
            lines.append("  record: none found (Mixout targets present; dropout values on disk are kept as saved)")
        else:
            lines.append("  no surgery found: DST is a plain copy")
        n_kept = sum(len(k) for _, _, k, _ in self.files)
        lines.append(f"  weights: drop {len(self.dropped)} Mixout targets ({fmt_bytes(self.dropped_bytes)}), "
                     f"write {n_kept} tensors ({fmt_bytes(self.kept_bytes)}) to {len(self.files)} file"
                     f"{'s' if len(self.files) > 1 else ''}")
        for src, name, kept, dropped in self.files:
            lines.append(f"    {src.path.name} -> {name}: {len(kept)} tensors kept, {len(dropped)} targets dropped")
        if self.index is not None:
            lines.append(f"  index: {SAFE_INDEX} ({len(self.index['weight_map'])} keys)")
        if self.config is not None:
            lines.append(f"  {CONFIG_NAME}: " + ("; ".join(f"{p} {a} -> {b}" for p, a, b in self.config_changes)
                                                 or "no dropout fields to restore")
                         + ("; 'surgery' record removed" if self.ck.config and CONFIG_KEY in self.ck.config else ""))
        if ck.copies:
            lines.append(f"  copy: {', '.join(ck.copies)}")
        for rel, why in ck.skipped:
            lines.append(f"  skip: {rel} ({why})")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(map(printable, lines))  # every line escaped: names in it come from SRC


def plan_convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                 require_surgery: bool = False, follow_external_symlinks: bool = False,
                 allow_external_hard_links: bool = False) -> Plan:
    """Open and validate SRC and work out what :func:`convert` will write to DST.

    Raises:
        CheckpointError: see :func:`open_checkpoint`; DST exists (without ``overwrite``)
            or overlaps SRC; a state-dict input with a DST not ending in ``.safetensors``;
            no surgery in SRC with ``require_surgery``; a file of SRC that is a symbolic link
            leading outside it (unless ``follow_external_symlinks``) or a hard link with names
            outside it (unless ``allow_external_hard_links``).
    """
    src, dst = Path(src), Path(dst)
    try:
        if lexists(src):
            check_dst(src, dst, overwrite)
        ck = open_checkpoint(src, follow_external_symlinks=follow_external_symlinks,
                             allow_external_hard_links=allow_external_hard_links)
    except OSError as e:  # an I/O error while looking at SRC or DST: one error naming the file, in words
        name, problem = os_error(e, dst=src)
        raise CheckpointError(name, problem) from None
    try:
        if ck.is_dir and dst.suffix == ".safetensors":
            raise CheckpointError(dst, "DST for a directory SRC is a directory (same layout as SRC); give a "
                                       "directory path, not a .safetensors file")
        if not ck.is_dir and dst.suffix != ".safetensors":
            raise CheckpointError(dst, "DST must be a .safetensors file for a file SRC"
                                  + (" (.bin/.pt input is written as safetensors)" if ck.fmt == "pickle" else ""))
        record, where = ck.record()
        _refuse_layered(src, record, ck)
        warnings = list(ck.warnings)
        files = []
        for s in ck.sources:
            kept = [k for k in s.entries if not is_target_key(k)]
            dropped = [k for k in s.entries if is_target_key(k)]
            if kept or not ck.sharded:
                files.append((s, dst_name(s.path.name) if ck.is_dir else dst.name, kept, dropped))
            else:
                files.append((s, "", [], dropped))
                warnings.append(f"{s.path.name} holds only Mixout targets; no shard is written for it")
        dropped = {k for _, _, _, d in files for k in d}
        if record is not None:
            missing = [k for k in record.target_keys if k not in dropped]
            unlisted = sorted(dropped - set(record.target_keys))
            if missing:
                warnings.append(f"the record lists {len(missing)} Mixout layers whose target is not in the weights "
                                f"(e.g. {missing[0]!r})")
            if unlisted:
                warnings.append(f"{len(unlisted)} Mixout targets are not in the record (e.g. {unlisted[0]!r}); "
                                "dropped all the same")
        if require_surgery and record is None and not dropped:
            raise CheckpointError(src, "holds no surgery (no change record in config.json or safetensors metadata, "
                                       f"no *.{TARGET_SUFFIX} tensors); nothing to convert")
        config, changes = None, []
        if ck.config is not None:
            config, changes = restore_config(ck.config, record)
            if record is None and dropped:
                warnings.append(f"{CONFIG_NAME} holds no surgery record: its dropout values are kept as saved")
        index = None
        if ck.sharded:
            wm = {k: name for s, name, kept, _ in files for k in kept}
            meta = dict(ck.index.get("metadata") or {})
            meta["total_size"] = sum(s.entries[k].nbytes for s, _, kept, _ in files for k in kept)
            index = {"metadata": meta, "weight_map": dict(sorted(wm.items()))}
        leftovers = find_leftovers(dst)
        warnings += [f.warning() for f in leftovers]
        return Plan(ck, dst, record, where, [f for f in files if f[1]] + [f for f in files if not f[1]],
                    config, changes, index, warnings, leftovers)
    except BaseException:
        ck.close()
        raise


def execute(plan: Plan, *, overwrite: bool = False, progress: Progress | None = None,
            state: Any = None) -> list[str]:
    """Write ``plan.dst`` (through a temporary beside it, put in place at the end, see
    :mod:`surgery.checkpoint.swap`). SRC is only read.

    Files and folders get SRC's permission bits as ``cp`` without ``-p`` would (see
    :mod:`surgery.checkpoint.modes`: under the umask, never setuid, setgid, sticky, and no
    execute bit on the files convert writes itself). Putting DST in place runs with
    SIGINT/SIGTERM held back; a signal that came before it (or, with ``state``, the CLI's
    :data:`surgery.interrupts.STATE`, one that library code swallowed) aborts instead, and
    ``state.committed`` is set once DST is in place.

    Returns:
        notes on what could not be finished after DST was in place (the old copy not removed,
        a folder not synced), each naming what is left; DST is the new checkpoint either way.

    Raises:
        CheckpointError: a read or write problem; DST is as it was (absent, or the old one),
            no temporary and no parent folder this call created is left, or the message
            names what could not be removed.
        KeyboardInterrupt: interrupted; likewise.
    """
    with Staging(plan.dst, overwrite=overwrite) as st:
        not_removed = remove_leftovers(plan.leftovers)
        _write(plan, st.tmp, progress, state)
        plan.ck.tree.check_unchanged()  # nothing of SRC was replaced or rewritten while DST was written
        with signals_blocked():
            if signal_pending() or (state is not None and state.interrupted):
                if state is not None:
                    state.interrupted = True  # the held-back signal, delivered after the cleanup, is then ignored
                raise KeyboardInterrupt
            st.place()
            if state is not None:
                state.committed = True
    return [f"{f.path} (a temporary of an earlier run) could not be removed" for f in not_removed] + st.notes


def _write(plan: Plan, tmp: Path, progress: Progress | None, state: Any) -> None:
    ck = plan.ck
    mask = umask()  # modes: see modes.py (never setuid/setgid/sticky, nothing beyond the umask)
    if not ck.is_dir:
        s, _, kept, _ = plan.files[0]
        write_safetensors(tmp, _Items(s, kept), output_metadata(s), _hooked(progress), mode=data_mode(s.mode, mask))
        s.check_unchanged()  # the file was not rewritten while it was copied
        return
    os.mkdir(tmp, 0o700)
    made = {Path(".")}
    for s, name, kept, _ in plan.files:
        if name:
            write_safetensors(tmp / name, _Items(s, kept), output_metadata(s), _hooked(progress),
                              mode=data_mode(s.mode, mask))
        s.check_unchanged()
        s.close()  # one shard's descriptor (or mapped pickle) at a time from here on
        if state is not None and state.interrupted:  # a KeyboardInterrupt some library swallowed
            raise KeyboardInterrupt
    if plan.index is not None:
        write_json(tmp / SAFE_INDEX, plan.index, mode=data_mode(ck.index_mode, mask))
    if plan.config is not None:
        write_json(tmp / CONFIG_NAME, plan.config, mode=data_mode(ck.config_mode, mask))
    for rel in ck.copies:
        out = tmp / rel
        for d in reversed(Path(rel).parents[:-1]):
            if d not in made:
                os.mkdir(tmp / d, 0o700)
                made.add(d)
        copy_file(ck.tree, ck.path / rel, out, mask=mask)
    for rel in sorted({str(d) for r in ck.copies for d in Path(r).parents[:-1]}, key=len, reverse=True):
        os.chmod(tmp / rel, dir_mode(os.stat(ck.path / rel).st_mode, mask))
        fsync_dir(tmp / rel)
    os.chmod(tmp, dir_mode(ck.mode, mask))  # the owner can always replace or delete DST
    fsync_dir(tmp)


def _hooked(progress: Progress | None) -> Progress | None:
    """``progress``, plus the ``write`` test hook after the first bytes (signal tests only)."""
    if "write" not in os.environ.get("SURGERY_TEST_HOOK", ""):
        return progress
    fired = []

    def f(n: int) -> None:
        if progress:
            progress(n)
        if not fired:
            fired.append(1)
            interrupts.test_hook("write")

    return f


def copy_file(tree: SourceTree, src: Path, dst: Path, *, mask: int | None = None) -> None:
    """Copy one regular file of SRC (checked by ``tree``) to the new file ``dst``, keeping
    its times and its permission bits as ``cp`` would (:func:`modes.copy_mode`: under the
    umask ``mask``, never setuid/setgid/sticky); fsync'ed. A read problem names SRC's file,
    a write problem DST's."""
    fd_in = tree.open(src)
    try:
        st = os.fstat(fd_in)
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            try:
                copy_range(fd_in, src, 0, st.st_size, fd_out, None)  # holes of a sparse file stay holes
                end_file(fd_out)
            except OSError as e:
                if e.filename is None and _is_read_error(fd_in):
                    raise CheckpointError(src, f"cannot read ({e.strerror or e})") from None
                raise
            if identity(os.fstat(fd_in)) != identity(st) or os.fstat(fd_out).st_size != st.st_size:
                raise changed(src)
            os.fchmod(fd_out, copy_mode(st.st_mode, mask))
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        close_quietly(fd_in)


def _is_read_error(fd_in: int) -> bool:
    try:
        os.pread(fd_in, 1, 0)
    except OSError:
        return True
    return False


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            require_surgery: bool = False, dry_run: bool = False, progress: Progress | None = None,
            follow_external_symlinks: bool = False, allow_external_hard_links: bool = False) -> Plan:
    """Convert a surgered checkpoint to a plain one (see the module docstring).

    Every tensor written equals, bit for bit and in its dtype, what ``surgery.revert``
    gives in process; Mixout targets are dropped, ``config.json`` is restored, other files
    (tokenizer, generation config ...) are copied, Trainer training state is not.

    Returns:
        the :class:`Plan` that was carried out (or only made, with ``dry_run``); its ``notes``
        say what could not be finished after DST was in place (each also a
        :class:`CheckpointWarning`).

    Raises:
        CheckpointError: bad SRC or DST (see :func:`plan_convert`) or a failed write.
    """
    plan = plan_convert(src, dst, overwrite=overwrite, require_surgery=require_surgery,
                        follow_external_symlinks=follow_external_symlinks,
                        allow_external_hard_links=allow_external_hard_links)
    try:
        if not dry_run:
            plan.notes = execute(plan, overwrite=overwrite, progress=progress)
    finally:
        plan.ck.close()
    for note in plan.notes:
        warnings.warn(f"{plan.dst}: {note}", CheckpointWarning, stacklevel=2)
    return plan
