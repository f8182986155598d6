"""The synthetic study: generator family, the two small models, config/CLI, and the mechanism."""

from __future__ import annotations

import csv
import itertools

import pytest
import torch
from conftest import dense_graph_mixer, stored_artifacts

from scgraph.cli import build_parser as command_parser
from scgraph.models.model import AttentionMixer, Block, FactorizedAdjacency, GraphMixer
from scgraph.synthetic.bounds import floors
from scgraph.synthetic.config import StudyConfig
from scgraph.synthetic.generators import (
    GENERATORS,
    ORDERS,
    make_dataset,
    static_coefficients,
    values,
)
from scgraph.synthetic.models import build_synthetic_model
from scgraph.synthetic.study import COMMAND, REDUCED, main, run_study
from scgraph.synthetic.train import evaluate

A, B, C, D = range(4)
# Rows receive, columns send: W[t, s] is the static influence of token s on token t.
W = torch.tensor([[0.0, 0.2, -0.4, 0.1],
                  [0.3, 0.0, 0.5, -0.2],
                  [-0.1, 0.4, 0.0, 0.2],
                  [0.5, -0.3, 0.1, 0.0]], dtype=torch.float64)
E = torch.tensor([[1.1, 2.2, 2.9, 4.05]], dtype=torch.float64)  # e_A .. e_D
ORDER_CADB = torch.tensor([[C, A, D, B]])

# Worked by hand for the order C A D B, alpha 0.1, beta 0.3 (values in position order):
HAND_WORKED = {
    # v_t = alpha p_t + e_t + sum_s (w_ts + beta (p_s - p_t)) e_s; e.g. A (p=1):
    # 0.1 + 1.1 + (0.2 + 0.6) 2.2 + (-0.4 - 0.3) 2.9 + (0.1 + 0.3) 4.05 = 2.55
    "simultaneous": [9.22, 2.55, 3.02, -1.015],
    # v_k = alpha k + e_k + sum_{j<k} (w + beta (k - j)) v_j / 4; e.g. A: 1.2 + (-0.4 + 0.3) 2.9 / 4
    "sequential": [2.9, 1.1275, 4.983, 3.8932625],
    # v_k = alpha k + e_k + 2 beta v_{k-1}; e.g. A: 0.1 + 1.1 + 0.6 * 2.9
    "predecessor": [2.9, 2.94, 6.014, 6.1084],
    # v_k = alpha k + e_k + sum_{j<k} w v_j / 4 + 2 beta v_{k-1}; e.g. A: 1.2 - 0.4 * 2.9 / 4 + 1.74
    "static_predecessor": [2.9, 2.65, 6.24375, 6.4953125],
    # v_k = alpha k + e_k + sum_{j<k} w v_j / 4 + beta (2.2 v_{k-1} + 0.5 v_{k-2}); e.g. D:
    # 0.2 + 4.05 + (0.1 * 2.9 + 0.5 * 2.824) / 4 + 0.3 (2.2 * 2.824 + 0.5 * 2.9) = 6.97434
    "static_decay": [2.9, 2.824, 6.97434, 7.7522474],
}


@pytest.mark.parametrize("generator", GENERATORS)
def test_generator_reproduces_hand_worked_sample(generator: str) -> None:
    got = values(generator, ORDER_CADB, E, W, alpha=0.1, beta=0.3)
    torch.testing.assert_close(got, torch.tensor([HAND_WORKED[generator]], dtype=torch.float64))


def test_dataset_draws_all_24_orders_each_token_once_and_one_mask() -> None:
    data = make_dataset("static_predecessor", 5000, beta=0.2, sigma=0.1, w=static_coefficients(0))
    assert len(ORDERS) == 24
    assert {tuple(o) for o in data.tokens.tolist()} == {tuple(o) for o in ORDERS.tolist()}
    assert (data.tokens.sort(dim=1).values == torch.arange(4)).all()
    assert (data.masked.sum(1) == 1).all()
    assert set(data.masked.float().argmax(1).tolist()) == {0, 1, 2, 3}
    train, test = data.split(0.7)
    assert (len(train), len(test)) == (3500, 1500)


def test_exogenous_values_follow_token_means_and_sigma() -> None:
    # predecessor at alpha = beta = 0 is v = e, so the values show e's distribution per token.
    data = make_dataset("predecessor", 20000, beta=0.0, sigma=0.3, w=static_coefficients(0), alpha=0.0)
    by_token = torch.zeros(20000, 4).scatter_(1, data.tokens, data.values)
    torch.testing.assert_close(by_token.mean(0), torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(by_token.std(0), torch.full((4,), 0.3), atol=0.01, rtol=0)


def _token_values_over_all_orders(generator: str, beta: float) -> torch.Tensor:
    """(24, 4) value of each token (token-major) under every order, for one fixed e."""
    v = values(generator, ORDERS, E.expand(24, 4), W, alpha=0.1, beta=beta)
    return torch.zeros_like(v).scatter_(1, ORDERS, v)


@pytest.mark.parametrize("generator", ["simultaneous", "predecessor"])
def test_beta_zero_removes_every_dependence_on_relative_order(generator: str) -> None:
    """At beta = 0 a token's value depends on its own absolute position only; at beta > 0 it also
    depends on where the other tokens sit."""
    positions = torch.argsort(ORDERS, dim=1)
    for beta, independent in ((0.0, True), (0.3, False)):
        by_token = _token_values_over_all_orders(generator, beta)
        same_place = [by_token[positions[:, t] == p, t] for t, p in itertools.product(range(4), range(4))]
        spread = max((v.max() - v.min()).item() for v in same_place)
        assert (spread < 1e-12) == independent, (beta, spread)


@pytest.mark.parametrize("generator", ["sequential", "static_predecessor", "static_decay"])
def test_beta_zero_leaves_only_the_static_term_of_sequential_generators(generator: str) -> None:
    """In the sequential family beta = 0 removes the distance and predecessor terms, but the static
    term sums over the tokens generated *before* k, so the default generator still follows the
    generation order at beta = 0 (SPEC §2's formula; why its beta = 0 gap is ~1.2, not 1.0)."""
    only_static = values("sequential", ORDERS, E.expand(24, 4), W, alpha=0.1, beta=0.0)
    torch.testing.assert_close(values(generator, ORDERS, E.expand(24, 4), W, alpha=0.1, beta=0.0),
                               only_static)
    a_second = _token_values_over_all_orders(generator, 0.0)[torch.argsort(ORDERS, dim=1)[:, A] == 1, A]
    assert a_second.max() - a_second.min() > 0.1  # A's value depends on which token precedes it


def test_error_floors_match_the_hand_derived_predecessor_chain() -> None:
    """predecessor at beta = 0.5 is a random walk v_k = alpha k + e_k + v_{k-1}: given its
    neighbours a value is known to sigma^2 / 2 (first and middle positions) or sigma^2 (last),
    0.625 sigma^2 on average; from the order alone to (k + 1) sigma^2, 2.5 sigma^2 on average."""
    sigma = 0.2
    got = floors("predecessor", beta=0.5, sigma=sigma, w=W, alpha=0.1, mu=(1.0, 2.0, 3.0, 4.0))
    assert got.order_and_values == pytest.approx(0.625 * sigma ** 2, rel=0.03)
    assert got.order_only == pytest.approx(2.5 * sigma ** 2, rel=0.03)
    assert got.order_and_values < got.token_weights < got.order_only
    at_zero = floors("predecessor", beta=0.0, sigma=sigma, w=W, alpha=0.1, mu=(1.0, 2.0, 3.0, 4.0))
    assert at_zero.order_and_values == pytest.approx(sigma ** 2, rel=0.03)  # nothing to learn from others
    assert at_zero.ratio == pytest.approx(1.0, abs=0.01)
    assert at_zero.order_only == pytest.approx(sigma ** 2, rel=0.03)


def test_error_floors_match_the_hand_derived_decay_chain() -> None:
    """static_decay without static terms (w = 0) at beta = 0.5 is v_k = alpha k + e_k + 1.1 v_{k-1}
    + 0.25 v_{k-2}. Its density in v_m holds e_m, e_{m+1} (coefficient -1.1) and e_{m+2} (-0.25)
    when they exist, so given the other values v_m is known to sigma^2 / 2.2725 at positions 0 and
    1, sigma^2 / 2.21 at 2 and sigma^2 at 3. At beta = 0 a value is its own e: nothing to learn
    from the others, and a static adjacency loses nothing."""
    sigma, mu, no_w = 0.2, (1.0, 2.0, 3.0, 4.0), torch.zeros(4, 4, dtype=torch.float64)
    got = floors("static_decay", beta=0.5, sigma=sigma, w=no_w, alpha=0.1, mu=mu)
    expected = sigma ** 2 * (2 / 2.2725 + 1 / 2.21 + 1) / 4
    assert got.order_and_values == pytest.approx(expected, rel=0.03)
    assert got.order_and_values < got.token_weights <= got.static_adjacency
    assert got.ratio > 5  # the relative terms are what a static adjacency cannot weight
    at_zero = floors("static_decay", beta=0.0, sigma=sigma, w=no_w, alpha=0.1, mu=mu)
    for floor in (at_zero.order_and_values, at_zero.static_adjacency, at_zero.order_only):
        assert floor == pytest.approx(sigma ** 2, rel=0.03)


def test_synthetic_models_are_the_census_block_and_mixers() -> None:
    tf = build_synthetic_model(StudyConfig(), "transformer")
    gnn = build_synthetic_model(StudyConfig(), "gnn")
    for model, mixer in ((tf, AttentionMixer), (gnn, GraphMixer)):
        assert len(model.blocks) == 1 and isinstance(model.blocks[0], Block)
        assert isinstance(model.blocks[0].mixer, mixer)
        assert model.cfg.hidden == 8 and model.cfg.vocab_size == 4
    adjacency = gnn.blocks[0].mixer.adjacency
    assert isinstance(adjacency, FactorizedAdjacency) and adjacency.width == 4


def test_rank_four_adjacency_expresses_any_4x4_matrix() -> None:
    """U = A, V = I makes U V^T = A for an arbitrary A, and the fused mixer then computes exactly
    softmax(A[g, g]) H W_v: one factorized adjacency is the paper's trainable 4 x 4 matrix."""
    mixer = build_synthetic_model(StudyConfig(graph_heads=1), "gnn").blocks[0].mixer
    target = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        mixer.adjacency.u.weight[:4] = target
        mixer.adjacency.v.weight[:4] = torch.eye(4)
    genes = ORDERS[[0, 5, 17]]
    h = torch.randn(3, 4, 8)
    mask = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    expected = mixer.out(torch.softmax(target[genes[:, :, None], genes[:, None, :]], -1) @ mixer.value(h))
    torch.testing.assert_close(mixer(h, genes, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_graph_mixer(mixer, h, genes, mask), expected, atol=1e-5, rtol=1e-5)


def test_two_graph_heads_weight_each_half_of_the_values_by_its_own_4x4_adjacency() -> None:
    """The default two adjacencies: softmax(A) over the first half of H W_v, softmax(B) over the
    second, so a sender's value can reach a receiver with either sign (the difference of two
    positive weights)."""
    mixer = build_synthetic_model(StudyConfig(), "gnn").blocks[0].mixer
    a, b = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        mixer.adjacency.u.weight[:4] = torch.cat([a, b], dim=1)
        mixer.adjacency.v.weight[:4] = torch.cat([torch.eye(4), torch.eye(4)], dim=1)
    genes = ORDERS[[0, 5, 17]]
    h = torch.randn(3, 4, 8)
    mask = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    values = mixer.value(h)
    pair = genes[:, :, None], genes[:, None, :]
    expected = mixer.out(torch.cat([torch.softmax(a[pair], -1) @ values[..., :4],
                                    torch.softmax(b[pair], -1) @ values[..., 4:]], dim=-1))
    torch.testing.assert_close(mixer(h, genes, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["transformer", "gnn"])
def test_position_embedding_is_what_breaks_permutation_equivariance(backbone: str) -> None:
    """Without it a model sees a set (permuting the input permutes the output); with it, order."""
    data = make_dataset("predecessor", 8, beta=0.5, sigma=0.1, w=static_coefficients(0))
    perm = torch.tensor([2, 0, 3, 1])
    for position_embedding in (False, True):
        torch.manual_seed(0)
        model = build_synthetic_model(StudyConfig(position_embedding=position_embedding), backbone).eval()
        out = model(data.tokens, data.values, data.masked)
        permuted = model(data.tokens[:, perm], data.values[:, perm], data.masked[:, perm])
        assert torch.allclose(permuted, out[:, perm], atol=1e-6) != position_embedding


@pytest.mark.parametrize("kwargs, message", [
    (dict(generator="shuffled"), "generator must be one of"),
    (dict(betas=(0.0, 1.5)), "betas must lie in"),
    (dict(betas=()), "betas must hold at least one value"),
    (dict(sigmas=(0.1, 0.0)), "sigmas must be > 0"),
    (dict(sigmas=(0.1, 0.1)), "sigmas must not repeat"),
    (dict(mu=(1.0, 2.0)), "mu must hold 4 means"),
    (dict(samples=1), "samples (1) is too small"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(train_fraction=1.0), "train_fraction must be in"),
    (dict(hidden=6, heads=1), "hidden (6) must be divisible by the adjacency rank"),
    (dict(graph_heads=4), "hidden (8) must be divisible by the adjacency rank (4) times graph_heads (4)"),
    (dict(graph_heads=0), "graph_heads must be >= 1"),
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr must be in"),
])
def test_study_config_rejects_bad_arguments_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        StudyConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        command_parser(COMMAND).parse_args(["--help"])
    text = capsys.readouterr().out
    for name, field in StudyConfig.__dataclass_fields__.items():
        option = ("--no-" if field.default is True else "--") + name.replace("_", "-")
        assert option in text, option
    for action in command_parser(COMMAND)._actions:
        assert action.help, action.dest


def test_cli_reports_a_bad_argument_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--betas", "0,2"]) == 2
    assert "betas must lie in" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s: MLflow builds its sqlite schema
def test_study_writes_table_figures_and_logs_every_setting_to_mlflow(tmp_path) -> None:
    cfg = StudyConfig(betas=(0.0, 0.5), sigmas=(0.1,), samples=300, epochs=2, repeats=2, workers=1, out=tmp_path,
                      mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
    results = run_study(cfg, progress=False)
    with open(tmp_path / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["beta", "sigma", "tf_loss", "gnn_loss", "ratio", "tf_loss_std", "gnn_loss_std",
                             "ratio_std"]
    assert [(float(r["beta"]), float(r["sigma"])) for r in rows] == [(0.0, 0.1), (0.5, 0.1)]
    for row, result in zip(rows, sorted(results, key=lambda r: r.beta)):
        assert float(row["ratio"]) == pytest.approx(float(row["gnn_loss"]) / float(row["tf_loss"]), rel=1e-4)
        tf_best = [min(c.test_losses) for c in result.curves["transformer"]]
        gnn_best = [min(c.test_losses) for c in result.curves["gnn"]]
        assert float(row["tf_loss"]) == pytest.approx(sum(tf_best) / 2, rel=1e-4)
        assert float(row["tf_loss_std"]) == pytest.approx(abs(tf_best[0] - tf_best[1]) / 2 ** 0.5, rel=1e-4)
        ratios = [g / t for g, t in zip(gnn_best, tf_best)]
        assert float(row["ratio_std"]) == pytest.approx(abs(ratios[0] - ratios[1]) / 2 ** 0.5, rel=1e-4)
    with open(tmp_path / "floors.csv") as f:
        floor_rows = list(csv.DictReader(f))
    assert [(float(r["beta"]), float(r["sigma"])) for r in floor_rows] == [(0.0, 0.1), (0.5, 0.1)]
    for r in floor_rows:
        assert float(r["order_and_values"]) <= float(r["token_weights"]) <= float(r["order_only"])
        assert float(r["token_weights"]) <= float(r["static_adjacency"])
        assert float(r["ratio"]) == pytest.approx(float(r["static_adjacency"]) / float(r["order_and_values"]),
                                                  rel=1e-4)
    table = (tmp_path / "table1.txt").read_text()
    assert "Error floors" in table
    assert f"{results[0].loss('gnn'):.4f}±{results[0].loss_std('gnn'):.4f}" in table
    for png in ("fig3a_best_loss_vs_beta.png", "fig3b_test_loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    import mlflow  # the tracking store the study wrote
    client = mlflow.MlflowClient(cfg.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["generator"] == "static_decay"
    assert parent.data.params["betas"] == "0,0.5"
    assert {"study/ratio_avg_beta_0", "study/ratio_avg_beta_0.5"} <= set(parent.data.metrics)
    assert sorted(float(r.data.params["beta"]) for r in children) == [0.0, 0.5]
    for child in children:
        assert {"study/tf_loss", "study/gnn_loss", "study/ratio"} <= set(child.data.metrics)
        for repeat in ("r0", "r1"):
            history = client.get_metric_history(child.info.run_id, f"study/gnn_test_loss_{repeat}")
            assert [m.step for m in history] == [1, 2]
    _, artifacts = stored_artifacts(cfg.mlflow_uri, parent.info.run_id)
    assert {"table1.csv", "floors.csv", "fig3a_best_loss_vs_beta.png", "fig3b_test_loss_curves.png"} <= artifacts



def test_standardized_training_reports_test_loss_in_the_generators_units() -> None:
    """A model fed (v - m) / s predicts p; its loss in the generator's units is that of m + s p."""
    data = make_dataset("static_predecessor", 64, beta=0.5, sigma=0.1, w=static_coefficients(0))
    mean, std = 5.0, 3.0
    model = build_synthetic_model(StudyConfig(), "gnn").eval()
    scaled = data.standardized(mean, std)
    with torch.no_grad():
        pred = mean + std * model(scaled.tokens, scaled.values, scaled.masked)
    expected = ((pred - data.values)[data.masked] ** 2).mean().item()
    assert evaluate(model, scaled, loss_scale=std ** 2) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # ~1 min on two quiet cores
def test_mechanism_transformer_uses_relative_position_the_gnn_cannot(tmp_path) -> None:
    """The study's claim on the reduced protocol (``REDUCED``, two datasets per setting, every
    other setting the study's default): a strong relative-position effect costs the GNN's static
    adjacencies far more than its absence does. Measured with study seeds 0, 1, 2: GNN/TF 1.33,
    1.34, 1.32 at beta = 0 and 15.0, 9.4, 9.8 at beta = 0.5 (quotients 11.3, 7.0, 7.4), so the
    bounds below hold for any two of them with a margin of about 2x (9.4 against 5; 7.0 against
    3); two repeats, not three, keep the suite inside its 15 minutes.

    Without relative terms the GNN still trails a little at sigma = 0.1 (its best static weighting
    is 1.32x the positional one there; scgraph/synthetic/bounds.py).
    """
    cfg = StudyConfig(betas=(0.0, 0.5), sigmas=(0.1,), **REDUCED, repeats=2, workers=2, out=tmp_path)
    by_beta = {r.beta: r for r in run_study(cfg, progress=False, log=False)}
    assert by_beta[0.5].ratio >= 5.0, by_beta[0.5].row()
    assert by_beta[0.5].ratio >= 3 * by_beta[0.0].ratio, (by_beta[0.0].row(), by_beta[0.5].row())
