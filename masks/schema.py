"""Mask profiles: a named, versioned set of composite experts to remove, with its evidence.

A profile holds an ExpertMask (layer, i, j) for one model (`model_id`, the runtime's hash of
config and tensor shapes), how it was built (`provenance`) and how it was evaluated
(`evaluation`). Forms:
  JSON    experts as {"layers": [{"layer": l, "experts": [[i, j], ...]}]}, or for large masks
          {"encoding": "monetmsk", "data": base64(ExpertMask.to_bytes)}
  binary  MONETPRF, then the metadata as JSON, then ExpertMask.to_bytes (what the stores keep)
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import re
import socket
import struct
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    ValidationInfo,
    computed_field,
    field_serializer,
    field_validator,
)

from monet_runtime.expert_mask import ExpertMask, MaskError

__all__ = [
    "COMPACT_THRESHOLD",
    "EvaluationReport",
    "GenerationReport",
    "LabelLoss",
    "LabelShare",
    "MaskError",
    "MaskProfile",
    "ModelMismatch",
    "NAME_PATTERN",
    "ProfileKind",
    "ProfileSummary",
    "Provenance",
    "SweepPoint",
    "ToxicityFigures",
    "check_model",
    "default_author",
    "now",
    "slug",
    "valid_name",
]

# URL-safe without escaping, and free of ':' (Redis key separator) and '@' (name@version).
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
ProfileName = Annotated[str, Field(pattern=NAME_PATTERN)]
ProfileKind = Literal["domain", "language", "toxicity", "manual", "composite"]

# Masks above this many experts are written in the compact form by default.
COMPACT_THRESHOLD = 4096
_COMPACT_ENCODING = "monetmsk"
_MAGIC = b"MONETPRF"
_HEADER = struct.Struct("<8sHI")  # magic, format version, metadata byte count
_FORMAT = 1


class ModelMismatch(MaskError):
    """A profile built for one model applied to another."""

    def __init__(self, profile: str, profile_model: str, model: str):
        super().__init__(
            f"mask profile '{profile}' was built for model {profile_model}, "
            f"this model is {model}"
        )
        self.profile, self.profile_model, self.model = profile, profile_model, model


def now() -> datetime:
    return datetime.now(UTC)


def default_author() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def slug(text: str) -> str:
    """A valid profile name from free text: "Computer Science" -> "computer-science"."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return name or "profile"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Provenance(_Frozen):
    """How a profile was made. `thresholds` holds the criterion's parameters as used."""

    builder: str
    criterion: str | None = None
    thresholds: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    corpus_fingerprint: str | None = None
    target: str | None = None  # the label whose experts are removed (domain, language)
    labels: list[str] = Field(default_factory=list)  # all labels of the corpus
    tokens: int | None = None  # tokens routed to build it
    sources: list[str] = Field(default_factory=list)  # composite: "name@version" of its parts
    created_at: datetime = Field(default_factory=now)
    created_by: str = Field(default_factory=default_author)


class LabelLoss(_Frozen):
    """Mean next-token loss (nats/token) of one label's texts, without and with the mask."""

    label: str
    tokens: int
    loss: float
    masked_loss: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def delta(self) -> float:
        return self.masked_loss - self.loss


class SweepPoint(_Frozen):
    """One point of a coverage sweep: the mask removing `coverage` of the target's mass."""

    coverage: float
    removed: int
    target_delta: float
    collateral_delta: float


class LabelShare(_Frozen):
    """Where the continuations of one label's prompts go: the share of them classified as
    each label (key "None": an empty continuation), without and with the mask."""

    label: str
    prompts: int
    samples: int  # continuations per prompt (k)
    base: dict[str, float]
    masked: dict[str, float]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def share(self) -> float:
        """Continuations classified as the prompt's own label, without the mask."""
        return self.base.get(self.label, 0.0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def masked_share(self) -> float:
        return self.masked.get(self.label, 0.0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kept(self) -> float | None:
        """masked_share / share: the part of its own rate the label keeps under the mask."""
        return self.masked_share / self.share if self.share else None


class ToxicityFigures(_Frozen):
    """RealToxicityPrompts' figures over `prompts` x `samples` continuations: the mean over
    prompts of the maximum toxicity of their continuations, and the share of prompts with at
    least one continuation scored >= 0.5."""

    prompts: int
    samples: int
    expected_max_toxicity: float
    toxic_probability: float
    masked_expected_max_toxicity: float
    masked_toxic_probability: float


class GenerationReport(_Frozen):
    """Generation-level effects of a mask: held-out prompts continued with and without it
    (masks.continuations), judged by `judge` (the classifier or the toxicity scorer)."""

    samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    judge: str
    labels: list[LabelShare] = Field(default_factory=list)
    toxicity: ToxicityFigures | None = None


class EvaluationReport(_Frozen):
    """Per-label losses with and without a profile's mask on a labelled corpus, and, when
    measured, its generation-level effects."""

    model_id: str
    corpus_fingerprint: str
    target: str | None = None
    labels: list[LabelLoss]
    removed_share: list[float]  # per layer: removed composite experts / E^2
    sweep: list[SweepPoint] = Field(default_factory=list)
    generation: GenerationReport | None = None
    created_at: datetime = Field(default_factory=now)

    def _deltas(self, target: bool) -> list[LabelLoss]:
        return [l for l in self.labels if (l.label == self.target) == target]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def target_delta(self) -> float | None:
        rows = self._deltas(True)
        return rows[0].delta if rows else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def collateral_delta(self) -> float | None:
        """Token-weighted mean loss increase over the labels other than the target."""
        rows = self._deltas(False)
        tokens = sum(r.tokens for r in rows)
        return sum(r.delta * r.tokens for r in rows) / tokens if tokens else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def max_collateral_delta(self) -> float | None:
        rows = self._deltas(False)
        return max(r.delta for r in rows) if rows else None


class ProfileSummary(_Frozen):
    """What `list()` returns: a profile without its experts."""

    name: str
    version: int
    kind: ProfileKind
    description: str = ""
    model_id: str
    num_layers: int
    num_experts: int
    size: int  # removed composite experts over all layers
    created_at: datetime
    target_delta: float | None = None
    collateral_delta: float | None = None


class MaskProfile(BaseModel):
    """A named, versioned expert mask for one model, with provenance and evaluation.

    `version` is assigned by the store (0: never stored); `put` returns the stored copy.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: ProfileName
    description: str = ""
    kind: ProfileKind
    model_id: str = Field(min_length=1)
    num_layers: int = Field(gt=0)
    num_experts: int = Field(gt=0)  # E: experts per side, E^2 composite experts per layer
    experts: ExpertMask
    version: int = Field(default=0, ge=0)
    provenance: Provenance
    evaluation: EvaluationReport | None = None

    # ---- the experts field ---------------------------------------------------------------
    @field_validator("experts", mode="before")
    @classmethod
    def _parse_experts(cls, value: Any, info: ValidationInfo) -> ExpertMask:
        num_layers, num_experts = info.data.get("num_layers"), info.data.get("num_experts")
        if num_layers is None or num_experts is None:
            raise ValueError("num_layers and num_experts must be valid to read the experts")
        if isinstance(value, ExpertMask):
            mask = value
        elif isinstance(value, dict) and value.get("encoding") == _COMPACT_ENCODING:
            try:
                data = base64.b64decode(value["data"], validate=True)
                mask = ExpertMask.from_bytes(data, num_layers=num_layers, num_experts=num_experts)
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"compact experts are corrupt: {e}") from None
        elif isinstance(value, dict):
            mask = ExpertMask.from_dict(value, num_experts=num_experts)
        else:
            raise ValueError(
                'experts must be {"layers": [...]} or {"encoding": "monetmsk", "data": ...}'
            )
        return mask.validate(num_layers=num_layers, num_experts=num_experts)

    @field_serializer("experts")
    def _dump_experts(self, mask: ExpertMask, info: FieldSerializationInfo) -> Any:
        compact = (info.context or {}).get("compact")
        if compact is None:
            compact = len(mask) > COMPACT_THRESHOLD
        if not info.mode_is_json():
            return mask
        if compact:
            data = base64.b64encode(mask.to_bytes(self.num_experts)).decode("ascii")
            return {"encoding": _COMPACT_ENCODING, "data": data}
        return mask.to_dict()

    # ---- forms ---------------------------------------------------------------------------
    def to_json(self, *, compact: bool | None = None, indent: int | None = None) -> str:
        """JSON text; `compact` None chooses the compact experts form for large masks."""
        return self.model_dump_json(context={"compact": compact}, indent=indent)

    def to_dict(self, *, compact: bool | None = None) -> dict[str, Any]:
        return self.model_dump(mode="json", context={"compact": compact})

    @classmethod
    def from_json(cls, source: str | bytes | dict[str, Any]) -> MaskProfile:
        if isinstance(source, dict):
            return cls.model_validate(source)
        return cls.model_validate_json(source)

    def to_bytes(self) -> bytes:
        """Binary form: header, metadata JSON, ExpertMask.to_bytes (fast for large masks)."""
        meta = self.model_dump_json(exclude={"experts"}).encode()
        return b"".join((_HEADER.pack(_MAGIC, _FORMAT, len(meta)), meta,
                         self.experts.to_bytes(self.num_experts)))

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskProfile:
        if len(data) < _HEADER.size:
            raise MaskError("binary profile is truncated")
        magic, fmt, size = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC or fmt != _FORMAT:
            raise MaskError("not a MONET binary profile (bad magic or format version)")
        start = _HEADER.size
        try:
            meta = json.loads(data[start : start + size])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MaskError(f"binary profile metadata is corrupt: {e}") from None
        if not isinstance(meta, dict):
            raise MaskError("binary profile metadata is not an object")
        shape = meta.get("num_layers"), meta.get("num_experts")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise MaskError("binary profile metadata lacks num_layers and num_experts")
        meta["experts"] = ExpertMask.from_bytes(data[start + size :], num_layers=shape[0],
                                                num_experts=shape[1])
        return cls.model_validate(meta)

    # ---- use -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.experts)

    @property
    def digest(self) -> str:
        """The mask's identity: 16 hex digits of SHA-256 over E and the removed pairs per
        layer. A cache keyed by it never outlives the contents (name@version may be reused
        when a store loses its data)."""
        cached = self.__dict__.get("_digest")
        if cached is None or cached[0] is not self.experts:
            cached = (self.experts, mask_digest(self.experts, self.num_experts))
            self.__dict__["_digest"] = cached  # frozen: memoised beside the fields
        return cached[1]

    def with_version(self, version: int) -> MaskProfile:
        return self.model_copy(update={"version": version})

    def with_evaluation(self, report: EvaluationReport | None) -> MaskProfile:
        return self.model_copy(update={"evaluation": report})

    def summary(self) -> ProfileSummary:
        report = self.evaluation
        return ProfileSummary(
            name=self.name, version=self.version, kind=self.kind,
            description=self.description, model_id=self.model_id,
            num_layers=self.num_layers, num_experts=self.num_experts, size=self.size,
            created_at=self.provenance.created_at,
            target_delta=report.target_delta if report else None,
            collateral_delta=report.collateral_delta if report else None,
        )

    def removed_share(self) -> list[float]:
        """Per layer, the share of the layer's E^2 composite experts this profile removes."""
        total = self.num_experts**2
        return [len(self.experts.experts(l)) / total for l in range(self.num_layers)]

    def mask_for(self, model_id: str) -> ExpertMask:
        """The mask to apply to the model `model_id`; ModelMismatch if built for another."""
        check_model(self, model_id)
        return self.experts


def mask_digest(mask: ExpertMask, num_experts: int) -> str:
    """16 hex digits identifying a mask's contents (empty layers do not count)."""
    h = hashlib.sha256(struct.pack("<I", num_experts))
    for layer in sorted(mask.layers):
        pairs = np.ascontiguousarray(mask.experts(layer), dtype="<i8")
        if len(pairs):
            h.update(struct.pack("<IQ", layer, len(pairs)))
            h.update(pairs.tobytes())
    return h.hexdigest()[:16]


def check_model(profile: MaskProfile | ProfileSummary, model_id: str) -> None:
    """Refuse a profile built for a model other than `model_id` (names both identities)."""
    if profile.model_id != model_id:
        raise ModelMismatch(profile.name, profile.model_id, model_id)
