"""``python -m convflat.bench curvature``: the BackPACK oracle in sub-batches, and the table."""

import pytest
import torch

from convflat.bench import curvature as bench
from convflat.bench import oracles
from convflat.curvature import exact_curvature, find_head
from convflat.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    spec = {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 3, "num_classes": 3,
            "image_size": [8, 8]}
    return build_model(spec).eval()  # float32, as the bench measures


def test_backpack_oracle_in_sub_batches_matches_the_closed_form():
    """Sub-batches of 2 (batches of 5 and 2: uneven splits) give the same summed GGN diagonal
    as whole batches, and both equal the closed-form trace (ReLU head: Hessian = GGN) to
    float32 rounding: BackPACK computes in the model's float32."""
    model = _model()
    head = find_head(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    batches = list(zip(x.split(5), y.split(5), strict=True))
    exact = exact_curvature(model, (x, y), device="cpu").trace
    per_sample = 3 * head.conv.weight.numel() * 4  # K x C x d float32 entries
    assert oracles.backpack_bytes_per_sample(head, 3) == per_sample
    cpu = torch.device("cpu")
    runs = [oracles.backpack_ggn_trace(model, head, batches, cpu, max_bytes=cap)
            for cap in (2**40, 2 * per_sample)]
    (whole, sub_whole), (split, sub_split) = ((r["trace"], r["sub_batch"]) for r in runs)
    assert [(r["samples_run"], r["n"]) for r in runs] == [(7, 7), (7, 7)]
    assert (sub_whole, sub_split) == (5, 2)
    assert split == pytest.approx(whole, rel=1e-6)
    assert whole == pytest.approx(exact, rel=1e-5)
    assert split == pytest.approx(exact, rel=1e-5)


def test_bench_prints_one_row_per_model(capsys):
    rc = bench.main(["--models", "gapcnn-w16-d3", "--n", "8", "--batch-size", "4", "--size",
                     "16", "--repeats", "1", "--max-probes", "3",
                     "--max-hutchinson-seconds", "30", "--backpack-max-gib", "0.001",
                     "--patch-gram"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| gapcnn-w16-d3 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "features.2.conv" and cells[2] == "gram"
    assert float(cells[5]) > 0 and float(cells[6]) > 0  # (b)/(a), float32 (b)/(a)
    assert cells[11].endswith("x")  # (d)/(b): BackPACK ran
    # the 1 MiB cap forces sub-batches, and the note says so; BackPACK agrees with the
    # closed form to float32 rounding (the bench's models are float32)
    note = next(line for line in out.splitlines() if line.startswith("gapcnn-w16-d3:"))
    assert "sub-batches of" in note
    relerr = float(note.split("BackPACK rel. err. ")[1].split()[0])
    assert relerr < 1e-4
    assert float(note.split("from patches ")[1].split()[0]) > 0  # the side-by-side ran


def test_patch_gram_side_by_side_runs_the_gathered_gram_and_leaves_the_default(monkeypatch):
    """--patch-gram's run forms the patch Gram from gathered patches, the plain run from the
    input's stride phases (the cheaper here), and neither changes the other: the switch is an
    option of the call, not module state."""
    from convflat.curvature.gram import _GatheredGram, _PhaseGram

    calls = []  # observe which patch Gram runs; change nothing
    for cls in (_PhaseGram, _GatheredGram):
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _o=orig, _c=cls:
                            calls.append(_c) or _o(self, *a))
    _, model = next(bench._models(["gapcnn-w16-d3"], 3, 3))  # the Gram route at 16 x 16
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    batches = [(x, torch.tensor([0, 1, 2]))]
    runs = bench._exact_runs(model, batches, torch.device("cpu"), patch_gram=True)
    assert set(runs) == {"exact", "exact32", "patches"}
    results = {}
    for name in ("patches", "exact", "patches"):
        calls.clear()
        results[name] = runs[name]()
        assert set(calls) == {_GatheredGram if name == "patches" else _PhaseGram}, name
    assert results["patches"].trace == pytest.approx(results["exact"].trace, rel=1e-12)
    assert set(bench._exact_runs(model, batches, torch.device("cpu"), False)) == {
        "exact", "exact32"}
