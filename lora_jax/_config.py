"""`LoraConfig`: what to adapt, at which rank, with which scaling."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

INITS = ("gaussian", "kaiming_uniform", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA adapter (Hu et al. 2021, arXiv 2106.09685).

    Attributes:
      rank: r, the inner dimension of the update ΔW = s·A·B (A: fan_in×r,
        B: r×fan_out).
      alpha: the scaling numerator: s = alpha / rank, or alpha / sqrt(rank) with
        `use_rslora` (Kalajdzievski 2023).
      targets: a regular expression (or several; any may match) searched in the
        slash-joined path of each parameter (``re.search``; anchor with ``^…$``),
        e.g. ``r".*/(q_proj|v_proj)/kernel"`` or just ``"q_proj|v_proj"``. Only
        leaves with two or more axes are eligible (kernels and embeddings); a
        pattern that also matches biases or norm scales simply skips them.
      dropout: LoRA dropout rate on the adapter's input (the base path is never
        dropped). It is applied by `lj.apply(..., dropout=rate)` and only when
        the call is given a ``'dropout'`` rng.
      init: how A is drawn: ``"gaussian"`` (normal, std 1/rank, as PEFT's
        ``init_lora_weights="gaussian"``) or ``"kaiming_uniform"`` (uniform in
        ±1/sqrt(fan_in), loralib's and PEFT's default). B is zero. For an
        embedding the roles are swapped, as in loralib and PEFT: A = 0 and
        B ~ N(0, 1). ``"pissa"`` and ``"olora"`` (PEFT's names) take A and B from W's
        SVD or QR and return the residual W − s·A·B as the base (`lora_jax._residual`):
        the adapter is then valid only on that residual base; `lj.convert_to_lora`
        makes it a plain adapter of the original.
      use_rslora: scale by alpha/sqrt(rank) instead of alpha/rank.
      bias: which biases train, as in loralib: ``"none"``, ``"all"`` (every leaf
        named ``bias``) or ``"lora_only"`` (biases of the adapted modules). A
        trained bias is a zero-initialised delta beside the frozen bias.
      rank_pattern: per-path rank overrides, ``{regex: rank}``; a key matches a
        path, its module's path or a trailing run of their segments, as in PEFT
        (`pattern_matches`: ``"q_proj"`` matches ``".../q_proj/kernel"``). The
        first matching key wins.
      alpha_pattern: per-path alpha overrides, same matching rule.
      use_dora: DoRA (PEFT's ``use_dora``): a trained magnitude m (*stack, *out) beside
        each adapted kernel, W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖_col (`lora_jax._dora`).
        Kernels only (nn.Dense, DenseGeneral, Einsum), not embeddings.
    """

    rank: int
    alpha: float
    targets: str | Sequence[str]
    dropout: float = 0.0
    init: str = "gaussian"
    use_rslora: bool = False
    bias: str = "none"
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    use_dora: bool = False

    def __post_init__(self):
        def fail(field, problem, fix):
            raise ValueError(f"LoraConfig.{field}: {problem}; {fix}.")

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            fail("rank", f"got {self.rank!r}", "use a positive integer such as 8")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            fail("alpha", f"got {self.alpha!r}", "use a positive number such as 16")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"got {self.dropout!r}", "use a rate in [0, 1)")
        if self.init not in INITS:
            fail("init", f"unknown scheme {self.init!r}", f"use one of {INITS}")
        if self.bias not in BIAS_MODES:
            fail("bias", f"unknown mode {self.bias!r}", f"use one of {BIAS_MODES}")
        patterns = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            fail(
                "targets",
                f"got {self.targets!r}",
                'give a regex over parameter paths, e.g. r".*/(q_proj|v_proj)/kernel"',
            )
        for name in ("rank_pattern", "alpha_pattern"):
            for key, value in (getattr(self, name) or {}).items():
                _compile(key, f"LoraConfig.{name}")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    fail(name, f"{key!r} maps to {value!r}", "use positive numbers")
                if name == "rank_pattern" and not isinstance(value, int):
                    fail(name, f"{key!r} maps to {value!r}", "ranks are integers")
        for p in patterns:
            _compile(p, "LoraConfig.targets")

    def is_target(self, path: str) -> bool:
        """Whether one of the target regexes is found in `path` (slash-joined)."""
        patterns = [self.targets] if isinstance(self.targets, str) else self.targets
        return any(re.search(p, path) for p in patterns)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at `path`, after `rank_pattern`."""
        return pattern_value(self.rank_pattern, self.rank, path, path.rsplit("/", 1)[0])

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at `path`, after `alpha_pattern`."""
        return pattern_value(self.alpha_pattern, self.alpha, path, path.rsplit("/", 1)[0])

    def scale_for(self, path: str) -> float:
        """s = alpha/r (or alpha/sqrt(r) with rsLoRA) for the adapter at `path`."""
        return scale(self.alpha_for(path), self.rank_for(path), self.use_rslora)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict; `LoraConfig(**d)` rebuilds the config."""
        d = dataclasses.asdict(self)
        if not isinstance(self.targets, str):
            d["targets"] = list(self.targets)
        return d


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a valid regex ({e}).") from None


def scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The scale s of ΔW = s·A·B: alpha/rank, or alpha/sqrt(rank) with rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def pattern_matches(key: str, name: str, sep: str = "/") -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: the regex `key` matches all of `name` or a
    trailing run of its `sep`-separated segments (``"q_proj"`` matches ``"layers_0/q_proj"``
    and, with ``sep="."``, ``"model.layers.0.q_proj"``; it does not match ``"xq_proj"``)."""
    return re.fullmatch(rf"(.*{re.escape(sep)})?(?:{key})", name) is not None


def pattern_value(
    patterns: Mapping[str, Any] | None, default: Any, *names: str, sep: str = "/"
) -> Any:
    """The value of the first key of `patterns` that `pattern_matches` one of `names`, else
    `default`."""
    return next(
        (
            value
            for key, value in (patterns or {}).items()
            if any(pattern_matches(key, name, sep) for name in names)
        ),
        default,
    )
