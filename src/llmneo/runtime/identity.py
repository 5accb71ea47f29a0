"""What makes a run the same run: its resolved options, minus those that are safe to change on resume, plus a
fingerprint of its tokenized training rows. Every checkpoint records it; resuming compares and names each
difference."""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

from ..errors import ConfigError
from .layout import IDENTITY_FILE

# Keys of a --teachers member naming where its server is and how patiently it is asked (as the one served teacher's
# options above): which model it serves is its fingerprint's part.
RESUMABLE_MEMBER_KEYS = frozenset({"server", "server_model", "server_api_key_env", "server_timeout",
                                   "server_retries"})

logger = logging.getLogger(__name__)


# Options that may change when a run is resumed: they decide how the run is watched, saved or fed, not what it
# computes. Everything else must be equal to the checkpoint's.
RESUMABLE_OPTIONS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "report_to", "disable_tqdm",
    "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "eval_accumulation_steps",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_safetensors",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "nonfinite_policy", "max_bad_steps", "kd_chunk_size", "auto_micro_batch_budget_gib",
    # where and how patiently the served teacher is reached: which model it serves is its fingerprint's part
    "teacher_server", "teacher_server_model", "teacher_server_api_key_env", "teacher_server_timeout",
    "teacher_server_retries",
    # where the rollout server is and where the adapter is written for it: which engine samples is rollout_engine
    "rollout_server", "rollout_server_model", "rollout_server_api_key_env", "rollout_server_timeout",
    "rollout_server_retries", "rollout_adapter_dir",
})
# Options that may grow on resume (train for longer), never shrink.
EXTENDABLE_OPTIONS = ("max_steps", "num_train_epochs")
# Options naming paths: a run recorded before paths were stored absolute holds them relative to where it ran.
PATH_OPTIONS = ("student_model", "teacher_model", "dataset", "eval_split", "teacher_cache", "teacher_chat_template")
# Largest change of a served teacher's probe log-probability still read as the same model: a server batches
# requests (and may compute in bf16), so its numbers move in the last digits; another model moves them by more.
PROBE_TOLERANCE = 0.05


def run_identity(config_sections: dict, data: dict, teacher: dict | None = None, models: dict | None = None) -> dict:
    """The identity of a run from its resolved config (config.yaml's sections), its data fingerprint, what its
    teacher signal adds (teacher/signal.py: ``identity``) and the weights it reads and cannot find again in a
    checkpoint (``models``: role -> models/identity.model_identity, e.g. an adapter's frozen base, the teacher)."""
    options = {key: value for section in config_sections.values() for key, value in section.items()}
    flat = {key: value for key, value in options.items() if key not in RESUMABLE_OPTIONS}
    flat.update(_member_options(flat.pop("teachers", None), flat.pop("teacher_weights", None),
                                flat.get("teacher_routing")))
    if options.get("on_policy_fraction"):  # the engines sample with generators of their own: each its own draws
        flat["rollout_engine"] = "vllm" if options.get("rollout_server") else "transformers"
    identity = {"options": flat, "data": data, **({"teacher": teacher} if teacher else {}),
                **({"models": models} if models else {})}
    return json.loads(json.dumps(identity, default=str))


def _member_options(members: list | None, weights: str | None, routing: str | None) -> dict:
    """--teachers as one option per member and key (``teachers/NAME/KEY``), so that a changed teacher is named;
    where a member's server is (and how patiently it is asked) may change, as for the one served teacher."""
    if not members:
        return {"teachers": None, "teacher_weights": weights}
    flat = {f"teachers/{member['name']}/{key}": value for member in members for key, value in member.items()
            if key != "name" and key not in RESUMABLE_MEMBER_KEYS}
    flat["teachers"] = [member["name"] for member in members]
    if routing == "mixture":
        shares = [float(part) for part in weights.split(",")] if weights else [1 / len(members)] * len(members)
        flat.update({f"teachers/{member['name']}/weight": share for member, share in zip(members, shares, strict=True)})
    return flat


def identity_bytes(identity: dict) -> bytes:
    return (json.dumps(identity, indent=1, sort_keys=True) + "\n").encode("utf-8")


def differences(saved: dict, current: dict) -> list[str]:
    """Each option (and the data) that differs between a checkpoint's identity and this run's, as 'name: a -> b'."""
    old, new = saved.get("options", {}), current.get("options", {})
    changed = []
    for name in sorted({*old, *new}):
        before, after = old.get(name), new.get(name)
        if before == after or (name in EXTENDABLE_OPTIONS and _extends(before, after)) or \
                (name in PATH_OPTIONS and _same_paths(before, after)):
            continue
        changed.append(f"{name}: {before!r} -> {after!r}")
    if saved.get("data", {}).get("sha256") != current.get("data", {}).get("sha256"):
        then, now = saved.get("data", {}), current.get("data", {})
        changed.append(f"training data: {then.get('rows')} rows / {then.get('answer_tokens')} answer tokens of "
                       f"{then.get('dataset')} -> {now.get('rows')} rows / {now.get('answer_tokens')} answer tokens of "
                       f"{now.get('dataset')}")
    if not same_teacher(saved.get("teacher", {}), current.get("teacher", {})):
        changed.append(_teacher_change(saved.get("teacher", {}), current.get("teacher", {})))
    return changed + _rewritten_models(saved.get("models", {}), current.get("models", {}))


def _same_paths(before, after) -> bool:
    """Whether two comma-separated path lists name the same paths from here (a relative one read from the current
    folder, where a resume of such a run is started)."""
    if not isinstance(before, str) or not isinstance(after, str):
        return False
    absolute = [[os.path.abspath(os.path.expanduser(part.strip())) for part in value.split(",")] for value in (before, after)]
    return absolute[0] == absolute[1]


def same_probe(saved: dict, current: dict) -> bool:
    """Whether two fingerprints are of one served model: same name, same top ids, log-probabilities within
    ``PROBE_TOLERANCE`` (a server batches requests, so its numbers move in the last digits)."""
    if saved.get("server_model") != current.get("server_model") or len(saved["probe"]) != len(current["probe"]):
        return False
    for before, after in zip(saved["probe"], current["probe"], strict=True):
        if [token for token, _ in before] != [token for token, _ in after]:
            return False
        if any(abs(a - b) > PROBE_TOLERANCE for (_, a), (_, b) in zip(before, after, strict=True)):
            return False
    return True


def same_teacher(saved: dict, current: dict) -> bool:
    """A served teacher's fingerprint is compared within the server's numerical noise; anything else exactly
    (several teachers: member by member)."""
    saved, current = saved or {}, current or {}
    if "teachers" in saved and "teachers" in current:
        return not _changed_members(saved, current) and _without(saved, "teachers") == _without(current, "teachers")
    if "served_teacher" in saved and "served_teacher" in current:
        return same_probe(saved["served_teacher"], current["served_teacher"])
    return saved == current


def _changed_members(saved: dict, current: dict) -> list[str]:
    then, now = saved["teachers"], current["teachers"]
    return [name for name in {**then, **now} if name not in then or name not in now
            or not same_teacher(then[name], now[name])]


def _without(identity: dict, key: str) -> dict:
    return {name: value for name, value in identity.items() if name != key}


def _teacher_change(saved: dict, current: dict) -> str:
    if "teachers" in saved and "teachers" in current:
        changes = [f"teacher {name}: " + _teacher_change(saved["teachers"].get(name, {}), current["teachers"].get(name, {}))
                   for name in _changed_members(saved, current)]
        if _without(saved, "teachers") != _without(current, "teachers"):
            changes.append("which rows name which teacher (the teacher column's values)")
        return "; ".join(changes)
    if "served_teacher" in saved and "served_teacher" in current:
        then, now = saved["served_teacher"]["server_model"], current["served_teacher"]["server_model"]
        return (f"the served teacher {now!r}: its log-probabilities of the probe differ (another model, or other "
                "weights)" if then == now else f"the served teacher: {then!r} -> {now!r}")
    return f"teacher signal: {saved} -> {current}"


def _rewritten_models(saved: dict, current: dict) -> list[str]:
    """Models read from the same path whose weights differ. A changed path is an option difference already, and a
    role one side does not record (an older checkpoint, an unreadable hub id) cannot be compared."""
    changed = []
    for role in sorted(set(saved) & set(current)):
        then, now = saved[role] or {}, current[role] or {}
        if then and now and then.get("path") == now.get("path") and then != now:
            changed.append(f"the {role.replace('/', ' ')} {now['path']}: its weights changed since the checkpoint")
    return changed


def _extends(before, after) -> bool:
    try:
        return before is not None and after is not None and (float(after) >= float(before) or float(after) < 0)
    except (TypeError, ValueError):
        return False


def check_resume(checkpoint: str | Path, current: dict) -> None:
    """Refuse to resume ``checkpoint`` when it belongs to a run with other settings or data."""
    path = Path(checkpoint) / IDENTITY_FILE
    if not path.is_file():
        logger.warning("%s records no run identity (written by an older llm-neo): its settings cannot be checked "
                       "against this run's", checkpoint)
        return
    changed = differences(json.loads(path.read_text(encoding="utf-8")), current)
    if changed:
        raise ConfigError(f"cannot resume {checkpoint}: it belongs to a run with other settings ("
                          + "; ".join(changed) + "). Resume with the run's own settings (only "
                          "logging, evaluation, saving and data-loader options, and max_steps / num_train_epochs "
                          "upward, may change), or start a new run in another --output_dir")
