"""alignloop.rewards: the head's definition and file format, the image forms, and every reward by name."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignloop.kernels import HeadConfig
from alignloop.rewards import RewardHead, RewardScorer, clip_hash, get_reward, load_head, save_head
from alignloop.rewards.head import read_head_metadata
from alignloop.rewards.images import to_uint8
from alignloop.world import Prompt, render


@pytest.fixture(scope="module")
def clip():
    from alignloop.models import load_clip
    return load_clip(device="cpu", dtype=torch.float32)


def _renders(prompts, seed=0):
    rng = random.Random(seed)
    return np.stack([render(p, rng, avoid_unseen=False) for p in prompts])


# -- the head: definition and file format ------------------------------------------------------------------


def test_head_matches_its_definition():
    torch.manual_seed(0)
    head = RewardHead(embed_dim=8, hidden=(32, 16)).eval()
    image, text = torch.randn(5, 8) * 3, torch.randn(1, 8) * 7
    x = torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1).expand(5, -1)], dim=-1)
    l1, l2, l3 = head.linears()
    expected = torch.sigmoid(l3(torch.relu(l2(torch.relu(l1(x))))).squeeze(-1))
    torch.testing.assert_close(head(image, text), expected)
    torch.testing.assert_close(head.logits(image, text), torch.logit(expected), atol=1e-5, rtol=0)
    # Scale invariance of the embeddings: only their directions matter.
    torch.testing.assert_close(head(image * 10, text * 0.1), expected)
    # A [1, D] text row is the same as that row repeated.
    torch.testing.assert_close(head(image, text.expand(5, -1).clone()), expected)
    assert head.hidden == (32, 16) and len(head.linears()) == 3


def test_default_head_is_lee_et_al():
    head = RewardHead()
    assert head.embed_dim == 768 and head.hidden == (1024, 1024)
    assert [tuple(lin.weight.shape) for lin in head.linears()] == [(1024, 1536), (1024, 1024), (1, 1024)]


@pytest.mark.parametrize("kwargs, message", [
    ({"embed_dim": 1025}, "embed_dim must be an integer in 1..1024, got 1025"),
    ({"embed_dim": 0}, "embed_dim must be an integer in 1..1024, got 0"),
    ({"hidden": (1024, 1000)}, "hidden[1] must be a multiple of 16 in 16..2048, got 1000"),
    ({"hidden": (4096,)}, "hidden[0] must be a multiple of 16 in 16..2048, got 4096"),
    ({"hidden": (0,)}, "hidden[0] must be a multiple of 16 in 16..2048, got 0"),
    ({"hidden": ()}, "hidden must name at least one hidden layer width"),
])
def test_head_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        RewardHead(**kwargs)
    assert message in str(err.value)


def test_head_input_errors():
    head = RewardHead(embed_dim=8, hidden=(16, 16))
    with pytest.raises(ValueError, match=r"image_emb must have 8 columns .* got shape \(2, 9\)"):
        head(torch.randn(2, 9), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"text_emb must have 1 row .* \(3\), got 2"):
        head(torch.randn(3, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"image_emb must be 2-D"):
        head(torch.randn(8), torch.randn(1, 8))
    with pytest.raises(TypeError, match=r"text_emb must be floating point"):
        head(torch.randn(2, 8), torch.ones(1, 8, dtype=torch.int64))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    head = RewardHead(embed_dim=24, hidden=(48, 32)).eval()
    path = save_head(head, tmp_path / "head.safetensors", metadata={"trained_on": "offsets 0..99"})
    loaded = load_head(path)
    assert loaded.config == HeadConfig(24, (48, 32))
    image, text = torch.randn(4, 24), torch.randn(1, 24)
    torch.testing.assert_close(loaded(image, text), head(image, text), rtol=0, atol=0)
    assert read_head_metadata(path)["trained_on"] == "offsets 0..99"
    half = load_head(path, dtype=torch.float16)
    assert half.linears()[0].weight.dtype == torch.float16


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="reward head weights not found"):
        load_head(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a reward head saved by alignloop"):
        load_head(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_head(tmp_path / "junk.safetensors")
    # Weights of another shape than the metadata declares, and non-finite weights: errors, not a silent init.
    path = save_head(RewardHead(8, (16, 16)), tmp_path / "head.safetensors")
    metadata = read_head_metadata(path)
    wrong = {k: v for k, v in RewardHead(8, (32, 16)).state_dict().items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"(?s)does not match the head shape its metadata declares .*size mismatch"):
        load_head(tmp_path / "wrong.safetensors")
    nan = {k: v.clone() for k, v in RewardHead(8, (16, 16)).state_dict().items()}
    nan["mlp.2.weight"][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"non-finite weights in mlp.2.weight"):
        load_head(tmp_path / "nan.safetensors")


# -- image forms --------------------------------------------------------------------------------------------


def test_the_three_image_forms_give_the_same_pixels_and_bad_forms_are_named():
    arrays = _renders([Prompt("count", 2, "square"), Prompt("color", 1, "circle", color="red")])
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    pil = [Image.fromarray(a) for a in arrays]
    for form in (arrays, tensor, pil):
        assert np.array_equal(to_uint8(form), arrays)
    with pytest.raises(TypeError, match=r"images as a numpy array must be uint8 \[B, H, W, 3\], got dtype float32"):
        to_uint8(arrays.astype(np.float32))
    with pytest.raises(ValueError, match=r"images as a tensor must have values in \[0, 1\], got min 30 and max 220"):
        to_uint8(tensor * 255)
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL image"):
        to_uint8([pil[0], "not an image"])


# -- rewards by name ----------------------------------------------------------------------------------------


def test_unknown_reward_and_bad_calls_are_named():
    with pytest.raises(ValueError, match=r"reward must be one of clip, color_diversity, learned, oracle, got 'human'"):
        get_reward("human")
    reward = get_reward("oracle")
    images = _renders([Prompt("count", 1, "square")] * 2)
    with pytest.raises(ValueError, match=r"one entry per image: 2 images, got 1 prompts"):
        reward(images, ["one square"])
    with pytest.raises(TypeError, match=r"prompts must be a list of 2 strings"):
        reward(images, "one square")
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty string, got ' '"):
        reward(images, ["one square", " "])


def test_oracle_reward_passes_a_render_and_fails_a_wrong_one():
    right = Prompt("combination", 2, "square", color="red", background="black")
    wrong = Prompt("combination", 3, "square", color="red", background="black")
    images = _renders([right, right])
    scores, info = get_reward("oracle")(images, [right.text, wrong.text])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]
    assert info["verdicts"][0] == {"count": True, "color": True, "shape": True, "background": True, "passed": True,
                                   "found_count": 2}
    assert info["verdicts"][1]["count"] is False and info["verdicts"][1]["passed"] is False
    assert info["verdicts"][1]["found_count"] == 2  # two drawn, three asked for
    # Any of the three image forms.
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert get_reward("oracle")(as_tensor, [right.text, wrong.text])[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"only prompts of the shapes world: prompts\[1\] = 'a dog on a skateboard' "
                                         r"is not one \(1 of 2 are not\)"):
        get_reward("oracle")(images, [right.text, "a dog on a skateboard"])


def test_clip_reward_is_the_scorers_clip_score_prompt_by_prompt(clip):
    prompts = [Prompt("count", 2, "circle"), Prompt("color", 1, "square", color="green"), Prompt("count", 2, "circle")]
    images = _renders(prompts)
    texts = [p.text for p in prompts]
    scores, info = get_reward("clip", clip=clip, backend="torch")(images, texts)
    scorer = RewardScorer(clip, backend="torch")
    pil = [Image.fromarray(a) for a in images]
    expected = torch.cat([scorer.score(pil[0:1], texts[0]), scorer.score(pil[1:2], texts[1]),
                          scorer.score(pil[2:3], texts[2])])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and info["reward"] == "clip"
    # A render scores higher against its own prompt than against a contradicting one.
    swapped = get_reward("clip", clip=clip, backend="torch")(images[:2], [texts[1], texts[0]])[0]
    assert bool((scores[:2] > swapped).all())


def test_learned_reward_loads_a_saved_head_and_checks_its_clip(clip, tmp_path):
    torch.manual_seed(0)
    head = RewardHead(clip.embed_dim, (32, 32)).eval()
    path = save_head(head, tmp_path / "head.safetensors", metadata={"clip": clip.name, "clip_hash": clip_hash(clip)})
    prompts = [Prompt("count", 3, "triangle"), Prompt("count", 1, "square")]
    images = _renders(prompts)
    texts = [p.text for p in prompts]
    scores, info = get_reward("learned", path=path, clip=clip, backend="torch")(images, texts)
    scorer = RewardScorer(clip, head, backend="torch")
    expected = torch.cat([scorer.score(images[i:i + 1], texts[i]) for i in range(2)])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert info["reward"] == "learned" and info["version"] is None and info["path"] == str(path)
    assert bool(((scores > 0) & (scores < 1)).all())
    # A folder holding head.safetensors works too; a head trained on another CLIP's embeddings does not.
    assert torch.equal(get_reward("learned", path=tmp_path, clip=clip, backend="torch")(images, texts)[0], scores)
    save_head(head, tmp_path / "other.safetensors", metadata={"clip": "ViT-L-14", "clip_hash": "0123abcd"})
    with pytest.raises(ValueError, match=r"trained on embeddings of another CLIP \('ViT-L-14', hash 0123abcd\)"):
        get_reward("learned", path=tmp_path / "other.safetensors", clip=clip)
    with pytest.raises(ValueError, match=r"learned_reward takes one source .*got head, path"):
        get_reward("learned", head=head, path=path, clip=clip)


def test_learned_reward_from_the_registry_records_the_version(clip, tmp_path):
    from alignloop.registry import Registry

    url = str(tmp_path / "registry")
    with pytest.raises(LookupError, match=r"has no live reward model: train one with `alignloop train reward"):
        get_reward("learned", registry=url, clip=clip)
    torch.manual_seed(0)
    heads = [RewardHead(clip.embed_dim, (16, 16)).eval() for _ in range(2)]
    registry = Registry(url)
    for i, head in enumerate(heads):
        path = save_head(head, tmp_path / f"head{i}.safetensors", metadata={"clip_hash": clip_hash(clip)})
        registry.publish(kind="reward", files={"head.safetensors": path}, state="live" if i == 0 else "candidate",
                         who="test", why="test")
    images, texts = _renders([Prompt("count", 2, "square")]), ["two squares"]
    live_scores, live_info = get_reward("learned", registry=url, clip=clip, backend="torch")(images, texts)
    assert live_info["version"] == "v000001"
    torch.testing.assert_close(live_scores, RewardScorer(clip, heads[0], backend="torch").score(images, texts[0]))
    _, info = get_reward("learned", registry=url, version="v000002", clip=clip, backend="torch")(images, texts)
    assert info["version"] == "v000002"


def test_color_diversity_rewards_colors_the_batch_lacks():
    shape = "square"
    open_color = Prompt("count", 1, shape)  # leaves the color open
    from alignloop.world.render import Scene, render_scene

    def scene(color):
        return render_scene(Scene(shape, color, "black", ((8, 8, 12),)))

    reward = get_reward("color_diversity")
    mono = np.stack([scene("red")] * 4)
    diverse = np.stack([scene(c) for c in ("red", "green", "blue", "purple")])
    mono_scores, mono_info = reward(mono, [open_color.text] * 4)
    diverse_scores, diverse_info = reward(diverse, [open_color.text] * 4)
    assert diverse_scores.mean() > mono_scores.mean()
    assert diverse_info["colors"] == ["red", "green", "blue", "purple"] and mono_info["distribution"]["red"] == 1.0
    # Exactly 1/K - p(color): four distinct of K=7 colors -> 1/7 - 1/4 each; one color only -> 1/7 - 1.
    torch.testing.assert_close(diverse_scores, torch.full((4,), 1 / 7 - 1 / 4))
    torch.testing.assert_close(mono_scores, torch.full((4,), 1 / 7 - 1))
    # The batch mean is the negated square of the statistical parity (Zhang et al. eq. 12).
    skewed = np.stack([scene("red"), scene("red"), scene("red"), scene("cyan")])
    scores, info = reward(skewed, [open_color.text] * 4)
    assert scores[3] > scores[0] and abs(float(scores.mean()) + info["parity"] ** 2) < 1e-6
    # The rare color within a batch scores above the common one; prompts that name a color are left out at 0.
    scores, info = reward(skewed, [open_color.text] * 3 + ["a cyan square"])
    assert scores[3] == 0 and info["counted"] == [True, True, True, False] and info["distribution"]["red"] == 1.0
    # An image with nothing drawn scores the floor.
    blank = np.zeros((1, 32, 32, 3), np.uint8)
    assert reward(blank, [open_color.text])[0].item() == pytest.approx(1 / 7 - 1)
