"""Several teachers in one run (``--teachers``): the list read from YAML or the command line, each member as the
settings of a one-teacher run (``member_config``), the mixture weights, and the rules a list must keep.

A member is a mapping with a ``name`` and one of ``model``, ``server`` or ``cache`` (a cache may name its
``model`` beside it, which then only identifies the cache's teacher, as ``teacher_model`` does beside
``teacher_cache``), plus that teacher's own options (``MEMBER_OPTIONS``). Options a member leaves out take the
run's value of the one-teacher option (e.g. ``teacher_top_k``), so that each member is chosen, checked and built
exactly as a one-teacher run with those settings would be (teacher/choice.py).
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import yaml

from .errors import ConfigError
from .runtime.layout import CACHE_MANIFEST as MANIFEST

MEMBER_OPTIONS = {  # a member's key -> (config section, the one-teacher option it sets)
    "model": ("model", "teacher_model"),
    "dtype": ("model", "teacher_dtype"),
    "quantization": ("model", "teacher_quantization"),
    "chat_template": ("model", "teacher_chat_template"),
    "cross_tokenizer": ("training", "cross_tokenizer"),
    "cache": ("training", "teacher_cache"),
    "server": ("training", "teacher_server"),
    "server_model": ("training", "teacher_server_model"),
    "server_api_key_env": ("training", "teacher_server_api_key_env"),
    "server_timeout": ("training", "teacher_server_timeout"),
    "server_retries": ("training", "teacher_server_retries"),
    "top_k": ("training", "teacher_top_k"),
}
SOURCE_KEYS = ("model", "server", "cache")
# One-teacher options that describe a single teacher's tokenizer: with --teachers each member gives its own.
PER_MEMBER_ONLY = ("teacher_model", "teacher_cache", "teacher_server", "teacher_chat_template", "cross_tokenizer")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name is part of logged keys (kd_loss/NAME)


def parse_teachers(value) -> list[dict]:
    """``--teachers`` as a list of members: a YAML list (or its JSON text), or ``NAME=PATH_OR_URL,...``."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        text = value.strip()
        value = yaml.safe_load(text) if text.startswith("[") else [_compact(part) for part in text.split(",")
                                                                   if part.strip()]
    if not isinstance(value, list) or not all(isinstance(member, dict) for member in value):
        raise ConfigError("teachers must be a list of mappings (name, and one of model, server or cache) or "
                          "NAME=PATH_OR_URL,NAME=PATH_OR_URL")
    members = [_member(index, member) for index, member in enumerate(value)]
    names = [member["name"] for member in members]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"teachers: the name {repeated[0]!r} is given twice; each teacher needs its own name")
    return members


def _compact(part: str) -> dict:
    """``NAME=SOURCE``: a URL is served, a cache-teacher directory is a cache, anything else a model."""
    name, equals, source = (piece.strip() for piece in part.partition("="))
    if not equals or not name or not source:
        raise ConfigError(f"teachers: {part.strip()!r} is not NAME=PATH_OR_URL (e.g. code=/models/coder,"
                          "chat=http://127.0.0.1:8000/v1)")
    if source.startswith(("http://", "https://")):
        return {"name": name, "server": source}
    return {"name": name, "cache" if (Path(source).expanduser() / MANIFEST).is_file() else "model": source}


def _member(index: int, member: dict) -> dict:
    name = member.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"teachers[{index}]: name must be letters, digits, '_', '.' or '-' (it names the teacher's "
                          f"logged figures), got {name!r}")
    unknown = sorted(set(member) - {"name", *MEMBER_OPTIONS})
    if unknown:
        raise ConfigError(f"teacher {name}: unknown key {unknown[0]!r}; a teacher takes name, "
                          f"{', '.join(MEMBER_OPTIONS)}")
    given = [key for key in SOURCE_KEYS if member.get(key)]
    if not given or ("server" in given and len(given) > 1):  # a cache may name its model beside it
        raise ConfigError(f"teacher {name}: give one of model, server or cache (a cache may name its model beside "
                          f"it), got {', '.join(given) or 'none'}")
    return {key: value for key, value in member.items() if value is not None}


def absolute_members(members: list[dict]) -> list[dict]:
    """The members with their local paths absolute (a run's config.yaml names them wherever it is read)."""
    return [{key: _absolute(value) if key in ("model", "cache", "chat_template") else value
             for key, value in member.items()} for member in members]


def teacher_members(config) -> list[dict]:
    """The run's members (--teachers), read once and kept in their parsed form."""
    return parse_teachers(config.training.teachers)


def member_config(config, member: dict):
    """The settings of a one-teacher run with this member as its teacher (the run's other options unchanged)."""
    view = copy.copy(config)
    view.model, view.training = copy.copy(config.model), copy.copy(config.training)
    view.training.teachers, view.training.teacher_weights, view.training.teacher_offload = None, None, False
    for key, (section, option) in MEMBER_OPTIONS.items():
        if key in member:
            value = member[key]
            setattr(getattr(view, section), option, value)
        elif option in PER_MEMBER_ONLY:
            setattr(getattr(view, section), option, None)
    if "dtype" not in member:
        view.model.teacher_dtype = config.model.dtype
    return view


def one_teacher_config(config, name: str | None, command: str):
    """The settings of one teacher of --teachers as a one-teacher run (``command`` --teacher NAME: cache-teacher),
    or ``config`` itself when the run has no --teachers."""
    member = named_member(teacher_members(config), name, command,
                          "the run gives no --teachers (its one teacher is the run's)")
    return config if member is None else member_config(config, member)


def named_member(members: list[dict], name: str | None, command: str, without_list: str) -> dict | None:
    """The member that ``command --teacher NAME`` names (cache-teacher, eval, generate); None for a run without
    --teachers and no NAME. ``without_list``: the refusal's words for a NAME given to a run without --teachers."""
    names = [member["name"] for member in members]
    if not members:
        if name is not None:
            raise ConfigError(f"{command} --teacher {name}: {without_list}")
        return None
    if name is None:
        raise ConfigError(f"{command}: the run has several teachers ({', '.join(names)}): choose one with --teacher NAME")
    if name not in names:
        raise ConfigError(f"{command} --teacher {name}: not one of the run's teachers ({', '.join(names)})")
    return members[names.index(name)]


def _absolute(value):
    expanded = os.path.expanduser(value) if isinstance(value, str) else value
    return os.path.abspath(expanded) if isinstance(value, str) and os.path.exists(expanded) else value


def teacher_weights(config) -> list[float]:
    """The mixture's weights in --teachers order (equal when not given)."""
    count = len(teacher_members(config))
    if config.training.teacher_weights in (None, ""):
        return [1.0 / count] * count if count else []
    try:
        weights = [float(part) for part in str(config.training.teacher_weights).split(",")]
    except ValueError:
        raise ConfigError(f"teacher_weights must be numbers separated by commas, e.g. 0.7,0.3, got "
                          f"{config.training.teacher_weights!r}") from None
    return weights


def teachers_checks(config, validate) -> list[tuple[bool, str]]:
    """--teachers: the run's own rules, then each member's as a one-teacher run (``validate``), named by member."""
    training = config.training
    members = teacher_members(config)
    if not members:
        given = [name for name in ("teacher_weights",) if getattr(training, name) not in (None, "")]
        return [(not given, "teacher_weights is for --teachers with teacher_routing mixture"),
                (not training.teacher_offload, "teacher_offload is for --teachers (several loaded teachers)")]
    single = [name for name in PER_MEMBER_ONLY
              if getattr(config.model if name in ("teacher_model", "teacher_chat_template") else training, name)]
    weights = teacher_weights(config)
    checks = [(not single, f"{', '.join(single)} and teachers both given: with --teachers give each teacher's "
                           "model, server or cache (and cross_tokenizer, chat_template) in its entry"),
              (config.data.task == "causal_lm", "teachers is for --task causal_lm"),
              (training.teacher_routing == "mixture" or not config.data.packing,
               "teacher_routing column scores each row by its own teacher and needs padded rows: leave --packing off, "
               "or use teacher_routing mixture"),
              (training.teacher_routing == "mixture" or training.teacher_weights in (None, ""),
               "teacher_weights is for teacher_routing mixture (column routing takes each row's teacher from the "
               "data)"),
              (len(weights) == len(members), f"teacher_weights gives {len(weights)} weights for {len(members)} "
                                             f"teachers ({', '.join(m['name'] for m in members)}): give one each"),
              (all(weight >= 0 and math.isfinite(weight) for weight in weights),
               f"teacher_weights must be >= 0, got {training.teacher_weights}"),
              (math.isclose(sum(weights), 1.0, abs_tol=1e-6), f"teacher_weights must sum to 1, got "
                                                             f"{training.teacher_weights} (sum {sum(weights):g})"),
              (training.loss_impl != "liger", "loss_impl liger reads one loaded teacher: with --teachers use loss_impl "
                                              "fused or naive"),
              (not training.teacher_offload or all(m.get("quantization", "none") == "none" for m in members),
               "teacher_offload moves teachers between CPU and GPU, which a bitsandbytes-quantized teacher cannot "
               "do: leave it off, or load those teachers unquantized")]
    for member in members:
        try:
            validate(member_config(config, member))
        except ConfigError as error:
            checks.append((False, f"teacher {member['name']}: {error}"))
    return checks
