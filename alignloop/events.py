"""Event schemas on the feedback stream: `alignloop.generation/2` (reads /1) and `alignloop.feedback/1`.

These are the typed records the stages exchange (serving -> Kafka -> trainer). Models are strict (no type
coercion, unknown fields rejected, bounded strings) and frozen, so an event that was valid when built is
still valid when the producer serializes it. The published JSON Schemas in `deploy/schemas/` are generated
from these models (`alignloop feedback schemas`), and a test keeps them equal.

Building events (defaults fill `schema`, `event_id` and `ts`):

    from alignloop.events import FeedbackEvent, GeneratedImage, GenerationEvent, GenerationParams, hash_user_id

    gen = GenerationEvent(
        request_id="r-1f3a", prompt="three red circles on a gray background", arm="A", adapter_version="base",
        user_hash=hash_user_id("alice"), params=GenerationParams(n=8, k=2, steps=20, guidance=7.5, seed=42),
        images=[GeneratedImage(image_id="i-1", uri="file:///.../i-1.png", rank=1, reward=0.91), ...],
    )
    vote = FeedbackEvent(
        request_id="r-1f3a", image_id="i-1", vote="up", user_hash=hash_user_id("alice"),
        arm="A", adapter_version="base", image_uri="file:///.../i-1.png",
    )

The raw user id never leaves the service: events carry `hash_user_id(user_id)`, an HMAC-SHA256 keyed with the
`user_hash_key` secret, so the stream can group votes by user without being able to name them.
"""

import hashlib
import hmac
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

from alignloop.secrets import load_secret

GENERATIONS_TOPIC = "alignloop.generations"
FEEDBACK_TOPIC = "alignloop.feedback"

GENERATION_SCHEMA = "alignloop.generation/2"
# /2 adds what makes a voted image reproducible and attributable: the reward model that ranked it, and per image
# its candidate index, seed and probability of being shown (exploration). Events written as /1 stay readable.
GENERATION_SCHEMAS = ("alignloop.generation/1", GENERATION_SCHEMA)
FEEDBACK_SCHEMA = "alignloop.feedback/1"

# Ids travel as Kafka keys, file names in the image store and Parquet columns: a conservative alphabet keeps
# them safe in all three (no path separators, no whitespace).
Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
# Arm ("A", "B", ...) and adapter version ("base", "v7", "2026-11-24T03:00Z") share the id alphabet.
Label = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=500)]
Uri = Annotated[str, StringConstraints(min_length=4, max_length=1024, pattern=r"^[a-z][a-z0-9+.-]*://\S+$")]
UserHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Reward = Annotated[float, Field(allow_inf_nan=False)]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Event(BaseModel):
    # strict: "3" is not 3; in JSON input, UUIDs and timestamps are still read from their string forms.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_by_name=True)

    TOPIC: ClassVar[str]  # where the producer sends this kind of event

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class GeneratedImage(BaseModel):
    """One of the k images returned to the user."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    image_id: Id
    uri: Uri = Field(description="Where the PNG lives in the image store (fsspec URL).")
    rank: int = Field(ge=1, le=64, description="Position shown, 1 first; the best by reward unless explored.")
    reward: Reward = Field(description="Reward-model score that ranked the image.")
    candidate_index: int | None = Field(default=None, ge=0, le=63, description="Which of the n candidates (/2).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1,
                             description="The candidate's own sampler seed: with the adapter it redraws the image (/2).")
    shown_probability: float | None = Field(
        default=None, gt=0, le=1, allow_inf_nan=False,
        description="Chance this candidate had of being shown under the exploration policy (/2): 1 for the top "
                    "images, less for an explored one; a trainer can weight votes by its inverse.")


class GenerationParams(BaseModel):
    """How the images were sampled: best k of n, with the sampler settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    n: int = Field(ge=1, le=64, description="Candidates sampled.")
    k: int = Field(ge=1, le=64, description="Candidates returned (best k by reward).")
    steps: int = Field(ge=1, le=150, description="Denoising steps.")
    guidance: float = Field(ge=0, le=30, allow_inf_nan=False, description="Classifier-free guidance scale.")
    seed: int = Field(ge=0, le=2**63 - 1, description="Sampler seed; with the adapter it reproduces the images.")

    @model_validator(mode="after")
    def _k_at_most_n(self):
        if self.k > self.n:
            raise ValueError(f"k must be at most n; got k={self.k}, n={self.n}")
        return self


class GenerationEvent(_Event):
    """`alignloop.generation/2` (events written as /1 still parse): one /generate request answered; keyed by
    request_id."""

    TOPIC: ClassVar[str] = GENERATIONS_TOPIC

    schema_: Literal[GENERATION_SCHEMAS] = Field(default=GENERATION_SCHEMA, alias="schema")
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique per event; consumers dedupe on it.")
    ts: AwareDatetime = Field(default_factory=_now, description="When the images were returned (UTC).")
    request_id: Id
    user_hash: UserHash | None = Field(default=None, description="hash_user_id(user_id); null for anonymous users.")
    prompt: Prompt
    arm: Label = Field(description="A/B arm that served the request.")
    adapter_version: Label = Field(description="LoRA adapter version, or 'base' for none.")
    params: GenerationParams
    images: list[GeneratedImage] = Field(min_length=1, max_length=64, description="The k returned images.")
    candidate_rewards: list[Reward] | None = Field(
        default=None, max_length=64, description="Rewards of all n candidates, for rejection-sampling analysis."
    )
    reward_model: Label | None = Field(
        default=None, description="What ranked the candidates (/2): 'clip' (CLIP score) or a registry reward version.")

    @model_validator(mode="after")
    def _consistent(self):
        k, n = self.params.k, self.params.n
        if len(self.images) != k:
            raise ValueError(f"images must hold params.k={k} entries; got {len(self.images)}")
        if sorted(image.rank for image in self.images) != list(range(1, k + 1)):
            raise ValueError(f"image ranks must be 1..{k}, each once; got {[image.rank for image in self.images]}")
        if len({image.image_id for image in self.images}) != k:
            raise ValueError("image_id values must be distinct within a generation")
        if self.candidate_rewards is not None and len(self.candidate_rewards) != n:
            raise ValueError(f"candidate_rewards must hold params.n={n} entries; got {len(self.candidate_rewards)}")
        if self.schema_ == GENERATION_SCHEMA:
            if self.reward_model is None:
                raise ValueError(f"{GENERATION_SCHEMA} events name their reward_model")
            for image in self.images:
                if None in (image.candidate_index, image.seed, image.shown_probability):
                    raise ValueError(f"{GENERATION_SCHEMA} images carry candidate_index, seed and shown_probability; "
                                     f"{image.image_id} does not")
                if image.candidate_index >= n:
                    raise ValueError(f"candidate_index must be below params.n={n}; got {image.candidate_index}")
            if len({image.candidate_index for image in self.images}) != k:
                raise ValueError("candidate_index values must be distinct within a generation")
        return self

    def kafka_key(self) -> str:
        return self.request_id


class FeedbackEvent(_Event):
    """`alignloop.feedback/1`: one thumbs vote on one image; keyed by image_id."""

    TOPIC: ClassVar[str] = FEEDBACK_TOPIC

    schema_: Literal["alignloop.feedback/1"] = Field(default=FEEDBACK_SCHEMA, alias="schema")
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique per event; consumers dedupe on it.")
    ts: AwareDatetime = Field(default_factory=_now, description="When the vote was received (UTC).")
    request_id: Id
    image_id: Id
    vote: Literal["up", "down"]
    user_hash: UserHash | None = Field(default=None, description="hash_user_id(user_id); null for anonymous users.")
    arm: Label
    adapter_version: Label
    image_uri: Uri

    def kafka_key(self) -> str:
        return self.image_id


Event = Annotated[Union[GenerationEvent, FeedbackEvent], Field(discriminator="schema_")]
_EVENT_ADAPTER = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> GenerationEvent | FeedbackEvent:
    """Parse and validate one JSON event; raises pydantic.ValidationError naming the bad field."""
    return _EVENT_ADAPTER.validate_json(raw)


def json_schemas() -> dict[str, dict]:
    """The published JSON Schemas, by file name (what `deploy/schemas/` holds)."""
    schemas = {}
    for model, name in ((GenerationEvent, GENERATION_SCHEMA), (FeedbackEvent, FEEDBACK_SCHEMA)):
        schema = model.model_json_schema(by_alias=True, mode="serialization")
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": name, **schema}
        schemas[name.replace("/", "-") + ".schema.json"] = schema
    return schemas


@lru_cache(maxsize=1)
def _user_hash_key() -> bytes:
    return load_secret("user_hash_key")


def hash_user_id(user_id: str, key: bytes | None = None) -> str:
    """Keyed hash (HMAC-SHA256, hex) of a user id: stable per user, not reversible without the key.
    `key` defaults to this process's `user_hash_key` secret; tests pass a served process's key."""
    if not user_id:
        raise ValueError("user_id must be a non-empty string")
    return hmac.new(key or _user_hash_key(), user_id.encode(), hashlib.sha256).hexdigest()
