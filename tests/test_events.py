"""Event schemas: validation at the boundary, the published JSON Schemas, the keyed user hash."""

import json
import uuid
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from alignloop import events
from alignloop.events import (
    FEEDBACK_TOPIC,
    GENERATIONS_TOPIC,
    FeedbackEvent,
    GeneratedImage,
    GenerationEvent,
    GenerationParams,
    hash_user_id,
    parse_event,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "deploy" / "schemas"


def generation(**overrides) -> GenerationEvent:
    fields = dict(
        request_id="req-1", prompt="three red circles on a gray background", arm="A", adapter_version="base",
        params=GenerationParams(n=4, k=2, steps=20, guidance=7.5, seed=42), reward_model="reward:v000003",
        images=[GeneratedImage(image_id="img-1", uri="file:///images/im/img-1.png", rank=1, reward=0.9,
                               candidate_index=2, seed=11, shown_probability=1.0),
                GeneratedImage(image_id="img-2", uri="file:///images/im/img-2.png", rank=2, reward=0.4,
                               candidate_index=0, seed=12, shown_probability=0.25)],
    )
    return GenerationEvent(**{**fields, **overrides})


def feedback(**overrides) -> FeedbackEvent:
    fields = dict(request_id="req-1", image_id="img-1", vote="up", arm="A", adapter_version="base",
                  image_uri="file:///images/im/img-1.png")
    return FeedbackEvent(**{**fields, **overrides})


def test_events_round_trip_through_json_with_schema_and_routing():
    for event, topic, key in ((generation(), GENERATIONS_TOPIC, "req-1"), (feedback(), FEEDBACK_TOPIC, "img-1")):
        raw = event.to_json()
        assert json.loads(raw)["schema"] in ("alignloop.generation/2", "alignloop.feedback/1")
        assert parse_event(raw) == event
        assert (event.TOPIC, event.kafka_key()) == (topic, key)
    assert generation().event_id != generation().event_id  # fresh UUID per event


@pytest.mark.parametrize("bad, field", [
    (dict(extra="x"), "extra"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 501), "prompt"),
    (dict(request_id="../etc/passwd"), "request_id"),
    (dict(arm="A B"), "arm"),
    (dict(user_hash="alice"), "user_hash"),
    (dict(images=[]), "images"),
])
def test_generation_rejects_malformed_fields_naming_them(bad, field):
    with pytest.raises(ValidationError) as err:
        generation(**bad)
    assert field in str(err.value)


def test_generation_checks_consistency_of_k_n_and_ranks():
    with pytest.raises(ValidationError, match="k must be at most n"):
        GenerationParams(n=2, k=3, steps=1, guidance=0.0, seed=0)
    with pytest.raises(ValidationError, match="images must hold params.k=2"):
        generation(images=[GeneratedImage(image_id="a", uri="file:///a.png", rank=1, reward=0.0)])
    with pytest.raises(ValidationError, match="ranks must be 1..2"):
        generation(images=[GeneratedImage(image_id="a", uri="file:///a.png", rank=1, reward=0.0),
                           GeneratedImage(image_id="b", uri="file:///b.png", rank=1, reward=0.0)])
    two = [GeneratedImage(image_id=f"i{r}", uri=f"file:///i{r}.png", rank=r, reward=0.0, candidate_index=c, seed=r,
                          shown_probability=1.0) for r, c in ((1, 3), (2, 3))]
    with pytest.raises(ValidationError, match="candidate_index values must be distinct"):
        generation(images=two)
    with pytest.raises(ValidationError, match="candidate_index must be below params.n=4"):
        generation(images=[two[0].model_copy(update={"candidate_index": 4}), two[1].model_copy(update={"candidate_index": 0})])
    with pytest.raises(ValidationError, match="candidate_rewards must hold params.n=4"):
        generation(candidate_rewards=[0.1])
    with pytest.raises(ValidationError, match="finite"):
        GeneratedImage(image_id="a", uri="file:///a.png", rank=1, reward=float("nan"))
    with pytest.raises(ValidationError, match="steps"):
        GenerationParams(n=1, k=1, steps=151, guidance=0.0, seed=0)


def test_version_2_names_the_reward_model_and_each_candidate_and_version_1_stays_readable():
    with pytest.raises(ValidationError, match="name their reward_model"):
        generation(reward_model=None)
    bare = [GeneratedImage(image_id=f"i{r}", uri=f"file:///i{r}.png", rank=r, reward=0.0) for r in (1, 2)]
    with pytest.raises(ValidationError, match="carry candidate_index, seed and shown_probability"):
        generation(images=bare)
    # An event a /1 producer wrote (before the reward model was versioned) still parses.
    old = {k: v for k, v in json.loads(generation().to_json()).items() if k != "reward_model"}
    old["schema"] = "alignloop.generation/1"
    old["images"] = [{k: v for k, v in image.items() if k in ("image_id", "uri", "rank", "reward")} for image in old["images"]]
    parsed = parse_event(json.dumps(old))
    assert parsed.schema_ == "alignloop.generation/1" and parsed.reward_model is None
    assert parsed.images[0].candidate_index is None


def test_strict_types_and_frozen_events():
    with pytest.raises(ValidationError):
        GenerationParams(n="4", k=2, steps=20, guidance=7.5, seed=1)  # no silent coercion
    event = feedback()
    with pytest.raises(ValidationError):
        event.vote = "down"  # an event valid when built stays valid until it is serialized


def test_parse_event_rejects_malformed_json():
    good = json.loads(feedback().to_json())
    for bad in ({**good, "vote": "maybe"}, {**good, "schema": "alignloop.feedback/2"},
                {**good, "event_id": "not-a-uuid"}, {**good, "user_id": "alice"},
                {k: v for k, v in good.items() if k != "image_id"}):
        with pytest.raises(ValidationError):
            parse_event(json.dumps(bad))
    with pytest.raises(ValidationError):
        parse_event(b"not json")


def test_published_schemas_equal_what_the_models_generate():
    generated = events.json_schemas()
    published = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    assert published == generated, "run `alignloop feedback schemas` and commit deploy/schemas"


def test_published_schema_validates_events_and_rejects_extras():
    schema = json.loads((SCHEMAS / "alignloop.generation-2.schema.json").read_text())
    instance = json.loads(generation(user_hash=hash_user_id("u")).to_json())
    jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**instance, "user_id": "alice"}, schema)


def test_user_hash_is_keyed_hmac_never_the_raw_id(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_USER_HASH_KEY", "key-one")
    events._user_hash_key.cache_clear()
    first = hash_user_id("alice")
    assert first == hash_user_id("alice") and len(first) == 64 and "alice" not in first
    assert first != hash_user_id("bob")
    monkeypatch.setenv("ALIGNLOOP_USER_HASH_KEY", "key-two")
    events._user_hash_key.cache_clear()
    assert hash_user_id("alice") != first  # without the key the hash cannot be recomputed from a guessed id
    events._user_hash_key.cache_clear()
    with pytest.raises(ValueError):
        hash_user_id("")
    assert feedback(user_hash=first).user_hash == first
    assert uuid.UUID(str(feedback().event_id))
