"""The generator interface: tiny UNet and FluxFill-shaped wiring at toy width, on CPU."""

import torch

from onereward.config import load_config
from onereward.models.flux import FluxFillGenerator
from onereward.models.generator import load_generator
from onereward.models.tiny_unet import TinyUNetGenerator

PROMPTS = ["fill red circle", 'text "A7"', "extend", "remove blue square", ""]


def _batch(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    m = torch.zeros(n, 1, size, size)
    m[:, :, : size // 2] = 1
    return x, m


def test_tiny_sampling_cfg_and_rl_jump(tmp_path):
    gen = TinyUNetGenerator.build(load_config("tiny").generator, PROMPTS, 32)
    x, m = _batch()
    a = gen.sample(x, m, ["extend", "fill red circle"], steps=4, seed=3)
    b = gen.sample(x, m, ["extend", "fill red circle"], steps=4, seed=3)
    c = gen.sample(x, m, ["extend", "fill red circle"], steps=4, guidance=3.0, seed=3)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.allclose(a, c)
    assert a.abs().max() <= 1
    # the model must not see pixels under the mask: changing them changes nothing
    x2 = x.clone()
    x2[:, :, :16] = -x2[:, :, :16]
    assert torch.equal(gen.sample(x2, m, ["extend", "fill red circle"], steps=2, seed=1),
                       gen.sample(x, m, ["extend", "fill red circle"], steps=2, seed=1))

    gen.train(True)
    out = gen.denoise_then_jump(x, m, ["extend"] * 2, stop_step=2, steps=4, guidance=2.0)
    out.mean().backward()
    grads = [p.grad for p in gen.unet.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)

    gen.save(tmp_path / "g")
    assert list((tmp_path / "g" / "unet").glob("*.safetensors"))
    again = load_generator(tmp_path / "g")
    assert torch.allclose(again.sample(x, m, ["extend"] * 2, steps=2, seed=5),
                          gen.sample(x, m, ["extend"] * 2, steps=2, seed=5), atol=1e-5)


def test_slices_of_a_batch_average_to_the_whole_batchs_gradient():
    """Data-parallel pretraining (`share`): processes seeded alike draw the same times and noise, each takes its
    slice, and the mean of their gradients is the one-process gradient of the whole batch, which changes nothing
    for one process."""
    gen = TinyUNetGenerator.build(load_config("tiny").generator, PROMPTS, 32)
    gen.train(True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    m = (torch.rand(6, 1, 32, 32, generator=g) > 0.5).float()  # masks of other sizes: the weights' sums differ
    prompts = ["extend", "fill red circle", "", 'text "A7"', "remove blue square", "extend"]

    def grads(share, mask_weight):
        gen.unet.zero_grad()
        gen.text_encoder.zero_grad()
        rng = torch.Generator().manual_seed(7)
        loss = gen.training_loss(t, x, m, prompts, rng, mask_weight=mask_weight, share=share)
        loss.backward()
        state = rng.get_state()
        return loss.detach(), [p.grad.clone() for p in gen.unet.parameters()], state

    for weight in (1.0, 2.0):
        whole, want, after = grads((0, 1), weight)
        parts = [grads((r, 3), weight) for r in range(3)]
        assert all(torch.equal(p[2], after) for p in parts)  # the same draws: the processes stay in step
        assert torch.allclose(sum(p[0] for p in parts) / 3, whole, rtol=1e-4)
        for i, w in enumerate(want):
            mean = sum(p[1][i] for p in parts) / 3
            assert torch.allclose(mean, w, rtol=1e-3, atol=1e-6), (weight, i, (mean - w).abs().max())
        assert not torch.allclose(parts[0][1][-1], want[-1])  # a slice alone is not the batch

def test_bf16_sampling_stays_close_to_fp32():
    """The sampler runs under bf16 autocast where the CPU supports it (sample_autocast "auto"); its samples must
    stay close to fp32's, and "fp32" must turn it off (then two precisions give bit-different results)."""
    gen = TinyUNetGenerator.build(load_config("tiny").generator, PROMPTS, 32)
    x, m = _batch(8)
    prompts = ["extend", "fill red circle"] * 4
    gen.sample_autocast = "fp32"
    exact = gen.sample(x, m, prompts, steps=8, guidance=2.0, seed=3)
    gen.sample_autocast = "bf16"
    fast = gen.sample(x, m, prompts, steps=8, guidance=2.0, seed=3)
    assert not torch.equal(exact, fast)  # bf16 did run
    assert (fast - exact).abs().mean() < 0.01 and (fast - exact).abs().max() < 0.1
    assert fast.dtype == torch.float32
    one = gen.sample(x[:1], m[:1], prompts[:1], steps=8, guidance=2.0, seed=3)
    gen.sample_autocast = "fp32"
    one_exact = gen.sample(x[:1], m[:1], prompts[:1], steps=8, guidance=2.0, seed=3)
    assert not torch.equal(one, one_exact)
    gen.sample_autocast = "auto"  # one image at a time bf16 does not pay on CPU: fp32, bit for bit
    assert torch.equal(gen.sample(x[:1], m[:1], prompts[:1], steps=8, guidance=2.0, seed=3), one_exact)


def test_flux_fill_wiring_toy_width(tmp_path, home):
    """FluxFill-shaped classes (FluxTransformer2DModel, AutoencoderKL, CLIP + T5 encoders, FluxFillPipeline)
    at toy width: one true-CFG sampling step and one RL-style x0 jump with gradients, on CPU."""
    gen = FluxFillGenerator.build_toy(32, tuple(PROMPTS))
    x, m = _batch()
    out = gen.sample(x, m, ["fill red circle", "extend"], steps=1, guidance=2.0, negative_prompt="")
    assert out.shape == (2, 3, 32, 32)
    tr = gen.pipe.transformer
    assert tr.config.in_channels == 64 + 64 + 4 * gen.vsf**2 and tr.config.out_channels == 64
    jump = gen.denoise_then_jump(x, m, ["extend"] * 2, stop_step=1, steps=2)
    jump.pow(2).mean().backward()
    assert all(p.grad is not None for p in tr.parameters())
    loss = gen.training_loss(x, x, m, ["extend"] * 2, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)

    gen.save(tmp_path / "flux")  # FluxFillPipeline.save_pretrained layout, safetensors
    assert (tmp_path / "flux" / "model_index.json").exists()
    again = load_generator(tmp_path / "flux")
    assert isinstance(again, FluxFillGenerator)
    assert again.sample(x, m, ["extend"] * 2, steps=1).shape == (2, 3, 32, 32)


def test_flux_loads_from_s3_with_lora(tmp_path, home, s3_bucket):
    import pyarrow.fs as pafs

    from onereward import storage

    FluxFillGenerator.build_toy(32, tuple(PROMPTS)).save(tmp_path / "flux")
    fs, path = storage.resolve(f"s3://{s3_bucket}/models/flux-toy")
    pafs.copy_files(str(tmp_path / "flux"), path, destination_filesystem=fs)
    gen = FluxFillGenerator.from_pretrained(f"s3://{s3_bucket}/models/flux-toy", 32, "float32", lora_rank=4)
    trainable = list(gen.parameters())
    assert trainable and all("lora" in n for n, p in gen.pipe.transformer.named_parameters() if p.requires_grad)
    x, m = _batch()
    gen.denoise_then_jump(x, m, ["extend"] * 2, stop_step=0, steps=1).mean().backward()
    assert all(p.grad is not None for p in trainable)
