"""The training paths clipforge takes on a CUDA GPU: bf16 autocast through ``TrainStep``, the fused
AdamW kernel of ``build_optimizer``, SDPA's fused attention kernels for every attention call of a
training step, gradient checkpointing and ``torch.compile`` through ``setup.wrap_model``.
Skipped without CUDA; ``benchmarks/gpu/run.sh`` runs them on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import clipforge
from clipforge.model.layers import attend
from clipforge.train.config import OptimConfig, TrainConfig
from clipforge.train.distributed import DistInfo
from clipforge.train.loss import ContrastiveLoss
from clipforge.train.optim import build_optimizer, param_groups
from clipforge.train.setup import prepare_model, wrap_model
from clipforge.train.step import TrainStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def batch(model, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    s = model.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, s, s, generator=g)
    tokens = clipforge.tokenize([f"a photo of thing number {i} on a table" for i in range(n)],
                                context_length=model.config.text.context_length)
    return images.to(CUDA), tokens.to(CUDA)


def loss_of(model, images, tokens) -> torch.Tensor:
    out = model(images, tokens)
    return ContrastiveLoss()(out.image_features.float(), out.text_features.float(), out.logit_scale.float())


def model_on_cuda(name: str = "tiny"):
    return clipforge.create_model(name, seed=0).to(CUDA).train()


def test_bf16_autocast_step_runs_the_towers_in_bf16_and_trains():
    model = model_on_cuda()
    images, tokens = batch(model, 16)
    with torch.no_grad():
        fp32_loss = float(loss_of(model, images, tokens))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert model.encode_image(images).dtype == torch.bfloat16  # the matmuls ran in bf16
            assert model.encode_text(tokens).dtype == torch.bfloat16
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, build_optimizer(model, OptimConfig(lr=1e-3)), precision="bf16", device=CUDA)
    result = step.step([(images, tokens)])
    assert result.applied and torch.isfinite(torch.tensor(result.loss))
    assert abs(result.loss - fp32_loss) < 2e-2 * fp32_loss  # bf16 rounding, not another computation
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2


def test_build_optimizer_uses_the_fused_adamw_kernel_with_the_same_updates():
    model = model_on_cuda()
    ref = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.2)
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    ref_opt = torch.optim.AdamW(param_groups(ref.named_parameters(), cfg.weight_decay), lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    for seed in range(3):
        images, tokens = batch(model, 8, seed)
        opt.zero_grad(set_to_none=True)
        loss_of(model, images, tokens).backward()
        for a, b in zip(model.parameters(), ref.parameters()):  # the same gradients: only the optimizers differ
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def _reference_attention(q, k, v, causal=False, mask=None):
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_attend_runs_on_the_fused_sdpa_kernels(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=CUDA).manual_seed(0)
    shapes = {"image": ((4, 12, 197, 64), False), "text": ((4, 8, 30, 64), True)}  # ViT-B/16, captions
    for (shape, causal) in shapes.values():
        q, k, v = (torch.randn(shape, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(3))
        with sdpa_kernel(getattr(SDPBackend, backend)):  # raises if this kernel cannot take the call
            out = attend(q, k, v, causal)
        torch.testing.assert_close(out, _reference_attention(q, k, v, causal), rtol=2e-2, atol=2e-2)
    if backend == "EFFICIENT_ATTENTION":  # the pooled last block: one query per sequence, a key mask
        q1 = q[:, :, :1]
        mask = (torch.arange(30, device=CUDA) < torch.randint(5, 30, (4, 1), device=CUDA)).view(4, 1, 1, 30)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = attend(q1, k, v, mask=mask)
        torch.testing.assert_close(out, _reference_attention(q1, k, v, mask=mask), rtol=2e-2, atol=2e-2)


def test_no_attention_call_of_a_bf16_training_step_falls_back_to_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model_on_cuda()
    images, tokens = batch(model, 8)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, images, tokens)
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def _grads_and_peak(model, images, tokens) -> tuple[list[torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_of(model, images, tokens).backward()
    torch.cuda.synchronize()
    return [p.grad.detach().clone() for p in model.parameters()], torch.cuda.max_memory_allocated() - base


def test_gradient_checkpointing_gives_the_same_gradients_in_less_memory():
    model = model_on_cuda("small")
    images, tokens = batch(model, 64)
    plain, plain_peak = _grads_and_peak(model, images, tokens)
    model.set_grad_checkpointing(True)
    ckpt, ckpt_peak = _grads_and_peak(model, images, tokens)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ckpt_peak < 0.8 * plain_peak, (ckpt_peak, plain_peak)


@pytest.mark.timeout(300)
def test_compiled_model_through_wrap_model_matches_eager():
    cfg = TrainConfig(compile=True)
    raw = model_on_cuda()
    eager = copy.deepcopy(raw)
    prepare_model(cfg, raw)
    module, replicated = wrap_model(raw, cfg, DistInfo(rank=0, local_rank=0, world_size=1, device=CUDA), CUDA)
    assert not replicated
    images, tokens = batch(raw, 16)
    for m in (module, eager):
        loss_of(m, images, tokens).backward()
    a, b = loss_of(module, images, tokens), loss_of(eager, images, tokens)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(raw.named_parameters(), eager.parameters()):  # names unchanged by compiling
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
