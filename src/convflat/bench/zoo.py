"""timm's model zoo against the class that exact_curvature measures: docs/models.md.

``python -m convflat.bench zoo`` walks timm's model families (its model modules, such as
``resnet`` or ``efficientnet``), builds one small variant of each with random weights and 10
classes, and reports whether the conv that feeds global average pooling is in the class
(``in``), is out of it with the op that breaks it (``out``), cannot be traced by torch.fx
(``untraceable``), or the model cannot run on the small input (``error``). For the models in
the class it times one ``exact_curvature`` call (the float32 model, float64 products, the
head found by tracing included) against one forward pass of the same batch. The table is
written as markdown with the timm version and the date (needs the ``timm`` extra).

The variant of a family is the one listed in ``PREFERRED`` (the models named in issue 23
among them), else the smallest by parameter count among the first few names that look small
(counted on the meta device, nothing allocated); families whose smallest candidate is above
``--max-params`` are listed as not run.
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from convflat.curvature import OutOfClassError, ZeroCurvatureWarning, exact_curvature

# one variant per family where the choice matters: the models the issue names, and the usual
# small member where the smallest by name would be a distilled or legacy variant
PREFERRED = {
    "resnet": "resnet18", "efficientnet": "efficientnet_b0", "mobilenetv3":
    "mobilenetv3_small_100", "regnet": "regnetx_002", "byobnet": "resnext26ts",
    "densenet": "densenet121", "dla": "dla34", "convnext": "convnext_atto", "vgg": "vgg11",
    "rexnet": "rexnet_100", "cspnet": "cspresnet50", "ghostnet": "ghostnet_100",
    "resnetv2": "resnetv2_18", "senet": "legacy_seresnet18", "vision_transformer":
    "vit_tiny_patch16_224", "deit": "deit_tiny_patch16_224", "mobilevit": "mobilevit_xxs",
}
# name fragments of small variants, most preferred first
_SMALL = ("atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "small", "_s", "b0",
          "t0", "m0", "s0", "050", "100", "002", "18", "26", "34")
_LARGE = re.compile(r"large|huge|giant|enormous|_384|_448|_512|_1b|_3b|xl|xxl")


def _size_rank(name: str) -> tuple[int, int, str]:
    """Sort key of a name: small-looking first, then shorter names."""
    rank = next((i for i, frag in enumerate(_SMALL) if frag in name), len(_SMALL))
    return (rank + (100 if _LARGE.search(name) else 0), len(name), name)


def _n_params(timm: Any, name: str) -> int:
    """Parameters of a model built on the meta device (no memory, no initialization work)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def pick_variant(timm: Any, family: str, tries: int = 3) -> tuple[str, int | None]:
    """``(model name, parameter count)`` of the variant of ``family`` to survey: the preferred
    one, else the smallest of the ``tries`` first names by :func:`_size_rank`."""
    names = sorted(timm.list_models(module=family), key=_size_rank)
    if family in PREFERRED and PREFERRED[family] in names:
        names = [PREFERRED[family]]
    best: tuple[int, str] | None = None
    for name in names[:tries]:
        try:
            n = _n_params(timm, name)
        except Exception:  # a model that cannot be built on meta: counted when built
            return name, None
        if best is None or n < best[0]:
            best = (n, name)
    assert best is not None
    return best[1], best[0]


def _build(timm: Any, name: str, size: int) -> torch.nn.Module:
    """A random-init model with 10 classes that runs on ``size`` x ``size`` inputs (models
    with a fixed input size are asked for that size), in eval mode."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        with torch.no_grad():
            model(x)
    except Exception as first:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10,
                                      img_size=size).eval()
        except TypeError:  # no img_size argument: the first failure is the one to report
            raise first from None
        with torch.no_grad():
            model(x)
    return model


def _first_line(exc: BaseException, n: int = 100) -> str:
    """``Type: first line of the message`` (cut at ``n`` characters)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:n] if lines else '(no message)'}"


def _reason(exc: OutOfClassError) -> tuple[str, str]:
    """``(status, reason)`` of a refusal: the op and why, without the generic advice."""
    msg = str(exc)
    if msg.startswith("could not trace"):
        inner = re.search(r"\((\w+: [^\n]*)", msg)
        return "untraceable", (inner.group(1) if inner else msg)[:120].split(";")[0]
    msg = re.sub(r"^conv layer '[^']*' is not in the class measured exactly: ", "", msg)
    return "out", msg.split(". The chosen conv")[0]


def survey(timm: Any, family: str, name: str, n_params: int | None, batch: int, size: int
           ) -> dict[str, Any]:
    """One row of the table: the status of ``name`` and, in the class, its timings."""
    row: dict[str, Any] = {"family": family, "model": name, "params": n_params, "status": "",
                           "detail": "", "forward_s": None, "exact_s": None}
    try:
        model = _build(timm, name, size)
    except Exception as exc:
        row.update(status="error",
                   detail=f"cannot run on {size}x{size} inputs: {_first_line(exc)}")
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ZeroCurvatureWarning)
            t0 = time.perf_counter()
            res = exact_curvature(model, (x, y), device="cpu")
            row["exact_s"] = time.perf_counter() - t0
    except OutOfClassError as exc:
        row["status"], row["detail"] = _reason(exc)
        return row
    except Exception as exc:  # the model is traced but the measurement fails: say so
        row.update(status="error", detail=_first_line(exc, 120))
        return row
    with torch.no_grad():
        model(x)  # warm-up, as the measurement ran once before being timed
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    row["forward_s"] = statistics.median(times)
    zero = any(issubclass(w.category, ZeroCurvatureWarning) for w in caught)
    row["status"] = "in"
    row["detail"] = (f"`{res.layer}` -> `{res.classifier}` ({res.block_traces.shape[0]} "
                     f"filters)" + ("; trace 0 at init (zero-init BatchNorm gamma)"
                                    if zero else ""))
    return row


def _fmt_params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def render(rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown of docs/models.md."""
    rows = list(rows)
    count = {s: sum(r["status"] == s for r in rows) for s in
             ("in", "out", "untraceable", "error", "not run")}
    lines = [
        "# timm's model families and the class exact_curvature measures",
        "",
        "Generated by `python -m convflat.bench zoo` (do not edit by hand): timm "
        f"{meta['timm']}, torch {meta['torch']}, {meta['date']}, {meta['threads']} CPU "
        f"thread(s). One variant per family (a timm model module), random weights, 10 "
        f"classes, a batch of {meta['batch']} inputs of 3 x {meta['size']} x {meta['size']}.",
        "",
        f"Of {len(rows)} families, **{count['in']} are in the class**, {count['out']} are out "
        f"of it (the op that breaks it is named), {count['untraceable']} cannot be traced by "
        f"torch.fx, {count['error']} do not run on the small input and {count['not run']} "
        "were not run (larger than the size limit). The class and the rules of the head "
        "detection are in docs/internal-api.md; a family being in the class means its last "
        "conv before the pool is measured exactly, not that every variant is (a variant with "
        "another head can be out).",
        "",
        "`exact` is one `exact_curvature` call on the batch (float32 model, float64 products, "
        "the trace of the forward included), `forward` one forward pass of the same batch in "
        "eval mode without autograd (median of 3); both on the CPU of the machine above, so "
        "only their ratio carries over. A fresh timm ResNet-style model measures trace 0: "
        "timm zero-initializes the last BatchNorm gamma of each residual block "
        "(exact_curvature warns).",
        "",
        "| family | variant | params | status | conv -> classifier, or why not | forward (s) "
        "| exact (s) | exact / forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"in": 0, "out": 1, "untraceable": 2, "error": 3, "not run": 4}
    for r in sorted(rows, key=lambda r: (order[r["status"]], r["family"])):
        f, e = r["forward_s"], r["exact_s"]
        timing = (f"{f:.3f} | {e:.2f} | {e / f:.0f}" if f is not None and e is not None
                  else " | | ")
        detail = r["detail"].replace("|", "\\|")
        lines.append(f"| {r['family']} | `{r['model']}` | {_fmt_params(r['params'])} | "
                     f"{r['status']} | {detail} | {timing} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Survey timm's families and write the markdown table (docs/models.md)."""
    ap = argparse.ArgumentParser(prog="python -m convflat.bench zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/models.md", help="markdown file to write ('-': "
                    "standard output)")
    ap.add_argument("--families", default="", help="comma-separated timm modules (default: "
                    "all of timm.list_modules())")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--max-params", type=float, default=150e6,
                    help="families whose chosen variant is larger are not run (default 150e6)")
    args = ap.parse_args(argv)
    try:
        import timm
    except ImportError:
        raise SystemExit("bench zoo needs timm: pip install 'convflat[timm]'") from None
    families = ([f for f in args.families.split(",") if f] or sorted(timm.list_modules()))
    unknown = sorted(set(families) - set(timm.list_modules()))
    if unknown:
        raise SystemExit(f"--families: not timm model modules: {', '.join(unknown)}")
    rows = []
    for family in families:
        name, n = pick_variant(timm, family)
        if n is not None and n > args.max_params:
            rows.append({"family": family, "model": name, "params": n, "status": "not run",
                         "detail": f"smallest variant tried above --max-params "
                                   f"{args.max_params:.0e}", "forward_s": None, "exact_s": None})
        else:
            rows.append(survey(timm, family, name, n, args.batch, args.size))
        r = rows[-1]
        print(f"{family:28s} {name:36s} {r['status']:12s} {r['detail'][:90]}", flush=True)
    meta = {"timm": timm.__version__, "torch": torch.__version__, "batch": args.batch,
            "size": args.size, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}
    text = render(rows, meta)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}: {sum(r['status'] == 'in' for r in rows)} of {len(rows)} "
              "families in the class")
    return 0
