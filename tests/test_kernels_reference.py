"""The PyTorch reference of grouped top-k: its semantics and errors. (The head's definition and file format
are tested in test_rewards.py, where they live.)"""

import pytest
import torch

from alignloop.kernels import grouped_topk, grouped_topk_reference


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
