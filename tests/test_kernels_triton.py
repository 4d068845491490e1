"""The fused Triton head and the Triton grouped top-k against the PyTorch reference.

On a CPU-only machine these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes, plus one
full-size case. bf16 runs only on a GPU: the interpreter's bf16 tl.dot is wrong.
"""

import pytest
import torch

from alignloop.kernels import TritonBlocks, grouped_topk_reference
from alignloop.kernels.triton_head import fused_reward_head, interpreting
from alignloop.kernels.triton_topk import grouped_topk_triton
from alignloop.rewards import RewardHead

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(),
                                reason="needs a GPU or TRITON_INTERPRET=1")


def spread_head(embed_dim, hidden, seed=0):
    """A random head whose rewards spread over (0, 1) rather than sitting at 0.5, so parity means
    something: the last layer is scaled to give logits of standard deviation about 2."""
    torch.manual_seed(seed)
    head = RewardHead(embed_dim, hidden).eval()
    with torch.no_grad():
        probe = head.logits(torch.randn(256, embed_dim), torch.randn(1, embed_dim))
        scale = 2.0 / probe.std()
        last = head.linears()[-1]  # logit' = scale * (logit - mean)
        last.weight.mul_(scale)
        last.bias.sub_(probe.mean()).mul_(scale)
    return head


def run_both(head, batch, dtype, per_row_text=False, blocks=TritonBlocks(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, head.embed_dim, generator=gen) * 4
    text = torch.randn(batch if per_row_text else 1, head.embed_dim, generator=gen)
    # The reference in fp32 on the very values the kernel sees (rounded to `dtype`).
    low = head.to(dtype)
    image, text = image.to(dtype), text.to(dtype)
    with torch.no_grad():
        ref_head = RewardHead(head.embed_dim, head.hidden)
        ref_head.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
        expected = ref_head(image.float(), text.float())
        got = fused_reward_head(image.to(DEVICE), text.to(DEVICE), low.to(DEVICE), blocks)
    assert got.shape == (batch,) and got.dtype == torch.float32
    if batch >= 4:
        assert expected.std() > 0.05, "rewards too flat for a meaningful comparison"
    return got.cpu(), expected


SHAPES = [  # (batch, embed_dim, hidden): odd batches, dims that are no power of 2, hidden widths 16..80
    (1, 64, (64, 32)),
    (5, 64, (48, 32)),
    (16, 24, (16, 16)),
    (33, 100, (80, 48)),
    (7, 768, (64, 64)),
]


@pytest.mark.parametrize("batch, embed_dim, hidden", SHAPES)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fused_head_matches_reference(batch, embed_dim, hidden, dtype, atol):
    got, expected = run_both(spread_head(embed_dim, hidden), batch, dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_fused_head_per_row_text_and_several_batch_blocks():
    # 67 rows in blocks of 16: five batch blocks, the last one ragged; a text row per image.
    got, expected = run_both(spread_head(40, (32, 48)), 67, torch.float32, per_row_text=True,
                             blocks=TritonBlocks(block_b=16))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fused_head_full_size():
    # The widest shapes the kernel takes: embeddings of 1024, hidden 2048 x 2048. Under the interpreter
    # the cost is per tile, so larger tiles keep this affordable; the default tiles are covered above.
    blocks = TritonBlocks(block_h1=128, block_k=128, block_n=128) if DEVICE == "cpu" else TritonBlocks()
    head = spread_head(1024, (2048, 2048))
    got, expected = run_both(head, 9, torch.float32, blocks=blocks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got, expected = run_both(head, 9, torch.float16, blocks=blocks)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_fused_head_scratch_is_clean_between_launches():
    # The kernel zeroes its scratch after use: repeated and differently sized launches agree.
    head = spread_head(32, (32, 64)).to(DEVICE)
    image = torch.randn(20, 32, device=DEVICE)
    text = torch.randn(1, 32, device=DEVICE)
    first = fused_reward_head(image, text, head)
    fused_reward_head(image[:3], text, head)
    fused_reward_head(torch.randn(50, 32, device=DEVICE), text, head)
    torch.testing.assert_close(fused_reward_head(image, text, head), first, atol=0, rtol=0)
    assert fused_reward_head(image[:0], text, head).shape == (0,)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 tl.dot is wrong under the Triton interpreter: GPU only")
def test_fused_head_bf16_on_gpu():
    got, expected = run_both(spread_head(768, (1024, 1024)), 64, torch.bfloat16)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)


@pytest.mark.skipif(DEVICE == "cpu", reason="a race needs programs that really run at once: GPU only")
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [9, 16, 200])
def test_fused_head_last_program_sees_every_partial_sum_on_gpu(dtype, atol, batch):
    # 64 programs per batch block add into one scratch and the last to arrive reads it. On an H100, before
    # each thread fenced its atomics, that reader saw partial sums in fp16 and bf16 (errors up to 0.95,
    # changing from launch to launch) while fp32, whose dots are slower, passed. Repeated launches.
    head = spread_head(1024, (2048, 2048))
    for _ in range(5):
        got, expected = run_both(head, batch, dtype)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_fused_head_errors():
    head = RewardHead(16, (16, 16)).to(DEVICE)
    image = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"needs exactly 2 hidden layers, got hidden=\(16, 16, 16\)"):
        fused_reward_head(image, image[:1], RewardHead(16, (16, 16, 16)).to(DEVICE))
    with pytest.raises(TypeError, match=r"text_emb must match image_emb \(torch.float32"):
        fused_reward_head(image, image[:1].half(), head)
    with pytest.raises(TypeError, match=r"head weights must match image_emb \(torch.float16"):
        fused_reward_head(image.half(), image[:1].half(), head)
    with pytest.raises(ValueError, match=r"image_emb must have 16 columns"):
        fused_reward_head(torch.randn(2, 8, device=DEVICE), image[:1], head)


TOPK_CASES = [  # (groups, n, k)
    (1, 1, 1), (5, 1, 1), (3, 4, 4), (2, 8, 2), (4, 17, 5), (1, 64, 64), (7, 24, 3),
]


@pytest.mark.parametrize("groups, n, k", TOPK_CASES)
def test_grouped_topk_matches_reference(groups, n, k):
    gen = torch.Generator().manual_seed(groups * 100 + n)
    # Few distinct values, so most groups hold ties: the order must still match (lower index first).
    rewards = torch.randint(0, 4, (groups * n,), generator=gen).float() / 4
    values, indices = grouped_topk_triton(rewards.to(DEVICE), n, k)
    ref_values, ref_indices = grouped_topk_reference(rewards, n, k)
    assert indices.cpu().tolist() == ref_indices.tolist()
    torch.testing.assert_close(values.cpu(), ref_values, atol=0, rtol=0)


def test_grouped_topk_infinities_and_fp16():
    rewards = torch.tensor([float("-inf"), 0.5, float("-inf"), float("inf")], dtype=torch.float16)
    values, indices = grouped_topk_triton(rewards.to(DEVICE), 4, 4)
    assert indices.cpu().tolist() == [[3, 1, 0, 2]]
    assert values.dtype == torch.float16


def test_grouped_topk_triton_errors():
    with pytest.raises(ValueError, match=r"k must be an integer in 1..n \(n=4\), got 5"):
        grouped_topk_triton(torch.rand(8, device=DEVICE), 4, 5)
    with pytest.raises(ValueError, match=r"not divisible by n=3"):
        grouped_topk_triton(torch.rand(8, device=DEVICE), 3, 1)
