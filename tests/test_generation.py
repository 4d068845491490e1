"""The one generation path: a seed gives the same image alone or batched, in `generate`, `world eval` and the
`alignloop generate` command; its starting noise comes from a CPU generator seeded with it."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from alignloop.generation import generate
from alignloop.models import load_generator

STEPS, GUIDANCE = 6, 5.0


@pytest.fixture(scope="module")
def pipe():
    return load_generator(device="cpu")


def test_same_seed_same_image_alone_and_in_a_batch_of_mixed_prompts(pipe):
    alone = generate(pipe, ["two red circles on a gray background"], [1234], STEPS, GUIDANCE, output_type="uint8")
    batch = generate(pipe, ["a blue square", "two red circles on a gray background", "three green triangles"],
                     [7, 1234, 99], STEPS, GUIDANCE, output_type="uint8")
    assert alone.shape == (1, 32, 32, 3) and alone.dtype == np.uint8
    assert np.abs(alone[0].astype(int) - batch[1].astype(int)).max() <= 1  # within one 8-bit level
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 1  # and the others are other images


def test_initial_latents_come_from_a_cpu_generator_seeded_per_image(pipe):
    seeds = [5, 11]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if not seen else None)
    try:
        generate(pipe, ["a red circle", "four cyan squares"], seeds, STEPS, GUIDANCE)
    finally:
        hook.remove()
    first_input = seen[0][:len(seeds)]  # guidance > 1: the UNet sees [latents, latents], unconditional half first
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    for i, seed in enumerate(seeds):
        expected = torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(first_input[i:i + 1], expected * pipe.scheduler.init_noise_sigma)


def test_world_eval_and_generate_agree_for_the_same_seed(pipe, monkeypatch):
    from alignloop.world import evaluate

    judged = []
    real_judge = evaluate.judge
    def recording_judge(image, prompt):
        judged.append((image, prompt))
        return real_judge(image, prompt)

    monkeypatch.setattr(evaluate, "judge", recording_judge)
    result = evaluate.evaluate_generator(pipe, "unseen", per_prompt=2, steps=STEPS, guidance=GUIDANCE, max_prompts=2,
                                         batch_size=3, progress=False)
    images = np.stack([image for image, _ in judged])
    again = generate(pipe, [prompt.text for _, prompt in judged], result["seeds"], STEPS, GUIDANCE, output_type="uint8")
    assert np.abs(images.astype(int) - again.astype(int)).max() <= 1
    assert np.array_equal(evaluate.generate_images(pipe, [judged[0][1].text], result["seeds"][:1], STEPS, GUIDANCE),
                          again[:1])


def test_world_eval_draws_with_the_eta_it_is_given(pipe):
    from alignloop.world import evaluate

    draw = lambda eta: evaluate.draw_split_images(pipe, "unseen", 2, STEPS, GUIDANCE, 0, max_prompts=1,  # noqa: E731
                                                  progress=False, eta=eta)
    prompts, seeds, deterministic = draw(0.0)
    _, _, noisy = draw(1.0)
    assert np.array_equal(noisy, generate(pipe, [p.text for p in prompts], seeds, STEPS, GUIDANCE,
                                          output_type="uint8", eta=1.0))
    assert not np.array_equal(noisy, deterministic)


def test_generate_command_writes_the_images_generate_draws(pipe, tmp_path, capsys):
    from alignloop.generate_cli import _generate

    args = argparse.Namespace(prompt=" a yellow circle ", n=2, out=tmp_path, generator="shapes-sd-tiny", steps=STEPS,
                              guidance=GUIDANCE, seed=40, device="cpu")
    assert _generate(args) == 0
    files = sorted(tmp_path.glob("seed*.png"))
    written = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    expected = generate(pipe, ["a yellow circle"] * 2, [40, 41], STEPS, GUIDANCE, output_type="uint8")
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    assert '"adapter": null' in capsys.readouterr().out


def test_output_types(pipe):
    prompts, seeds = ["a red circle", "a blue square"], [1, 2]
    pt = generate(pipe, prompts, seeds, 2, GUIDANCE)
    as_np = generate(pipe, prompts, seeds, 2, GUIDANCE, output_type="np")
    latents = generate(pipe, prompts, seeds, 2, GUIDANCE, output_type="latent")
    assert pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32 and pt.device.type == "cpu"
    assert 0 <= pt.min() and pt.max() <= 1
    assert as_np.shape == (2, 32, 32, 3) and as_np.dtype == np.float32
    np.testing.assert_allclose(as_np, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert latents.shape == (2, 4, 16, 16)


def test_bad_input_is_named(pipe):
    with pytest.raises(ValueError, match="one seed per image"):
        generate(pipe, ["a red circle"], [1, 2], 2, GUIDANCE)
    with pytest.raises(ValueError, match="output_type must be one of"):
        generate(pipe, ["a red circle"], [1], 2, GUIDANCE, output_type="png")
    with pytest.raises(ValueError, match="negative_prompt_embeds must be"):
        generate(pipe, ["a red circle", "a blue square"], [1, 2], 2, GUIDANCE,
                 negative_prompt_embeds=torch.zeros(3, 16, 64))


def test_given_negative_embedding_of_the_empty_prompt_changes_nothing(pipe):
    _, negative = pipe.encode_prompt([""], "cpu", 1, True)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    assert torch.equal(generate(pipe, prompts, seeds, 2, GUIDANCE, negative_prompt_embeds=negative[:1]),
                       generate(pipe, prompts, seeds, 2, GUIDANCE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_image_on_cpu_and_cuda():
    cpu = load_generator(device="cpu")
    cuda = load_generator(device="cuda", dtype="fp32")
    prompts, seeds = ["two red circles on a gray background", "a blue square"], [1234, 7]
    on_cpu = generate(cpu, prompts, seeds, STEPS, GUIDANCE, output_type="uint8")
    on_cuda = generate(cuda, prompts, seeds, STEPS, GUIDANCE, output_type="uint8")
    assert np.abs(on_cpu.astype(int) - on_cuda.astype(int)).max() <= 2  # same noise; kernels differ in the last bits
