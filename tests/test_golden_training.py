"""The training step against numbers recorded from the official TarGAN code (tests/data/README.md).

The official networks and training-step code ran on the CPU in float64 for three fixed batches of
two 32 x 32 slices, from weights given by a written rule (``training_probes.rule_weights``); the
fixture holds the inputs, D's two heads and S's output, every loss term of every step, the
gradients of the first step and the weights after the third (deltas from the start, EMA included).
Here the same weights go into this project's networks by name (``io.official``) and the project's
own step runs on the same batches and draws.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from targan_cli.config import ModelConfig
from targan_cli.core.intensity import body_mask
from targan_cli.core.training import StepDraws, TarGAN, Trainer, TrainConfig
from targan_cli.io.official import convert_official_state_dict
from training_probes import GradientLog, rule_weights

GOLDEN = np.load(Path(__file__).parent / "data" / "golden_training_step.npz")
# The official configuration scaled down: Generator(1 + 3, 2, 2, 3), Discriminator(32, 4, 6, 4),
# ShapeUNet(mid=2); the layer counts are the official ones.
CONFIG = ModelConfig(num_modalities=3, image_size=32, base_width=2, encoder_depth=2, shared_depth=3,
                     disc_width=4, disc_depth=4, shape_width=2, shape_depth=5)
SEEDS = {"G": 1901, "Di": 1902, "Dt": 1903, "H": 1904}
# official network -> (our TarGAN attribute, io.official network kind)
NETWORKS = {"G": ("generator", "generator"), "Di": ("disc_x", "discriminator"),
            "Dt": ("disc_r", "discriminator"), "H": ("shape", "shape")}
STEPS = 3
# Official loss variables -> our logged terms (the adversarial pair of D is one term here).
TERMS = {
    "d_x_cls_real": "d_loss_cls", "d_x_cls_fake": "d_loss_f_cls", "d_x_gp": "d_loss_gp",
    "d_r_cls_real": "d_loss_cls_t", "d_r_cls_fake": "d_loss_f_cls_t", "d_r_gp": "d_loss_gp_t",
    "d_total": "d_loss", "g_x_adv": "g_loss_fake", "g_x_cls": "g_loss_cls", "g_shape_x": "shape_loss",
    "g_x_rec": "g_loss_rec", "g_r_adv": "g_loss_fake_t", "g_r_cls": "g_loss_cls_t", "g_shape_r": "shape_loss_t",
    "g_r_rec": "g_loss_rec_t", "g_cross": "cross_loss", "g_total": "g_loss",
}
RTOL = 1e-5


def golden(key: str) -> torch.Tensor:
    return torch.from_numpy(GOLDEN[key].astype(np.float64))


def official_state(network: str) -> dict[str, torch.Tensor]:
    """The rule's weights under the official names (the fixture lists them in state_dict order)."""
    prefix = f"delta/{network}/"
    parameters = [(key[len(prefix):], GOLDEN[key].shape) for key in GOLDEN.files if key.startswith(prefix)]
    return rule_weights(parameters, SEEDS[network], torch.float64)


def ours(network: str, official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_official_state_dict(official, CONFIG, network=NETWORKS[network][1])


def golden_model(config: TrainConfig) -> TarGAN:
    model = TarGAN(CONFIG, config).double()
    for network, (attribute, _) in NETWORKS.items():
        getattr(model, attribute).load_state_dict(ours(network, official_state(network)), strict=True)
    model.ema_generator.load_state_dict(model.generator.state_dict())  # the EMA starts from G
    return model


def golden_trainer(literal: bool = False, **flags) -> Trainer:
    config = TrainConfig(flip_probability=0.0, **flags)
    model = golden_model(config)
    cpu = torch.device("cpu")
    return Trainer.literal(model, config, cpu) if literal else Trainer(model, config, cpu)


def golden_batch(step: int, bodies: str = "official") -> tuple[tuple[torch.Tensor, ...], StepDraws]:
    """The step's batch as the project's loader gives it, and the official run's draws.

    ``bodies``: "official" (the official shape mask, non-zero pixels) or "filled" (the project's
    DATA mask of the same images: speckle removed, holes filled).
    """
    images = golden(f"step{step}/input/x_real")
    if bodies == "official":
        body = golden(f"step{step}/input/shape_mask")
    else:
        body = torch.from_numpy(body_mask(images[:, 0].numpy())[:, None].astype(np.float64))
    batch = (images, golden(f"step{step}/input/mask"), body, golden(f"step{step}/input/label_org").long())
    draws = StepDraws(flip=torch.zeros(images.shape[0], dtype=torch.bool),
                      permutation=torch.from_numpy(GOLDEN[f"step{step}/input/perm"]),
                      alpha=golden(f"step{step}/input/alpha"))
    return batch, draws


def expected_terms(step: int) -> dict[str, float]:
    loss = {key.rsplit("/", 1)[1]: float(GOLDEN[key]) for key in GOLDEN.files if key.startswith(f"step{step}/loss/")}
    terms = {name: loss[official] for name, official in TERMS.items()}
    terms["d_x_adv"] = loss["d_loss_real"] + loss["d_loss_fake"]
    terms["d_r_adv"] = loss["d_loss_real_t"] + loss["d_loss_fake_t"]
    return terms


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float = 0.0) -> None:
    """Relative 1e-5 where |expected| >= floor * max |expected|; below that only as small.

    The floor is for weight updates whose gradient is zero up to rounding in both codes (the centre
    taps of the one-hot label planes in G's first convolutions, whose effect the instance norm
    removes): Adam scales such noise up to about 1e-4 of the largest update.
    """
    actual, expected = actual.detach().double(), expected.double()
    small = expected.abs() < floor * float(expected.abs().max())
    assert (actual[small].abs() <= floor * float(expected.abs().max())).all(), what
    torch.testing.assert_close(actual[~small], expected[~small], rtol=RTOL, atol=0, msg=what)


def test_the_fixture_is_a_case_where_every_swap_shows():
    for step in range(STEPS):
        labels = GOLDEN[f"step{step}/input/label_org"]
        targets = labels[GOLDEN[f"step{step}/input/perm"]]
        assert (targets != labels).all()  # targets differ from sources
        alpha = GOLDEN[f"step{step}/input/alpha"]
        assert ((alpha > 0) & (alpha < 1) & (alpha != 0.5)).all()
        bodies, organs = GOLDEN[f"step{step}/input/shape_mask"], GOLDEN[f"step{step}/input/mask"]
        assert (bodies != organs).any(axis=(1, 2, 3)).all()
        has_organ = organs.any(axis=(1, 2, 3))
        assert has_organ.any()
    # One step with a sample without the liver on each side: D_r's sample filter shows.
    assert {tuple(GOLDEN[f"step{step}/input/mask"].any(axis=(1, 2, 3))) for step in range(STEPS)} >= {
        (True, False), (False, True)}
    # The official mask (non-zero pixels) differs from the project's filled one: the switch shows.
    images = GOLDEN["step0/input/x_real"][:, 0]
    assert (body_mask(images) != GOLDEN["step0/input/shape_mask"][:, 0].astype(bool)).any()


def test_discriminator_heads_and_shape_controller_match_the_official_networks():
    model = golden_model(TrainConfig())
    images, areas = golden("step0/input/x_real"), golden("step0/input/t_img")
    with torch.no_grad():
        for disc, name, inputs in ((model.disc_x, "Di", images), (model.disc_r, "Dt", areas)):
            critique = disc(inputs)
            assert_close(critique.src, golden(f"heads/{name}/src"), f"{name} src map")
            assert_close(critique.cls, golden(f"heads/{name}/cls"), f"{name} class logits")
        assert_close(model.shape(images), golden("heads/H"), "S(x)")
        assert_close(model.shape(areas), golden("heads/H_on_area"), "S(r)")


def test_the_generator_matches_the_official_translation_and_reconstruction():
    model = golden_model(TrainConfig())
    (images, masks, _, sources), draws = golden_batch(0)
    targets = sources[draws.permutation]
    areas = golden("step0/input/t_img")
    with torch.no_grad():
        fake, fake_area = model.generator(images, targets, areas)
        reconstructed, reconstructed_area = model.generator(fake, sources, fake_area)
        assert_close(fake, golden("step0/output/x_fake"), "x_t")
        assert_close(fake_area, golden("step0/output/t_fake"), "r_t")
        assert_close(reconstructed, golden("step0/output/x_reconst"), "x_rec")
        assert_close(reconstructed_area, golden("step0/output/t_reconst"), "r_rec")


@pytest.mark.parametrize("literal", [False, True], ids=["train_step", "reference_step"])
def test_every_loss_term_of_three_steps_matches_the_official_step(literal):
    trainer = golden_trainer(literal=literal)
    step_function = trainer.reference_step if literal else trainer.train_step
    for step in range(STEPS):
        losses = step_function(*golden_batch(step))
        expected = expected_terms(step)
        assert set(losses) == set(expected)
        for name, value in expected.items():
            assert losses[name].item() == pytest.approx(value, rel=RTOL), f"step {step}: {name}"


def test_first_step_gradients_of_every_network_match_the_official_ones():
    trainer = golden_trainer()
    log = GradientLog(trainer)
    trainer.train_step(*golden_batch(0))
    for network, (attribute, _) in NETWORKS.items():
        prefix = f"grad0/{network}/"
        expected = ours(network, {key[len(prefix):]: golden(key) for key in GOLDEN.files if key.startswith(prefix)})
        recorded = log.grads[attribute]
        assert len(recorded) == 1, attribute
        assert recorded[0].keys() == expected.keys()
        for name, gradient in expected.items():
            assert gradient.abs().max() > 0, f"{network}.{name}: the case must give every parameter a gradient"
            assert_close(recorded[0][name], gradient, f"gradient of {attribute}.{name}", floor=1e-9)


@pytest.mark.parametrize("literal", [False, True], ids=["train_step", "reference_step"])
def test_weights_after_three_steps_match_the_official_update_ema_included(literal):
    trainer = golden_trainer(literal=literal)
    model = trainer.model
    start = {name: {key: value.clone() for key, value in getattr(model, attribute).state_dict().items()}
             for name, (attribute, _) in NETWORKS.items()}
    step_function = trainer.reference_step if literal else trainer.train_step
    for step in range(STEPS):
        step_function(*golden_batch(step))
    final = dict(NETWORKS, G_use=("ema_generator", "generator"))
    for network, (attribute, _) in final.items():
        prefix = f"delta/{network}/"
        expected = ours(network.removesuffix("_use"),
                        {key[len(prefix):]: golden(key) for key in GOLDEN.files if key.startswith(prefix)})
        weights = getattr(model, attribute).state_dict()
        for name, delta in expected.items():
            moved = weights[name] - start[network.removesuffix("_use")][name]
            assert_close(moved, delta, f"{attribute}.{name} after {STEPS} steps", floor=2e-4)


def test_the_official_mask_switch_reproduces_the_official_step_from_the_filled_masks():
    official = golden_trainer(official_body_mask=True)
    for step in range(STEPS):
        losses = official.train_step(*golden_batch(step, bodies="filled"))
        assert losses["g_shape_x"].item() == pytest.approx(expected_terms(step)["g_shape_x"], rel=RTOL)
        assert losses["g_total"].item() == pytest.approx(expected_terms(step)["g_total"], rel=RTOL)
    # Without the switch the filled mask is used, and the shape term differs from the official one.
    filled = golden_trainer().train_step(*golden_batch(0, bodies="filled"))
    assert filled["g_shape_x"].item() != pytest.approx(expected_terms(0)["g_shape_x"], rel=1e-3)
