"""What crosses the wire between the pools, and how much of it: compression settings,
the named presets, and the per-transfer payload plan. Torch-free (the router, the
config and both workers share these types).

    preset / settings ──(decode worker, at reserve)──► PayloadPlan ──(descriptor)──► prefill worker

Dedup is always on: pages the decode worker holds exactly are never sent. What *is*
sent, the prompt suffix the decode worker lacks (the "region"), may be
- ``sparse``: a SnapKV selection of its tokens per layer (``workers/kv_selection.py``),
  the sinks and the observation window always kept;
- quantized: ``int8`` / ``fp8`` per token and head, ``int4`` KIVI-style
  (``cluster/kv_codec.py``).
Only the shipped suffix is compressed; a held exact prefix stays exact and shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Version of the payload codecs (layer message framing, quantizer layouts, selection
# semantics). Part of the KV layout handshake: peers with different versions refuse.
CODEC_VERSION = 1

Quantization = Literal["none", "int8", "fp8", "int4"]
BUDGET_SHAPES = ("uniform", "pyramid", "learned")


class CompressionSettings(BaseModel):
    """One complete compression setting (a preset, or a preset with overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["dense", "sparse"] = "dense"  # dense: every shipped token; sparse: a selection
    keep: float = Field(1.0, gt=0, le=1)  # mean fraction of the shipped tokens kept per layer
    token_budget: int | None = Field(None, ge=1)  # or: mean tokens kept per layer (overrides keep)
    window: int = Field(32, ge=1)  # observation window: the last prompt queries that score tokens
    sinks: int = Field(4, ge=0)  # leading prompt tokens always kept
    kernel: int = Field(63, ge=1)  # 1-D pooling kernel over the scores (odd)
    pooling: Literal["avg", "max"] = "avg"
    # uniform | pyramid | learned (the deployment's profile, else the one shipped for the
    # served model: see CompressionSection.profile) | path of a per-layer profile (JSON)
    budgets: str = "uniform"
    quantization: Quantization = "none"
    group_size: int = Field(32, ge=2)  # int4: tokens per key group, channels per value group
    guard: float = Field(0.0, ge=0, le=1)  # min attention mass a layer's kept tokens hold (0: off)
    min_tokens: int = Field(64, ge=0)  # a shipped suffix shorter than this is never sparsified

    @model_validator(mode="after")
    def _check(self) -> "CompressionSettings":
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if self.group_size % 2:
            raise ValueError(f"group_size must be even (int4 packs two codes per byte), got {self.group_size}")
        if self.mode == "sparse" and self.token_budget is not None and self.token_budget < self.sinks + self.window:
            raise ValueError(
                f"token_budget ({self.token_budget}) is below sinks + window ({self.sinks} + {self.window}): "
                "those are always kept"
            )
        if self.budgets not in BUDGET_SHAPES and not self.budgets.endswith(".json"):
            raise ValueError(f"budgets must be uniform, pyramid, learned or a profile .json path, got {self.budgets!r}")
        return self

    @property
    def sparse(self) -> bool:
        return self.mode == "sparse"

    @property
    def lossless(self) -> bool:
        return not self.sparse and self.quantization == "none"


# Each preset's measured bytes ratio and quality are in the README (bench/quality/suite.py,
# bench/results/quality.md). max keeps uniform budgets: on the RULER evaluation items,
# pyramid budgets at the same bytes lost 7.6 points and the learned profile was no better
# than uniform at keep 0.25 (it wins at keep 0.125).
PRESETS: dict[str, CompressionSettings] = {
    "none": CompressionSettings(),  # dedup only: lossless
    "int8": CompressionSettings(quantization="int8"),
    "fp8": CompressionSettings(quantization="fp8"),
    "int4": CompressionSettings(quantization="int4"),
    "balanced": CompressionSettings(mode="sparse", keep=0.5, quantization="int4", guard=0.0),
    "max": CompressionSettings(mode="sparse", keep=0.25, quantization="int4", guard=0.0),
}


def unknown_preset_message(name: str, custom: tuple[str, ...] = ()) -> str:
    return f"unknown kv_compression preset {name!r}; choose one of: {', '.join((*PRESETS, *custom))}"


class PresetOverrides(BaseModel):
    """A built-in preset (``preset``) with any of its knobs overridden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "none"
    mode: Literal["dense", "sparse"] | None = None
    keep: float | None = None
    token_budget: int | None = None
    window: int | None = None
    sinks: int | None = None
    kernel: int | None = None
    pooling: Literal["avg", "max"] | None = None
    budgets: str | None = None
    quantization: Quantization | None = None
    group_size: int | None = None
    guard: float | None = None
    min_tokens: int | None = None

    @model_validator(mode="after")
    def _check_overrides(self) -> "PresetOverrides":
        if self.preset not in PRESETS:
            raise ValueError(unknown_preset_message(self.preset))
        self.settings()  # the combination must be valid too (errors name the field)
        return self

    def overrides(self) -> dict:
        """The knobs set over the preset's."""
        return {k: v for k, v in self.model_dump().items() if k in CompressionSettings.model_fields and v is not None}

    def settings(self) -> CompressionSettings:
        base = PRESETS[self.preset]
        return CompressionSettings.model_validate({**base.model_dump(), **self.overrides()})


class CompressionSection(PresetOverrides):
    """``transfer.compression`` in the config file: the deployment's default payload (a
    preset, and any of its knobs overridden), the operator's own named presets, and the
    learned per-layer budget profile. ``settings()`` is the deployment's default; a
    request's ``kv_compression`` field picks a built-in or a named preset instead."""

    # Named presets a request may pick (``kv_compression: <name>``), each a built-in
    # preset with overrides, e.g. ``{"long-docs": {"preset": "max", "keep": 0.3}}``.
    # A name cannot shadow a built-in one (``none`` is always lossless).
    presets: dict[str, PresetOverrides] = Field(default_factory=dict)
    # The profile ``budgets: learned`` uses (a JSON file from ``kvrelay calibrate``);
    # "auto": the profile shipped in the package for the served model
    # (workers/budget_profiles/), and uniform budgets for a model without one.
    profile: str = "auto"
    # Shadow sampling (off by default): this fraction of greedy requests with a lossy
    # payload also decodes its first shadow_tokens on full KV on the prefill worker, and
    # the router records the greedy agreement (kvrelay_kv_shadow_agreement{preset}).
    shadow_fraction: float = Field(0.0, ge=0, le=1)
    shadow_tokens: int = Field(16, ge=1, le=256)

    @model_validator(mode="after")
    def _check_section(self) -> "CompressionSection":
        for name in self.presets:
            if name in PRESETS or name.endswith("*") or not name.strip():
                raise ValueError(f"transfer.compression.presets: {name!r} is a built-in preset name or not a valid name")
        if self.profile != "auto" and not self.profile.endswith(".json"):
            raise ValueError(f"transfer.compression.profile must be auto or a profile .json path, got {self.profile!r}")
        return self

    def names(self) -> tuple[str, ...]:
        """Every preset a request may name: the built-in ones, then the operator's."""
        return (*PRESETS, *self.presets)

    def resolve(self, preset: str | None) -> tuple[str, CompressionSettings]:
        """(label, settings) for a request's ``kv_compression``: None takes the
        deployment's settings (labelled ``preset*`` when knobs are overridden); a name
        takes that built-in preset as published (so ``none`` is always lossless) or the
        operator's preset of that name."""
        if preset is None:
            return self.preset if not self.overrides() else f"{self.preset}*", self.settings()
        if preset in PRESETS:
            return preset, PRESETS[preset]
        if preset in self.presets:
            return preset, self.presets[preset].settings()
        raise ValueError(unknown_preset_message(preset, tuple(self.presets)))


@dataclass(frozen=True)
class PayloadPlan:
    """What the prefill worker sends for one request, fixed by the decode worker at
    reserve time (its receives are posted before the prefill starts, so every size
    must be known then). Carried in the transfer descriptor."""

    preset: str  # label for metrics ("none", "balanced", "balanced*" = with overrides)
    quantization: str
    group_size: int
    sparse: bool
    region_start: int  # first token shipped (the decode worker holds [0, region_start) exactly)
    region_tokens: int  # tokens in the shipped suffix
    budgets: tuple[int, ...]  # per layer: tokens to keep (== region_tokens each when not sparse)
    capacity_tokens: int  # per layer, the most tokens a message may carry (the guard may raise a layer)
    window: int = 32
    sinks: int = 4
    kernel: int = 63
    pooling: str = "avg"
    guard: float = 0.0

    @property
    def identity(self) -> bool:
        """Today's path: raw pages, no per-layer framing."""
        return not self.sparse and self.quantization == "none"

    @property
    def planned_slots(self) -> int:
        """KV slots the decode worker reserves for the suffix (the most any layer keeps)."""
        return max(self.budgets, default=0)
