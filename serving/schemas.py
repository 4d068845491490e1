"""Request and response models of the HTTP API (DESIGN.md, "Contracts" > HTTP).

The bounds live here, in the types, so BentoML validates a request before any handler runs and a bad one
gets a 400 naming the field (see service.py's error shaping). Requests are strict (no "8" for 8) and reject
unknown fields: a misspelled `stepz` is an error, not a silently ignored option.
"""

import re
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

MAX_N = 64  # candidates per request; bounds the work one request can ask for
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed

# One line of text, no control characters: pydantic trims Unicode White_Space and Python's str.strip() also \x1c-\x1f,
# so a prompt of "\x1f" passed the schema and failed in the sampler as a 500 (found by schemathesis at 400 examples).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_characters(prompt: str) -> str:
    if _CONTROL.search(prompt):
        raise ValueError("must not contain control characters (tabs, newlines, \\x00-\\x1f, \\x7f)")
    return prompt


Prompt = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS),
    AfterValidator(_no_control_characters),
    Field(description=f"What to draw; 1..{MAX_PROMPT_CHARS} characters after trimming whitespace, no control "
                      "characters.", examples=["three red circles on a gray background"],
          json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f]+$"}),
]
# Any printable ASCII without spaces: enough for account ids and e-mail addresses, nothing that breaks a log line.
UserId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$"),
    Field(description="Your user id (1..128 printable ASCII characters, no spaces). Optional; it is stored only "
                      "as a keyed hash. Used only when the service has no identity header configured (no "
                      "authenticating proxy in front of it); behind one it is ignored and the proxy's header says "
                      "who you are. Feedback tokens are bound to the id that generated the image: vote with the "
                      "same one (another gets 403).", examples=["alice"]),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Request):
    """Sample `n` images for the prompt, rank them by reward and return the best `k`."""

    # OpenAPI 3.0 `example` (BentoML's schema model takes the singular form at model level).
    model_config = ConfigDict(json_schema_extra={"example": {
        "prompt": "three red circles on a gray background", "n": 16, "k": 4, "steps": 20, "guidance": 7.5,
        "seed": 42, "user_id": "alice"}})

    prompt: Prompt
    n: int = Field(default=8, ge=1, le=MAX_N, description=f"Candidates to sample, 1..{MAX_N}.")
    # validate_default: {"n": 1} alone must be refused naming k (found by schemathesis: it was a 500).
    k: int = Field(default=2, ge=1, le=MAX_N, validate_default=True,
                   description="Candidates to return (the k best by reward), 1..n; 2 when left out.")
    steps: Optional[int] = Field(default=None, ge=1, le=150,
                                 description="Denoising steps, 1..150; the server default when left out.")
    guidance: Optional[float] = Field(default=None, ge=0, le=30, allow_inf_nan=False,
                                      description="Classifier-free guidance scale, 0..30; the server default when left out.")
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED,
                                description="Makes the request reproducible (same seed, prompt, n, steps, guidance "
                                            "and adapter give the same images). Random when left out.")
    user_id: Optional[UserId] = None

    @field_validator("k")
    @classmethod
    def _k_at_most_n(cls, k: int, info: ValidationInfo) -> int:
        # A field validator (not a model one) so the error names `k`; n is declared first, so it is validated.
        n = info.data.get("n")
        if n is not None and k > n:
            raise ValueError(f"must be at most n (k is how many of the n candidates come back); got k={k}, n={n}")
        return k


class Timings(BaseModel):
    """Where the request's time went, in milliseconds."""

    queue_ms: float = Field(description="Waiting for the sampler (other requests' passes).")
    sampling_ms: float = Field(description="Denoising and decoding the n candidates.")
    scoring_ms: float = Field(description="Reward of every candidate, and the top-k.")
    storing_ms: float = Field(description="PNG encoding and writing the k images to the image store.")
    producing_ms: float = Field(description="Handing the generation event to the Kafka producer.")
    total_ms: float


class ImageResult(BaseModel):
    image_id: str
    image: str = Field(description="The image as a base64-encoded PNG.")
    reward: float = Field(description="Reward-model score (CLIP similarity until a reward head is live).")
    rank: int = Field(ge=1, description="Position shown: 1 = the highest reward among the n candidates. The last "
                                        "image is now and then drawn from lower-ranked candidates (exploration).")
    candidate_index: int = Field(ge=0, description="Which of the n candidates this is.")
    seed: int = Field(ge=0, description="This candidate's own sampler seed: with the adapter it redraws the image.")
    feedback_token: str = Field(description="Send it back to POST /feedback with your vote.")


class GenerateResponse(BaseModel):
    request_id: str
    arm: str = Field(description="A/B arm that served the request.")
    adapter: str = Field(description="The LoRA adapter version that drew every image of this response ('base' = "
                                     "no adapter).")
    rollout: str = Field(default="config", description="The rollout (registry version) that routed the request; "
                                                       "'config' when none is published.")
    reward_model: str = Field(description="What ranked the candidates: 'clip' (CLIP score) or 'reward:<version>', a "
                                          "reward model from the registry.")
    seed: int = Field(description="The seed used (yours, or the one drawn for you): resend it to reproduce.")
    n: int
    k: int
    steps: int
    guidance: float
    images: list[ImageResult] = Field(description="The k best candidates, best first (the last one sometimes "
                                                  "explored from lower ranks).")
    timings: Timings


class FeedbackRequest(_Request):
    """A thumbs-up or thumbs-down on one returned image."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "feedback_token": "v2.1a2b3c4d.eyJpbWFnZV9pZCI6ImltZy0uLi4ifQ.c2lnbmF0dXJl", "vote": "up", "user_id": "alice"}})

    feedback_token: str = Field(min_length=1, max_length=2048, description="The image's feedback_token from /generate.")
    vote: Literal["up", "down"]
    user_id: Optional[UserId] = None


class FeedbackResponse(BaseModel):
    event_id: str = Field(description="Id of the feedback event; a repeated identical vote returns the same id.")
    status: Literal["accepted", "duplicate"] = Field(
        description="'duplicate' when this user already cast this vote on this image (nothing new is recorded).")
    image_id: str
    vote: Literal["up", "down"]

