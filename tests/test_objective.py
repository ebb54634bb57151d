"""The training objective checked independently of its implementation.

The project's ``Trainer`` runs on hand-built stand-ins for G, D_x, D_r and S whose outputs are
closed formulas of their inputs (below), on a hand-built batch of three 4 x 4 slices in float64.
The expected values are written here from METHOD.md with plain torch operations, sharing no code
with ``core.losses`` or ``core.training``: each term's value, its class target and mask, which
networks its gradient reaches (read from the optimizers by a hook), and the weights after three
steps (torch's own Adam on copies of the stand-ins, and the EMA by its formula).

The case is built so that every swap changes a value: targets differ from sources, one sample has
no organ, the body mask differs from the organ mask and from the image's foreground, the
interpolation weights are strictly inside (0, 1) and not 1/2, the penalty's gradient norms lie
below and above 1, and the stand-ins' outputs depend on the target and on the pixel.
"""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from targan_cli.config import preset
from targan_cli.core.networks import Critique
from targan_cli.core.training import StepDraws, TarGAN, Trainer, TrainConfig
from training_probes import GradientLog

N_MOD = 3  # modalities
SIZE = 4
DTYPE = torch.float64
LAMBDAS = dict(lambda_gp=10.0, lambda_rcls=1.0, lambda_u=0.01, lambda_fcls=1.0, lambda_rec=1.0,
               lambda_cross=50.0, lambda_shape=1.0)


def param(*values) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=DTYPE))


def pixel_map(seed: int, low: float, high: float) -> nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return nn.Parameter(low + (high - low) * torch.rand(1, 1, SIZE, SIZE, generator=generator, dtype=DTYPE))


class StubGenerator(nn.Module):
    """x_t = tanh(a_x[t] * x + c_x[t] + p_x), r_t = tanh(a_r[t] * r + c_r[t] + p_r): a scale and a
    shift per target modality and a pixel pattern, per stream."""

    def __init__(self):
        super().__init__()
        self.a_x, self.c_x, self.p_x = param(0.9, 1.2, 0.7), param(0.1, -0.2, 0.3), pixel_map(1, -0.2, 0.2)
        self.a_r, self.c_r, self.p_r = param(1.1, 0.8, 1.3), param(-0.1, 0.2, 0.05), pixel_map(2, -0.2, 0.2)

    def forward(self, x, target, area=None):
        t = target.long()
        image = torch.tanh(self.a_x[t].view(-1, 1, 1, 1) * x + self.c_x[t].view(-1, 1, 1, 1) + self.p_x)
        if area is None:
            return image
        return image, torch.tanh(self.a_r[t].view(-1, 1, 1, 1) * area + self.c_r[t].view(-1, 1, 1, 1) + self.p_r)


class StubDiscriminator(nn.Module):
    """src = w * x + v x^2 / 2 per pixel (a patch map; its input gradient w + v x varies by sample);
    cls = b + u * mean(x) + q * mean(x^2) per sample: 2n logits."""

    def __init__(self, seed: int):
        super().__init__()
        self.w, self.v = pixel_map(seed, 0.0, 0.3), param(0.4)
        generator = torch.Generator().manual_seed(seed + 100)
        self.b = nn.Parameter(0.5 * torch.randn(2 * N_MOD, generator=generator, dtype=DTYPE))
        self.u = nn.Parameter(torch.randn(2 * N_MOD, generator=generator, dtype=DTYPE))
        self.q = nn.Parameter(torch.randn(2 * N_MOD, generator=generator, dtype=DTYPE))

    def forward(self, x):
        src = self.w * x + self.v * x**2 / 2
        cls = self.b + self.u * x.mean(dim=(1, 2, 3))[:, None] + self.q * (x**2).mean(dim=(1, 2, 3))[:, None]
        return Critique(src, cls)


class StubShape(nn.Module):
    """S(x) = sigmoid(a * x + c) with a pixel map each."""

    def __init__(self):
        super().__init__()
        self.a, self.c = pixel_map(7, 0.5, 2.0), pixel_map(8, -0.5, 0.5)

    def forward(self, x):
        return torch.sigmoid(self.a * x + self.c)


def stub_model(config: TrainConfig) -> TarGAN:
    model = TarGAN(preset("tiny", image_size=32), config)
    model.generator = StubGenerator()
    model.disc_x = StubDiscriminator(3)
    model.disc_r = StubDiscriminator(4) if config.use_target_stream else None
    model.shape = StubShape() if config.use_shape_controller else None
    model.ema = AveragedModel(model.generator, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
    model.ema.update_parameters(model.generator)
    model.ema.requires_grad_(False)
    return model


def stub_trainer(**overrides) -> Trainer:
    config = TrainConfig(**{**LAMBDAS, **overrides})
    return Trainer(stub_model(config), config, torch.device("cpu"))


# ------------------------------------------------------------------------------ the case


def case_batch(step: int):
    """Three 4 x 4 slices: images with background -1 pixels, organ masks (sample 1 has none),
    body masks that differ from both the organ and the image's foreground, sources, and draws."""
    generator = torch.Generator().manual_seed(50 + step)
    images = torch.rand(3, 1, SIZE, SIZE, generator=generator, dtype=DTYPE) * 1.6 - 0.8
    images[:, :, 0, :2] = -1.0  # background
    images[0, 0, 3, 3] = images[2, 0, 2, 0] = -1.0  # a hole inside the body
    organs = torch.zeros(3, 1, SIZE, SIZE, dtype=DTYPE)
    organs[0, 0, 1:3, 1:4] = 1
    organs[2, 0, 2:4, 0:2 + step] = 1
    bodies = (images > -1).to(DTYPE)
    bodies[:, :, 0, 0] = 1  # the given body mask fills a corner the image leaves at -1 ...
    bodies[:, :, 3, 2] = 0  # ... and leaves out a pixel
    sources = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 2, 1]][step])
    draws = StepDraws(flip=torch.tensor([[True, False, True], [False, True, False], [True, True, False]][step]),
                      permutation=torch.tensor([[1, 2, 0], [2, 0, 1], [1, 2, 0]][step]),
                      alpha=torch.tensor([[0.3, 0.8, 0.6], [0.7, 0.15, 0.45], [0.35, 0.9, 0.2]][step], dtype=DTYPE))
    return (images, organs, bodies, sources), draws


# ------------------------------------------------------------------------------ METHOD.md, written out


def bce_onehot(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """BCE with logits against one-hot rows at ``index``, summed over the 2n outputs, / N."""
    onehot = torch.zeros_like(logits)
    onehot[torch.arange(logits.shape[0]), index] = 1
    return (torch.log1p(torch.exp(-logits.abs())) + logits.clamp(min=0) - logits * onehot).sum() / logits.shape[0]


def unit(image: torch.Tensor) -> torch.Tensor:
    return ((image + 1) / 2).clamp(0, 1)


def prepared(batch, draws, official_mask: bool = False):
    """Flip, targets, target areas, organ filter: METHOD.md's inputs of one step."""
    images, organs, bodies, sources = batch
    flip = draws.flip.view(-1, 1, 1, 1)
    x, y, b = (torch.where(flip, t.flip(-1), t) for t in (images, organs, bodies))
    if official_mask:
        b = (x > -1).to(DTYPE)
    r = unit(x) * y * 2 - 1  # r = y * x in [0, 1] space
    return dict(x=x, y=y, b=b, r=r, s=sources, t=sources[draws.permutation], a=draws.alpha.view(-1, 1, 1, 1),
                organ=y.flatten(1).amax(dim=1) > 0)


def penalty(disc, real, fake, a):
    x_hat = (a * real + (1 - a) * fake).detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(disc(x_hat).src.sum(), x_hat, create_graph=True)
    norms = gradient.flatten(1).norm(dim=1)
    return ((norms - 1) ** 2).mean(), norms


def discriminator_terms(nets, p):
    """D's terms on fakes from the current G (no gradient into G)."""
    with torch.no_grad():
        x_t, r_t = nets["generator"](p["x"], p["t"], p["r"])
    terms = {}
    o = p["organ"]
    for prefix, disc, real, fake, a, s in (("d_x", nets["disc_x"], p["x"], x_t, p["a"], p["s"]),
                                           ("d_r", nets["disc_r"], p["r"][o], r_t[o], p["a"][o], p["s"][o])):
        real_c, fake_c = disc(real), disc(fake)
        terms[f"{prefix}_adv"] = -real_c.src.mean() + fake_c.src.mean()
        terms[f"{prefix}_cls_real"] = bce_onehot(real_c.cls, s)
        terms[f"{prefix}_cls_fake"] = bce_onehot(fake_c.cls, s + N_MOD)
        terms[f"{prefix}_gp"] = penalty(disc, real, fake, a)[0]
    return terms


def generator_terms(nets, p):
    g, o = nets["generator"], p["organ"]
    x_t, r_t = g(p["x"], p["t"], p["r"])
    x_rec, r_rec = g(x_t, p["s"], r_t)
    critique_x, critique_r = nets["disc_x"](x_t), nets["disc_r"](r_t[o])
    return {
        "g_x_adv": -critique_x.src.mean(), "g_x_cls": bce_onehot(critique_x.cls, p["t"]),
        "g_x_rec": (p["x"] - x_rec).abs().mean(),
        "g_r_adv": -critique_r.src.mean(), "g_r_cls": bce_onehot(critique_r.cls, p["t"][o]),
        "g_r_rec": (p["r"] - r_rec).abs().mean(),
        "g_shape_x": ((nets["shape"](x_t) - p["b"]) ** 2).mean(),
        "g_shape_r": ((nets["shape"](r_t) - p["y"]) ** 2).mean(),
        "g_cross": (unit(x_t) * p["y"] - unit(r_t)).abs().mean(),
    }


def weighted(terms, lambdas):
    total = 0
    for name, value in terms.items():
        if name.startswith("d_"):
            weight = {"adv": 1.0, "cls_real": lambdas["lambda_rcls"], "cls_fake": lambdas["lambda_u"],
                      "gp": lambdas["lambda_gp"]}[name[4:]]
        elif name.startswith("g_shape"):
            weight = lambdas["lambda_shape"]
        elif name == "g_cross":
            weight = lambdas["lambda_cross"]
        else:
            weight = {"adv": 1.0, "cls": lambdas["lambda_fcls"], "rec": lambdas["lambda_rec"]}[name[4:]]
        total = total + weight * value
    return total


def gradients(total, module):
    parameters = list(module.parameters())
    grads = torch.autograd.grad(total, parameters, retain_graph=True, allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(p))
            for (name, p), g in zip(module.named_parameters(), grads)}


class Reference:
    """METHOD.md's step on copies of the stand-ins, with torch.optim.Adam and the EMA formula."""

    def __init__(self, model: TarGAN, lambdas=LAMBDAS, official_mask=False):
        self.nets = {name: copy.deepcopy(getattr(model, name)) for name in ("generator", "disc_x", "disc_r", "shape")}
        self.ema = copy.deepcopy(model.generator)
        self.lambdas, self.official_mask = lambdas, official_mask
        lr = {"generator": 1e-4, "shape": 1e-4, "disc_x": 3e-4, "disc_r": 3e-4}
        self.optimizers = {name: torch.optim.Adam(net.parameters(), lr=lr[name], betas=(0.5, 0.9))
                           for name, net in self.nets.items()}

    def discriminator_update(self, p):
        terms = discriminator_terms(self.nets, p)
        total = weighted(terms, self.lambdas)
        grads = {name: gradients(total, self.nets[name]) for name in ("disc_x", "disc_r")}
        self._apply(grads)
        return {**terms, "d_total": total}, grads

    def generator_update(self, p):
        terms = generator_terms(self.nets, p)
        total = weighted(terms, self.lambdas)
        grads = {name: gradients(total, self.nets[name]) for name in ("generator", "shape")}
        self._apply(grads)
        with torch.no_grad():
            for e, g in zip(self.ema.parameters(), self.nets["generator"].parameters()):
                e.copy_(0.999 * e + 0.001 * g)
        return {**terms, "g_total": total}, grads

    def step(self, batch, draws):
        p = prepared(batch, draws, self.official_mask)
        d_terms, d_grads = self.discriminator_update(p)
        g_terms, g_grads = self.generator_update(p)
        return {k: v.detach() for k, v in {**d_terms, **g_terms}.items()}, {**d_grads, **g_grads}

    def _apply(self, grads):
        for name, named in grads.items():
            for parameter, (_, grad) in zip(self.nets[name].parameters(), named.items()):
                parameter.grad = grad.detach().clone()
            self.optimizers[name].step()


# ------------------------------------------------------------------------------ the tests


def test_the_case_makes_every_swap_show():
    for step in range(3):
        p = prepared(*case_batch(step))
        assert (p["t"] != p["s"]).all()
        assert p["organ"].tolist() == [True, False, True]
        assert not torch.equal(p["b"], p["y"]) and not torch.equal(p["b"], (p["x"] > -1).to(DTYPE))
        assert ((p["a"] > 0) & (p["a"] < 1) & (p["a"] != 0.5)).all()
    model = stub_model(TrainConfig())
    p = prepared(*case_batch(0))
    with torch.no_grad():
        x_t, r_t = model.generator(p["x"], p["t"], p["r"])
    o = p["organ"]
    for disc, real, fake, a in ((model.disc_x, p["x"], x_t, p["a"]), (model.disc_r, p["r"][o], r_t[o], p["a"][o])):
        _, norms = penalty(disc, real, fake, a)
        assert (norms < 1).any() and (norms > 1).any(), norms  # the penalty's both sides


@pytest.mark.parametrize("literal", [False, True], ids=["train_step", "reference_step"])
def test_three_steps_match_the_written_out_objective_terms_gradients_and_weights(literal):
    trainer = stub_trainer()
    if literal:
        trainer = Trainer.literal(trainer.model, trainer.config, torch.device("cpu"))
    reference = Reference(trainer.model)
    log = GradientLog(trainer)
    for step in range(3):
        batch, draws = case_batch(step)
        losses = (trainer.reference_step if literal else trainer.train_step)(batch, draws)
        expected, grads = reference.step(batch, draws)
        assert set(losses) == set(expected)
        for name, value in expected.items():
            assert losses[name].item() == pytest.approx(value.item(), rel=1e-12, abs=1e-14), f"step {step}: {name}"
        for network, named in grads.items():
            for name, grad in named.items():
                torch.testing.assert_close(log.grads[network][step][name], grad, rtol=1e-10, atol=1e-14,
                                           msg=f"step {step}: gradient of {network}.{name}")
        for network, net in reference.nets.items():
            for (name, ours), theirs in zip(getattr(trainer.model, network).named_parameters(), net.parameters()):
                torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14, msg=f"step {step}: {network}.{name}")
        for ours, theirs in zip(trainer.model.ema_generator.parameters(), reference.ema.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14, msg=f"step {step}: EMA")


def test_the_official_mask_switch_uses_the_image_foreground_for_the_shape_term():
    batch, draws = case_batch(0)
    p_given, p_official = prepared(batch, draws), prepared(batch, draws, official_mask=True)
    trainer = stub_trainer(official_body_mask=True)
    shape = copy.deepcopy(trainer.model.shape)
    with torch.no_grad():
        x_t = trainer.model.generator(p_official["x"], p_official["t"])
        official = ((shape(x_t) - (p_official["x"] > -1).to(DTYPE)) ** 2).mean()
        given = ((shape(x_t) - p_given["b"]) ** 2).mean()
    assert official.item() != pytest.approx(given.item(), rel=1e-6)
    assert trainer.train_step(batch, draws)["g_shape_x"].item() == pytest.approx(official.item(), rel=1e-12)
    assert stub_trainer().train_step(batch, draws)["g_shape_x"].item() == pytest.approx(given.item(), rel=1e-12)


# Class targets: each term's logged value equals BCE against the right one-hot rows (computed here
# from the stand-ins' logits), and differs from the value with any other candidate target.
def _class_candidates(p):
    s, t = p["s"], p["t"]
    return {"s": s, "t": t, "n+s": s + N_MOD, "n+t": t + N_MOD}


@pytest.mark.parametrize("term, stream, inputs, disc_state, right", [
    ("d_x_cls_real", "x", "real", "before", "s"),
    ("d_x_cls_fake", "x", "fake", "before", "n+s"),
    ("g_x_cls", "x", "fake", "after", "t"),
    ("d_r_cls_real", "r", "real", "before", "s"),
    ("d_r_cls_fake", "r", "fake", "before", "n+s"),
    ("g_r_cls", "r", "fake", "after", "t"),
])
def test_each_classification_term_has_its_class_target(term, stream, inputs, disc_state, right):
    trainer = stub_trainer()
    batch, draws = case_batch(0)
    p = prepared(batch, draws)
    disc_name = f"disc_{stream}"
    before = copy.deepcopy(getattr(trainer.model, disc_name))
    with torch.no_grad():
        x_t, r_t = trainer.model.generator(p["x"], p["t"], p["r"])
    losses = trainer.train_step(batch, draws)
    disc = before if disc_state == "before" else getattr(trainer.model, disc_name)
    images = {("x", "real"): p["x"], ("x", "fake"): x_t, ("r", "real"): p["r"], ("r", "fake"): r_t}[stream, inputs]
    keep = p["organ"] if stream == "r" else torch.ones(3, dtype=torch.bool)  # D_r: samples with an organ only
    with torch.no_grad():
        logits = disc(images[keep]).cls
    values = {name: bce_onehot(logits, index[keep]).item() for name, index in _class_candidates(p).items()}
    assert losses[term].item() == pytest.approx(values[right], rel=1e-12)
    for name, value in values.items():
        if name != right:
            assert value != pytest.approx(values[right], rel=1e-3), f"{term}: target {name} gives the same value"


# Masks: the shape terms use the body mask (x stream) and the organ mask (r stream), the crossing
# term the organ mask, the target area y * x; values computed here, each differing from the swap.
def test_each_mask_term_uses_its_mask():
    trainer = stub_trainer()
    batch, draws = case_batch(0)
    p = prepared(batch, draws)
    shape = copy.deepcopy(trainer.model.shape)
    with torch.no_grad():
        x_t, r_t = trainer.model.generator(p["x"], p["t"], p["r"])
        s_x, s_r = shape(x_t), shape(r_t)
        expected = {
            "g_shape_x": {"b": ((s_x - p["b"]) ** 2).mean(), "y": ((s_x - p["y"]) ** 2).mean()},
            "g_shape_r": {"y": ((s_r - p["y"]) ** 2).mean(), "b": ((s_r - p["b"]) ** 2).mean()},
            "g_cross": {"y": (unit(x_t) * p["y"] - unit(r_t)).abs().mean(),
                        "b": (unit(x_t) * p["b"] - unit(r_t)).abs().mean()},
        }
        # The target area as D_r's real input: background -1, the organ's pixels from x.
        area_adv = {"y": -trainer.model.disc_r(p["r"][p["organ"]]).src.mean(),
                    "b": -trainer.model.disc_r((unit(p["x"]) * p["b"] * 2 - 1)[p["organ"]]).src.mean()}
        fake_mean = trainer.model.disc_r(r_t[p["organ"]]).src.mean()
    losses = trainer.train_step(batch, draws)
    for term, right in (("g_shape_x", "b"), ("g_shape_r", "y"), ("g_cross", "y")):
        values = expected[term]
        assert losses[term].item() == pytest.approx(values[right].item(), rel=1e-12), term
        wrong = ({"b", "y"} - {right}).pop()
        assert values[wrong].item() != pytest.approx(values[right].item(), rel=1e-3), term
    assert losses["d_r_adv"].item() == pytest.approx((area_adv["y"] + fake_mean).item(), rel=1e-12)
    assert (area_adv["b"] + fake_mean).item() != pytest.approx(losses["d_r_adv"].item(), rel=1e-3)


# Gradient flow: each weighted term's gradient, per network, is the difference its weight makes to
# what the optimizers step on (weight 1 vs 0), computed here from the written-out term alone.
# "reaches" lists the networks it must reach; every other network must get exactly nothing from it.
@pytest.mark.parametrize("weight, terms, phase, reaches", [
    ("lambda_shape", ("g_shape_x", "g_shape_r"), "g", {"generator", "shape"}),  # S, and G through the fakes
    ("lambda_cross", ("g_cross",), "g", {"generator"}),
    ("lambda_rec", ("g_x_rec", "g_r_rec"), "g", {"generator"}),
    ("lambda_fcls", ("g_x_cls", "g_r_cls"), "g", {"generator"}),  # not D: D is fixed in G's update
    ("lambda_gp", ("d_x_gp", "d_r_gp"), "d", {"disc_x", "disc_r"}),  # not G: the fakes are detached
    ("lambda_rcls", ("d_x_cls_real", "d_r_cls_real"), "d", {"disc_x", "disc_r"}),
    ("lambda_u", ("d_x_cls_fake", "d_r_cls_fake"), "d", {"disc_x", "disc_r"}),
])
def test_each_term_reaches_exactly_its_networks(weight, terms, phase, reaches):
    on, off = stub_trainer(), stub_trainer(**{weight: 0.0})
    logs = [GradientLog(on), GradientLog(off)]
    batch, draws = case_batch(0)
    for trainer in (on, off):
        trainer.train_step(batch, draws)
    reference = Reference(stub_model(TrainConfig()))
    p = prepared(batch, draws)
    if phase == "d":
        all_terms = discriminator_terms(reference.nets, p)
    else:  # G's terms are taken through the discriminators after their update, as in the step
        reference.discriminator_update(p)
        all_terms = generator_terms(reference.nets, p)
    term = sum(all_terms[name] for name in terms)
    for network in {"d": ("disc_x", "disc_r"), "g": ("generator", "shape")}[phase]:
        difference = {name: logs[0].grads[network][0][name] - logs[1].grads[network][0][name]
                      for name in logs[0].grads[network][0]}
        expected = {name: LAMBDAS[weight] * grad for name, grad in gradients(term, reference.nets[network]).items()}
        if network in reaches:
            assert any(g.abs().max() > 1e-8 for g in difference.values()), f"{weight} must reach {network}"
            for name, grad in expected.items():
                torch.testing.assert_close(difference[name], grad, rtol=1e-9, atol=1e-13, msg=f"{network}.{name}")
        else:
            assert all(torch.equal(g, torch.zeros_like(g)) for g in expected.values())
            assert all(torch.equal(g, torch.zeros_like(g)) for g in difference.values()), \
                f"{weight} must not reach {network}"


def test_the_discriminator_update_leaves_g_and_s_alone_and_g_update_leaves_d_alone():
    trainer = stub_trainer()
    model = trainer.model
    state = {name: copy.deepcopy(getattr(model, name).state_dict()) for name in ("generator", "disc_x", "disc_r", "shape")}
    order = []
    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_pre_hook(lambda opt, args, kwargs, name=name: order.append(
            (name, {n: torch.equal(v, state[n][k]) for n in state
                    for k, v in getattr(model, n).state_dict().items()})))
    trainer.train_step(*case_batch(0))
    names = [name for name, _ in order]
    assert names == ["disc_x", "disc_r", "generator", "shape"]
    # When G's optimizer steps, D has moved (the G update sees the updated D) and G has not.
    _, unchanged = order[2]
    assert unchanged["generator"] and unchanged["shape"] and not unchanged["disc_x"] and not unchanged["disc_r"]
