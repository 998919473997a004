"""The reparameterisation test: a function-preserving rescaling of the last conv's filters.

Filter c of the last conv (and its bias) is multiplied by alpha_c > 0 and column c of the
classifier divided by alpha_c. With ReLU and no BatchNorm between that conv and the pooling the
network computes the same function (Dinh et al. 2017), so a measure that only depends on the
function must not move, while plain curvature and norm measures do. The model is trained on
scikit-learn's digits in the test, so the point is a real (near-)minimum, not random weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fitting import fit_full_batch
from torch import nn

from convflat.measures import MEASURES, invariance_table, rescale_filters

# theory, measure by measure (docs/math.md Eq. (11) and the measures' docstrings)
STAY = [
    "conv_relative_flatness", "fisher_rao_norm", "inverse_margin", "sharpness_adaptive",
    "sharpness_avg_adaptive", "path_norm",
]
MOVE = [
    "conv_trace", "hutchinson_trace", "hutchinson_conv_trace", "hutchpp_conv_trace",
    "hessian_top_eigenvalue", "conv_top_eigenvalue", "conv_hessian_frobenius",
    "frobenius_norm", "spectral_norm_sum", "spectral_norm_product", "distance_from_init",
    "classifier_trace", "classifier_relative_flatness", "sharpness_worst", "sharpness_avg",
    "sharpness_keskar",
]
# stochastic bisections whose resolution may hide a small change; reported, not asserted
REPORTED = ["pacbayes_flatness", "pacbayes_bound", "pacbayes_mag_flatness"]
CHEAP = {
    "hutchinson_trace": {"probes": 8, "groups": 4},
    "pacbayes_flatness": {"depth": 8, "mc_samples": 3},
    "pacbayes_bound": {"depth": 8, "mc_samples": 3},
    "pacbayes_mag_flatness": {"depth": 8, "mc_samples": 3},
    "hessian_top_eigenvalue": {"iterations": 12},
}


def digits(n: int = 400):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(d.target[:n])


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    init = copy.deepcopy(model).double()
    x, y = digits()
    return fit_full_batch(model, x, y, steps=250, min_acc=0.9), init, x, y


def test_rescaling_preserves_the_function_and_refuses_otherwise(trained):
    model, _, x, _ = trained
    alphas = torch.linspace(0.3, 3.0, 8)
    out = rescale_filters(model, alphas, x[:16])
    assert torch.allclose(out(x), model(x), rtol=0, atol=1e-10)
    assert torch.allclose(out[2].weight, model[2].weight * alphas.view(-1, 1, 1, 1).double())
    silu = copy.deepcopy(model)
    silu[3] = nn.SiLU()
    with pytest.raises(ValueError, match="changed the logits"):
        rescale_filters(silu, alphas, x[:16])
    with pytest.raises(ValueError, match="positive"):
        rescale_filters(model, -alphas, x[:16])


def test_measures_move_or_stay_as_theory_predicts(trained):
    model, init, x, y = trained
    names = STAY + MOVE + REPORTED
    table = invariance_table(model, (x, y), init_model=init, names=names, params=CHEAP,
                             seed=0, device="cpu").set_index("measure")
    assert (table["status"] == "ok").all(), table[table["status"] != "ok"]
    for name in names:
        assert table.loc[name, "theory"] == MEASURES[name].theory
    for name in STAY:
        assert not table.loc[name, "changed"], (name, table.loc[name, "relative_change"])
        assert table.loc[name, "relative_change"] < 1e-6, name
    for name in MOVE:
        assert table.loc[name, "changed"], (name, table.loc[name, "relative_change"])
        assert table.loc[name, "relative_change"] > 1e-2, name
    assert table.loc[[*STAY, *MOVE], "agrees"].all()


@pytest.fixture(scope="module")
def trained_bn():
    """The quick study's gapcnn with BatchNorm (width 8, depth 3), trained in train mode so
    that the running statistics and affine parameters are far from the identity."""
    from convflat.models import build_model

    torch.manual_seed(3)
    model = build_model({"family": "gapcnn", "in_channels": 1, "num_classes": 10,
                         "image_size": [8, 8], "width": 8, "depth": 3, "batchnorm": True})
    init = copy.deepcopy(model).double().eval()
    x, y = digits(300)
    return fit_full_batch(model, x, y, steps=120, min_acc=0.8), init, x, y


def test_batchnorm_rescaling_leaves_every_invariant_measure_unchanged(trained_bn):
    """On a BN net the invariance table rescales every conv with its BN's running statistics
    and the last BN's affine against the classifier (rescale_batchnorm, chosen by "auto");
    every measure registered invariant must stay (folded path norm included), every one
    registered "changes" must move (the rescaling is not the identity on what they see)."""
    model, init, x, y = trained_bn
    table = invariance_table(model, (x, y), init_model=init, names="all", params=CHEAP,
                             seed=0, device="cpu").set_index("measure")
    assert set(table.index) == set(MEASURES)
    assert (table["status"] == "ok").all(), table[table["status"] != "ok"]
    invariant = [n for n, m in MEASURES.items() if m.theory == "invariant"]
    assert "path_norm" in invariant and len(invariant) >= 6
    for name in invariant:
        assert table.loc[name, "relative_change"] < 1e-6, (name,
                                                           table.loc[name, "relative_change"])
    for name in [n for n, m in MEASURES.items() if m.theory == "changes"]:
        assert table.loc[name, "relative_change"] > 1e-2, (name,
                                                           table.loc[name, "relative_change"])
