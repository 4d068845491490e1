"""The PyTorch reference: head shape and validation, grouped top-k semantics, weight save/load."""

import pytest
import torch
import torch.nn.functional as F

from alignloop.kernels import HeadConfig, RewardHead, grouped_topk, grouped_topk_reference, load_head, save_head


def test_head_matches_its_definition():
    torch.manual_seed(0)
    head = RewardHead(embed_dim=8, hidden=(32, 16)).eval()
    image, text = torch.randn(5, 8) * 3, torch.randn(1, 8) * 7
    x = torch.cat([F.normalize(image, dim=-1), F.normalize(text, dim=-1).expand(5, -1)], dim=-1)
    l1, l2, l3 = head.linears()
    expected = torch.sigmoid(l3(torch.relu(l2(torch.relu(l1(x))))).squeeze(-1))
    torch.testing.assert_close(head(image, text), expected)
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


def test_grouped_topk_orders_and_breaks_ties_by_lower_index():
    rewards = torch.tensor([0.5, 0.9, 0.5, 0.1,    # group 0: a tie at 0.5 between indices 0 and 2
                            0.3, 0.3, 0.3, 0.3,    # group 1: all tied
                            -1.0, float("-inf"), 2.0, -1.0])
    values, indices = grouped_topk_reference(rewards, n=4, k=3)
    assert indices.tolist() == [[1, 0, 2], [0, 1, 2], [2, 0, 3]]
    torch.testing.assert_close(values, torch.tensor([[0.9, 0.5, 0.5], [0.3, 0.3, 0.3], [2.0, -1.0, -1.0]]))
    assert indices.dtype == torch.int64 and values.dtype == torch.float32


def test_grouped_topk_edges_n1_and_k_equals_n():
    rewards = torch.tensor([0.2, 0.7, 0.4])
    values, indices = grouped_topk_reference(rewards, n=1, k=1)
    assert values.shape == (3, 1) and indices.tolist() == [[0], [0], [0]]
    values, indices = grouped_topk_reference(rewards, n=3, k=3)
    assert indices.tolist() == [[1, 2, 0]]
    # The public entry point takes the reference on CPU.
    assert grouped_topk(rewards, 3, 3)[1].tolist() == [[1, 2, 0]]


@pytest.mark.parametrize("n, k, numel, message", [
    (4, 5, 8, "k must be an integer in 1..n (n=4), got 5"),
    (4, 0, 8, "k must be an integer in 1..n (n=4), got 0"),
    (3, 1, 8, "rewards has 8 elements, which is not divisible by n=3"),
    (0, 1, 8, "n (samples per group) must be an integer >= 1, got 0"),
])
def test_grouped_topk_errors(n, k, numel, message):
    with pytest.raises(ValueError) as err:
        grouped_topk(torch.rand(numel), n, k)
    assert message in str(err.value)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    head = RewardHead(embed_dim=24, hidden=(48, 32)).eval()
    path = save_head(head, tmp_path / "head.safetensors", metadata={"trained_on": "offsets 0..99"})
    loaded = load_head(path)
    assert loaded.config == HeadConfig(24, (48, 32))
    image, text = torch.randn(4, 24), torch.randn(1, 24)
    torch.testing.assert_close(loaded(image, text), head(image, text), rtol=0, atol=0)
    from alignloop.kernels.weights import read_head_metadata
    assert read_head_metadata(path)["trained_on"] == "offsets 0..99"
    half = load_head(path, dtype=torch.float16)
    assert half.linears()[0].weight.dtype == torch.float16


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward head weights not found"):
        load_head(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a reward head saved by alignloop"):
        load_head(tmp_path / "other.safetensors")
