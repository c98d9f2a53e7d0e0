"""The Hub upload at every save (``args.push_to_hub``) with the plain model at the repo's root.

This is the one place that depends on transformers' Trainer internals: ``Trainer`` has no public
hook between "checkpoint saved" and "upload the output folder", so :func:`push_from_checkpoint`
follows ``Trainer._push_from_checkpoint`` (transformers 4.4x-5.x): it writes the plain model into
``output_dir`` (transformers would copy the checkpoint's surgered files there) and uploads it, and
uploads the checkpoint itself as saved, surgered, so training resumes from it. Its test
(tests/training/test_hub_upload.py) runs against a local fake Hub and fails when transformers changes the
names used here.
"""

from __future__ import annotations

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils.hub import PushInProgress

__all__ = ["push_from_checkpoint"]


def _hub_api():
    """The HfApi transformers uploads with (its tagged shared instance when it has one)."""
    try:
        from transformers.utils.hub import hf_api
        return hf_api()
    except ImportError:  # transformers < 5
        from huggingface_hub import HfApi
        return HfApi()


def push_from_checkpoint(trainer, checkpoint_folder: str) -> None:
    """What ``Trainer._push_from_checkpoint`` does, with the plain model at the repo's root."""
    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
        return
    if not args.hub_always_push and trainer.push_in_progress is not None \
            and not trainer.push_in_progress.is_done():
        return
    if hasattr(trainer.callback_handler, "on_push_begin"):
        trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    trainer._write_plain(args.output_dir)
    when = (f"step {trainer.state.global_step}" if args.save_strategy == "steps"
            else f"epoch {int(trainer.state.epoch)}")
    message = f"Training in progress, {when}"
    api = _hub_api()
    common = dict(repo_id=trainer.hub_model_id, token=args.hub_token, run_as_future=True,
                  revision=getattr(args, "hub_revision", None))
    jobs = [api.upload_folder(folder_path=args.output_dir, commit_message=message,
                              ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"], **common)]
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        in_repo = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT \
            else os.path.basename(os.path.normpath(checkpoint_folder))
        jobs.append(api.upload_folder(folder_path=checkpoint_folder, path_in_repo=in_repo,
                                      commit_message=message + ", checkpoint", **common))
    if trainer.push_in_progress is None or trainer.push_in_progress.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        trainer.push_in_progress.jobs.extend(jobs)
