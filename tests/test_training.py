"""The training step on the tiny preset at 32 px: terms, gradients, EMA, ablations, reference maths."""

import copy
import math

import pytest
import torch

from targan_cli.config import preset
from targan_cli.core.training import TarGAN, Trainer, TrainConfig, derived_generator

CONFIG = preset("tiny", image_size=32)
CPU = torch.device("cpu")
D_TERMS = {"d_x_adv", "d_x_cls_real", "d_x_cls_fake", "d_x_gp", "d_total"}
D_R_TERMS = {"d_r_adv", "d_r_cls_real", "d_r_cls_fake", "d_r_gp"}
G_TERMS = {"g_x_adv", "g_x_cls", "g_x_rec", "g_total"}
ALL_TERMS = D_TERMS | D_R_TERMS | G_TERMS | {"g_r_adv", "g_r_cls", "g_r_rec", "g_shape_x", "g_shape_r", "g_cross"}


def make_batch(count: int = 4, organ: bool = True, seed: int = 1):
    """Images in [-1, 1], organ masks (the first half of the samples has one), body masks, modalities."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, 32, 32, generator=generator) * 2 - 1
    masks = torch.zeros(count, 1, 32, 32)
    if organ:
        masks[: count // 2, :, 6:18, 4:14] = 1  # asymmetric, so that a flip moves it
    bodies = (images > -0.6).float()
    modalities = torch.arange(count) % CONFIG.num_modalities
    return images, masks, bodies, modalities


def make_trainer(seed: int = 0, model_config=CONFIG, **flags) -> Trainer:
    config = TrainConfig(**flags)
    torch.manual_seed(seed)
    return Trainer(TarGAN(model_config, config), config, CPU)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], tensor) for name, tensor in module.state_dict().items()}


def test_one_step_returns_every_term_and_updates_every_network():
    trainer = make_trainer()
    model = trainer.model
    before = {name: snapshot(getattr(model, name)) for name in ("generator", "disc_x", "disc_r", "shape")}
    ema_before = snapshot(model.ema_generator)
    losses = trainer.train_step(make_batch(), derived_generator(0))
    assert set(losses) == ALL_TERMS
    assert all(value.dim() == 0 and not value.requires_grad and math.isfinite(value.item())
               for value in losses.values())
    for name, weights in before.items():
        moved = changed(weights, getattr(model, name))
        assert all(moved.values()), f"{name}: no update for {[k for k, v in moved.items() if not v]}"
    # EMA: ema = 0.999 * ema + 0.001 * G after the step, starting from G's initial weights.
    for name, tensor in model.ema_generator.state_dict().items():
        expected = ema_before[name] + 0.001 * (model.generator.state_dict()[name] - ema_before[name])
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
        assert not torch.equal(tensor, ema_before[name])


def test_totals_are_the_weighted_sums_of_the_terms():
    weights = dict(lambda_gp=7.0, lambda_rcls=2.0, lambda_u=0.5, lambda_fcls=3.0, lambda_rec=4.0,
                   lambda_cross=5.0, lambda_shape=6.0)
    losses = {k: v.item() for k, v in make_trainer(**weights).train_step(make_batch(), derived_generator(0)).items()}
    d_total = sum(losses[f"d_{s}_adv"] + 2.0 * losses[f"d_{s}_cls_real"] + 0.5 * losses[f"d_{s}_cls_fake"]
                  + 7.0 * losses[f"d_{s}_gp"] for s in ("x", "r"))
    g_total = (sum(losses[f"g_{s}_adv"] + 3.0 * losses[f"g_{s}_cls"] + 4.0 * losses[f"g_{s}_rec"]
                   + 6.0 * losses[f"g_shape_{s}"] for s in ("x", "r")) + 5.0 * losses["g_cross"])
    assert losses["d_total"] == pytest.approx(d_total, rel=1e-5)
    assert losses["g_total"] == pytest.approx(g_total, rel=1e-5)


@pytest.mark.parametrize("flags, absent_terms, networks", [
    ({"use_shape_controller": False}, {"g_shape_x", "g_shape_r"}, {"disc_r"}),
    ({"use_crossing_loss": False}, {"g_cross"}, {"disc_r", "shape"}),
    ({"use_target_stream": False}, D_R_TERMS | {"g_r_adv", "g_r_cls", "g_r_rec", "g_shape_r", "g_cross"}, {"shape"}),
    ({"use_target_stream": False, "use_shape_controller": False},
     D_R_TERMS | {"g_r_adv", "g_r_cls", "g_r_rec", "g_shape_x", "g_shape_r", "g_cross"}, set()),
])
def test_ablations_remove_networks_and_terms(flags, absent_terms, networks):
    trainer = make_trainer(**flags)
    encoder_r = snapshot(trainer.model.generator.encoder_r)
    losses = trainer.train_step(make_batch(), derived_generator(0))
    assert set(losses) == ALL_TERMS - absent_terms
    present = {name for name in ("disc_r", "shape") if getattr(trainer.model, name) is not None}
    assert present == networks
    expected_optimizers = {"generator", "disc_x"} | {"disc_r": "disc_r", "shape": "shape"}.keys() & networks
    assert set(trainer.optimizers) == expected_optimizers
    target_stream_trained = any(changed(encoder_r, trainer.model.generator.encoder_r).values())
    assert target_stream_trained == flags.get("use_target_stream", True)


def test_target_area_discriminator_terms_are_skipped_without_any_organ():
    trainer = make_trainer()
    disc_r = snapshot(trainer.model.disc_r)
    losses = trainer.train_step(make_batch(organ=False), derived_generator(0))
    assert not D_R_TERMS & set(losses) and not {"g_r_adv", "g_r_cls"} & set(losses)
    assert {"g_r_rec", "g_shape_r", "g_cross"} <= set(losses)  # the target stream still runs
    assert not any(changed(disc_r, trainer.model.disc_r).values())
    assert "state" not in trainer.optimizers["disc_r"].state_dict() or not trainer.optimizers["disc_r"].state


@pytest.mark.parametrize("flags", [
    {}, {"use_target_stream": False}, {"use_shape_controller": False},
    # The discriminators' last strided conv on a 2 x 2 map, as the paper preset's at 64 px.
    {"model_config": preset("tiny", image_size=32, disc_depth=5)},
])
def test_train_step_matches_the_literal_reference_step(flags):
    fast, reference = make_trainer(**flags), make_trainer(**flags)
    reference = Trainer.literal(reference.model, reference.config, CPU)  # up blocks: upsample, then conv
    assert all(torch.equal(a, b) for a, b in zip(fast.model.state_dict().values(),
                                                  reference.model.state_dict().values()))
    fast_losses = fast.train_step(make_batch(), derived_generator(3))
    reference_losses = reference.reference_step(make_batch(), derived_generator(3))
    assert fast_losses.keys() == reference_losses.keys()
    for name in fast_losses:
        torch.testing.assert_close(fast_losses[name], reference_losses[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_flip_applies_to_images_masks_and_bodies_together():
    images, masks, bodies, modalities = make_batch()
    flipped = (images.flip(-1), masks.flip(-1), bodies.flip(-1), modalities)
    always = make_trainer(flip_probability=1.0).train_step((images, masks, bodies, modalities), derived_generator(5))
    never = make_trainer(flip_probability=0.0).train_step(flipped, derived_generator(5))
    unflipped = make_trainer(flip_probability=0.0).train_step((images, masks, bodies, modalities), derived_generator(5))
    for name in always:
        assert always[name].item() == pytest.approx(never[name].item(), rel=1e-5, abs=1e-6), name
    assert unflipped["g_shape_x"].item() != pytest.approx(always["g_shape_x"].item(), rel=1e-6)


def test_steps_are_deterministic_and_a_state_dict_round_trip_continues_bit_for_bit():
    first, second = make_trainer(), make_trainer()
    for step in range(2):
        a = first.train_step(make_batch(seed=step), derived_generator(0, step))
        b = second.train_step(make_batch(seed=step), derived_generator(0, step))
        assert all(torch.equal(a[name], b[name]) for name in a)
    resumed = make_trainer(seed=123)  # different initial weights, replaced by the state
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    a = first.train_step(make_batch(seed=9), derived_generator(0, 2))
    b = resumed.train_step(make_batch(seed=9), derived_generator(0, 2))
    assert all(torch.equal(a[name], b[name]) for name in a)
    for (name, x), y in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_load_state_dict_refuses_a_state_of_another_ablation():
    state = make_trainer(use_shape_controller=False).state_dict()
    with pytest.raises(RuntimeError):
        make_trainer().load_state_dict(state)


def test_train_config_defaults_validation_and_round_trip():
    config = TrainConfig()
    assert (config.lambda_gp, config.lambda_rcls, config.lambda_fcls, config.lambda_rec, config.lambda_cross,
            config.lambda_u, config.lambda_shape) == (10.0, 1.0, 1.0, 1.0, 50.0, 0.01, 1.0)
    assert (config.lr_g, config.lr_d, config.betas, config.ema_decay) == (1e-4, 3e-4, (0.5, 0.9), 0.999)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({**config.to_dict(), "betas": [0.5, 0.9]}).betas == (0.5, 0.9)
    assert not TrainConfig(use_target_stream=False).crossing and TrainConfig().crossing
    for bad in ({"lambda_cross": -1.0}, {"lr_d": 0.0}, {"ema_decay": 1.0}, {"flip_probability": 2.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"lambda_crossing": 1.0})


def test_derived_generators_depend_on_every_key():
    draw = lambda *keys: torch.rand(4, generator=derived_generator(*keys))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 1))
    assert not torch.equal(draw(0, 1, 2), draw(0, 1, 2, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_on_cuda(dtype):
    config = TrainConfig()
    torch.manual_seed(0)
    trainer = Trainer(TarGAN(CONFIG, config), config, torch.device("cuda"), precision=dtype)
    assert trainer.model.disc_x.main[0].weight.is_contiguous(memory_format=torch.channels_last)
    for step in range(3):
        losses = trainer.train_step(make_batch(seed=step), derived_generator(0, step))
    assert all(math.isfinite(value.item()) for value in losses.values())
    assert trainer.scalers["disc"].is_enabled() == (dtype == torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_step_matches_the_reference_step_on_cuda_in_fp32():
    config = TrainConfig()
    trainers = []
    for channels_last in (True, False):
        torch.manual_seed(0)
        trainers.append(Trainer(TarGAN(CONFIG, config), config, torch.device("cuda"), channels_last=channels_last))
    fast = trainers[0].train_step(make_batch(), derived_generator(3))
    reference = trainers[1].reference_step(make_batch(), derived_generator(3))
    for name in fast:  # TF32 convolutions on recent GPUs: a looser tolerance than on the CPU
        torch.testing.assert_close(fast[name], reference[name], rtol=2e-2, atol=2e-2, msg=name)


def test_reference_step_refuses_mixed_precision():
    config = TrainConfig()
    trainer = Trainer(TarGAN(CONFIG, config), config, CPU, precision=torch.bfloat16)
    with pytest.raises(ValueError, match="fp32"):
        trainer.reference_step(make_batch(), derived_generator(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (compiling on 2 CPU cores takes minutes)")
def test_compiled_generator_gives_the_eager_losses_on_cuda():
    config = TrainConfig()
    trainers = []
    for compile in (True, False):
        torch.manual_seed(0)
        trainers.append(Trainer(TarGAN(CONFIG, config), config, torch.device("cuda"), compile=compile))
    for step in range(2):
        compiled = trainers[0].train_step(make_batch(seed=step), derived_generator(0, step))
        eager = trainers[1].train_step(make_batch(seed=step), derived_generator(0, step))
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=2e-2, atol=2e-2, msg=name)
