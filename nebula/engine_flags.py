"""Engine flags: one spelling for each, the ones Nebula reserves, and the ones the API may set.

vLLM parses its flags with argparse, which accepts `--max_model_len` for
`--max-model-len` and `--flag=value` for `--flag value`; a check that
compares spellings is a check that can be walked around. So every list of
engine arguments is normalised first (long flags in kebab case, `=` split off,
short aliases spelled out), and only then checked.

Two levels of trust:

- The catalog file on disk is the operator's: any flag but the reserved ones
  (those Nebula sets itself: address, port, name, key, devices, memory).
- The admin API is the network's: only the flags in `API_FLAGS`, each with a
  value of a known shape. Flags that load or run code (`--trust-remote-code`,
  `--middleware`, `--chat-template`, plugins, paths) are catalog-only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from nebula.errors import InvalidRequest
from nebula.names import has_control, shown

# vLLM's short spellings of long flags.
ALIASES = {
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-dp": "--data-parallel-size",
    "-q": "--quantization",
    "-O": "--compilation-config",
}

# Set by Nebula on every engine; an entry that sets them would fight the placement
# (ports, devices, memory), the catalog's model, or the router's key.
RESERVED = frozenset(
    {
        "--host",
        "--port",
        "--uds",
        "--model",
        "--served-model-name",
        "--api-key",
        "--gpu-memory-utilization",
        "--tensor-parallel-size",
        "--kv-events-config",  # where the engine tells its agent what it caches
    }
)

FLAG_RE = re.compile(r"^--?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NUMBER_RE = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
MAX_ARGS = 64
MAX_ARG_CHARS = 4096

Check = Callable[[str], str | None]  # the value, or None when valid; else a reason


def _int(lo: int, hi: int) -> Check:
    def check(value: str) -> str | None:
        if not re.fullmatch(r"\d{1,12}", value) or not lo <= int(value) <= hi:
            return f"a whole number from {lo} to {hi}"
        return None

    return check


def _float(lo: float, hi: float) -> Check:
    def check(value: str) -> str | None:
        if not NUMBER_RE.match(value) or not lo <= float(value) <= hi:
            return f"a number from {lo:g} to {hi:g}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in options else f"one of {', '.join(options)}"

    return check


SWITCH = None  # a flag that takes no value

# The flags an admin API call may set: sizes, precision, batching and caching knobs
# that change how much an engine holds, never what code it runs or what it reads.
API_FLAGS: dict[str, Check | None] = {
    "--max-model-len": _int(16, 10_000_000),
    "--max-num-seqs": _int(1, 65_536),
    "--max-num-batched-tokens": _int(16, 10_000_000),
    "--dtype": _choice("auto", "half", "float16", "bfloat16", "float", "float32"),
    "--kv-cache-dtype": _choice("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "--block-size": _choice("1", "8", "16", "32", "64", "128"),
    "--swap-space": _float(0, 1024),
    "--cpu-offload-gb": _float(0, 4096),
    "--seed": _int(0, 2**32 - 1),
    "--max-logprobs": _int(0, 1_000),
    "--enforce-eager": SWITCH,
    "--enable-prefix-caching": SWITCH,
    "--no-enable-prefix-caching": SWITCH,
    "--enable-chunked-prefill": SWITCH,
    "--no-enable-chunked-prefill": SWITCH,
}


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not NUMBER_RE.match(token)


def canonical(flag: str) -> str:
    """`--max_model_len` -> `--max-model-len`; `-tp` -> `--tensor-parallel-size`."""
    if flag in ALIASES:
        return ALIASES[flag]
    if flag.startswith("--"):
        return "--" + flag[2:].replace("_", "-")
    return flag


def normalize(args: Iterable[object], where: str = "engine_args") -> tuple[str, ...]:
    """`args` in one spelling: strings only, no control characters, flags canonical, `=` split."""
    args = list(args)
    if len(args) > MAX_ARGS:
        raise InvalidRequest(f"{where}: at most {MAX_ARGS} arguments, got {len(args)}")
    out: list[str] = []
    for arg in args:
        if not isinstance(arg, str):
            raise InvalidRequest(f"{where}: every argument must be a string; got {shown(arg)}")
        if has_control(arg) or len(arg) > MAX_ARG_CHARS:
            raise InvalidRequest(
                f"{where}: argument {shown(arg)} holds a control character (a newline, tab, "
                f"NUL...) or is over {MAX_ARG_CHARS} characters; engine arguments are plain text"
            )
        if _is_flag(arg):
            flag, eq, value = arg.partition("=")
            if not FLAG_RE.match(flag):
                raise InvalidRequest(f"{where}: {shown(flag)} is not a well-formed flag")
            out.append(canonical(flag))
            if eq:
                out.append(value)
        else:
            out.append(arg)
    return tuple(out)


def reserved(args: Sequence[str]) -> str | None:
    """The first flag of normalised `args` that Nebula sets itself, or None."""
    return next((a for a in args if a in RESERVED), None)


def check_catalog_args(args: Iterable[object], where: str = "engine_args") -> tuple[str, ...]:
    """Arguments from the catalog file: normalised, none reserved."""
    normal = normalize(args, where)
    bad = reserved(normal)
    if bad:
        raise InvalidRequest(f"{where}: {bad} is set by Nebula itself; remove it")
    return normal


def check_api_args(args: object) -> tuple[str, ...]:
    """Arguments sent to the admin API: normalised, each flag allowlisted, each value checked."""
    if not isinstance(args, list):
        raise InvalidRequest("engine_args must be a list of strings")
    normal = normalize(args)
    allowed = ", ".join(sorted(API_FLAGS))
    i = 0
    while i < len(normal):
        flag = normal[i]
        if not _is_flag(flag):
            raise InvalidRequest(f"engine_args: {shown(flag)} is not a flag (values follow flags)")
        if flag not in API_FLAGS:
            where = "is set by Nebula itself" if flag in RESERVED else "cannot be set over the API"
            raise InvalidRequest(
                f"engine_args: {flag} {where}; the API accepts {allowed}. "
                "Other engine flags belong in the catalog file on the nodes."
            )
        check = API_FLAGS[flag]
        if check is SWITCH:
            if i + 1 < len(normal) and not _is_flag(normal[i + 1]):
                raise InvalidRequest(f"engine_args: {flag} takes no value")
            i += 1
            continue
        if i + 1 >= len(normal) or _is_flag(normal[i + 1]):
            raise InvalidRequest(f"engine_args: {flag} needs a value")
        value = normal[i + 1]
        reason = check(value)
        if reason:
            raise InvalidRequest(f"engine_args: {flag} must be {reason}; got {shown(value)}")
        i += 2
    return normal
