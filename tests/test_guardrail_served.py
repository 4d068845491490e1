"""The guardrail decides from what simulated users do through the HTTP API (issue 13's must-show).

One real service (Kafka, registry, admin token) serves a canary rollout; simulated users with their own ids
generate through /generate and vote through /feedback, thumbs-up with a probability set per adapter (that is what
"B is truly better" means here); `alignloop.guardrail.watch(once=True)` reads the real topics and acts on the
registry. Each scenario looks again after every round of traffic, as the watcher does in production:

    B 10 points better  -> promoted          B 10 points worse -> rolled back
    B equal             -> never promoted    fewer votes than the minimum -> no decision
    a reward head that loves what users hate (it scores B's images above A's while users vote B down)
                        -> rolled back as reward hacking
"""

import base64
import copy
import io
import random
import time
import uuid
from types import SimpleNamespace

import pytest
import requests
import torch
from PIL import Image

from alignloop.feedback.config import Topics
from alignloop.guardrail import GuardrailConfig, watch
from alignloop.registry import Registry

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "guardrail-test-" + uuid.uuid4().hex
PROMPTS = ["two circles", "one square", "three triangles", "one red circle on a white background"]
CONFIG = GuardrailConfig(min_votes=150, poll_s=1.0, lookback_s=5.0)
ROUND = 40  # requests between looks: 4 votes each, ~80 per arm at share 0.5


@pytest.fixture(scope="module")
def service(kafka_broker, tmp_path_factory):
    from service_fixtures import start_server, stop_server

    home = tmp_path_factory.mktemp("guardrail-served")
    prefix = f"guard-{uuid.uuid4().hex[:8]}."
    topics = kafka_broker.create_topics(Topics().prefixed(prefix))
    # A fixed user-hash key makes which arm each simulated user lands in (and so every count) the same on every run:
    # with a fresh random key, equal arms crossed the promotion bar by chance in about 1 run of 100 (one CI run did)
    process, url, log_path = start_server(home, kafka_broker.bootstrap, prefix, {
        "ALIGNLOOP_USER_HASH_KEY": "guardrail-test-user-hash-key",
        "ALIGNLOOP_ADMIN_TOKEN": ADMIN_TOKEN, "ALIGNLOOP_SERVE_ROLLOUT_POLL_S": "0.5",
        "ALIGNLOOP_SERVE_REWARD_POLL_S": "1", "ALIGNLOOP_SERVE_EXPLORE_PROBABILITY": "0"})
    try:
        yield SimpleNamespace(url=url, home=home, registry=Registry(home / "registry"), topics=topics,
                              bootstrap=kafka_broker.bootstrap, log_path=log_path)
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def base_unet():
    from alignloop.models import load_generator

    return load_generator(device="cpu").unet


def open_canary(service, base_unet, tmp_path, seed: int, lora_std: float = 0.1):
    """A new adapter (a random LoRA with weights of sd `lora_std`: different images) as canary B beside whatever is
    live, once the worker serves it. Returns the rollout."""
    from alignloop import rollout
    from alignloop.adapters import adapter_config_record, base_model_identity, lora_config, save_adapter

    current = rollout.current_rollout(service.registry)
    if current is not None and len(current.arms) > 1:  # an undecided canary of an earlier scenario
        rollout.rollback(service.registry, "test", "the scenario ended undecided")
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(lora_config(4), adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * lora_std)
    folder = save_adapter(unet, tmp_path / f"adapter-{seed}", "made").parent
    manifest = rollout.publish_adapter(service.registry, folder, base=base_model_identity("shapes-sd-tiny"),
                                       config=adapter_config_record(unet.peft_config["made"]), who="test",
                                       why="a canary for the guardrail")
    new = rollout.start_canary(service.registry, manifest.version, 0.5, "test", "guardrail scenario")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worker = requests.get(service.url + "/admin/rollout", timeout=30,
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["worker"]
        if worker.get("rollout_id") == new.id:
            return new
        time.sleep(0.2)
    raise AssertionError(f"the worker never served rollout {new.id}:\n{service.log_path.read_text()[-3000:]}")


def drive(service, requests_count: int, p_up: dict, rng: random.Random) -> list:
    """Simulated users: generate (4 images), vote on every image, up with probability p_up[adapter]. Returns
    (prompt, response) pairs."""
    responses = []
    for _ in range(requests_count):
        user = f"user-{rng.randrange(500)}"
        body = {"prompt": rng.choice(PROMPTS), "n": 4, "k": 4, "steps": 2, "user_id": user}
        result = requests.post(service.url + "/generate", json=body, timeout=120)
        assert result.status_code == 200, result.text
        result = result.json()
        responses.append((body["prompt"], result))
        for image in result["images"]:
            vote = "up" if rng.random() < p_up[result["adapter"]] else "down"
            answer = requests.post(service.url + "/feedback", timeout=60,
                                   json={"feedback_token": image["feedback_token"], "vote": vote, "user_id": user})
            assert answer.status_code == 202, answer.text
    return responses


def look(service):
    return watch(service.bootstrap, service.topics, str(service.registry.url), CONFIG, once=True, who="test-guardrail")


def run_until_decided(service, rollout, p_b: float, rng, max_rounds: int = 12):
    """Rounds of traffic (A's users like 50 % of what they see, B's `p_b`), a look after each; the first decision that
    acts, or the last look."""
    a, b = rollout.arm("A").adapter, rollout.arm("B").adapter
    decision = None
    for _ in range(max_rounds):
        drive(service, ROUND, {a: 0.5, b: p_b}, rng)
        decision = look(service)
        if decision.action != "none":
            return decision
    return decision


def test_better_canary_is_promoted_worse_rolled_back_equal_never_promoted(service, base_unet, tmp_path):
    rng = random.Random(0)
    # Below the minimum sample: no decision, whatever the counts say so far.
    rollout = open_canary(service, base_unet, tmp_path, seed=1)
    drive(service, 10, {rollout.arm("A").adapter: 0.1, rollout.arm("B").adapter: 0.9}, rng)
    early = look(service)
    assert early.action == "none" and "waiting for votes" in early.reason, early

    # 10 points better: promoted, and the registry says so with the numbers.
    decision = run_until_decided(service, rollout, 0.6, rng)
    assert decision.action == "promote", decision
    b = rollout.arm("B").adapter
    assert service.registry.live("adapter").version == b
    assert "P(B" in service.registry.get("adapter", b).reason

    # 10 points worse: rolled back; the live adapter stays.
    rollout = open_canary(service, base_unet, tmp_path, seed=2)
    decision = run_until_decided(service, rollout, 0.4, rng)
    assert decision.action == "rollback", decision
    assert service.registry.get("adapter", rollout.arm("B").adapter).state == "retired"
    assert service.registry.live("adapter").version == b

    # Equal: never promoted over as many looks.
    rollout = open_canary(service, base_unet, tmp_path, seed=3)
    decision = run_until_decided(service, rollout, 0.5, rng, max_rounds=6)
    assert decision.action != "promote", decision


def _train_head_preferring(service, images_by_adapter: dict, liked: str):
    """A reward head that scores the `liked` adapter's images high and the others low, published live."""
    from alignloop.models import load_clip
    from alignloop.rewards.head import RewardHead, save_head
    from alignloop.rewards.scorer import clip_hash

    clip = load_clip(device="cpu")
    images, labels, prompts = [], [], []
    for adapter, rows in images_by_adapter.items():
        for image, prompt in rows:
            images.append(image)
            prompts.append(prompt)
            labels.append(1.0 if adapter == liked else 0.0)
    image_emb = clip.encode_images(images).float()
    text_emb = clip.encode_texts(prompts).float()
    torch.manual_seed(0)
    head = RewardHead(embed_dim=clip.embed_dim, hidden=(32, 32))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    target = torch.tensor(labels)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.stack([head.logits(i[None], t[None])[0] for i, t in zip(image_emb, text_emb)]), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = save_head(head, service.home / "hacking-head.safetensors",
                     metadata={"clip": clip.name, "clip_hash": clip_hash(clip)})
    return service.registry.publish("reward", {"head.safetensors": path}, state="live", who="test",
                                    base={"clip": clip.name, "clip_hash": clip_hash(clip), "embed_dim": clip.embed_dim},
                                    why="a head that loves what users hate")


def test_reward_hacking_is_rolled_back(service, base_unet, tmp_path):
    rng = random.Random(1)
    # B's LoRA is strong so that a head can tell its images from A's on images it was not trained on: A is the
    # adapter the first scenario promoted when the file runs whole, and two weak random LoRAs look alike (a head
    # trained on 16 requests' images separated them by only 0.19 sd live, under the 0.2 sd the rule needs).
    rollout = open_canary(service, base_unet, tmp_path, seed=4, lora_std=0.3)
    a, b = rollout.arm("A").adapter, rollout.arm("B").adapter
    # 1. A head trained to love B's images (users will like B less).
    seen = {a: [], b: []}
    for prompt, response in drive(service, 32, {a: 0.5, b: 0.5}, rng):
        for image in response["images"]:
            pixels = Image.open(io.BytesIO(base64.b64decode(image["image"]))).convert("RGB")
            seen[response["adapter"]].append((pixels, prompt))
    assert seen[a] and seen[b]
    head = _train_head_preferring(service, seen, liked=b)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranked_by = drive(service, 1, {a: 0.5, b: 0.5}, rng)[0][1]["reward_model"]
        if ranked_by == f"reward:{head.version}":
            break
    assert ranked_by == f"reward:{head.version}", service.log_path.read_text()[-3000:]
    # 2. B's images now score higher while users vote B down: rolled back as reward hacking.
    decision = run_until_decided(service, rollout, 0.35, rng)
    assert decision.action == "rollback" and "reward hacking" in decision.reason.lower(), decision
    assert service.registry.get("adapter", b).state == "retired"
