"""Benchmark how DAUNCE's covariance converges to its exact closed form as K grows, per variant.

Problems (float64, fitted exactly; `daunce_core.evaluation.problems`): ``linear_regression(n=80,
m=15)``
and ``logistic_regression(n=80, m=15)``. Cases: linear × {hessian, efim} × {observed, sampled};
logistic × {hessian, efim, trak} × {observed, sampled}; and black-box hessian on
``logistic_regression(n=400, m=15)`` with r = 0.5.

Settings as in ``tests/test_closed_form.py``: ρ = 0.1, γ = 1, r = 1 (black box: r = 0.5),
dtype float64, covariance scores, ``TrainConfig(lr=0.5, steps=150, batch_size=s,
schedule="constant")`` (full batch on each copy's subset of s = r·n examples). Target:
``exact_targets(..., scale=ρ²/s)`` (black box: variant hessian, observed labels,
``scale=3(1 − r)/s``, the subsampling sandwich).

Each case trains K_max = 800 copies once (``TorchModuleAccess.run(range(800))``) and scores the
first K rows for K in {25, 50, 100, 200, 400, 800}: copy k depends only on ``(seed, k)``, so the
first K rows are exactly a K-copy run. Per K: Pearson correlation with the target over all
train × query pairs, slope ``est·tgt / tgt·tgt``, relative Frobenius error ``‖est − tgt‖/‖tgt‖``,
and the correlation with the exact influence function ``(1/n) ∇L_iᵀ (H + λ)⁻¹ ∇L_j``; at K_max
also the self-influence's correlation and slope against its exact limit. ``err_exponent`` is the
least-squares slope of log(relative error) against log K (−0.5 while noise dominates; flatter
once a bias — nonlinearity, training not at the optimum — is reached).

Usage: ``.venv/bin/python bench/bench_convergence.py [--quick]`` (``--quick``: K up to 100 and
four cases); writes ``bench/results/convergence.json`` (``convergence_quick.json`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import numpy as np
from common import format_table, machine_info, machine_line, write_results

from daunce_core import ComputeConfig, DaunceConfig, Objective, TorchModuleAccess, TrainConfig
from daunce_core.baselines.exact import exact_targets
from daunce_core.evaluation.problems import Problem, linear_regression, logistic_regression
from daunce_core.method.scores import collect_statistics, score_matrix, self_influence

RHO = 0.1
KS = (25, 50, 100, 200, 400, 800)
QUICK_KS = (25, 50, 100)
BLACK_BOX_R = 0.5
VARIANTS = ("hessian", "efim", "trak")


@dataclass(frozen=True)
class Case:
    """One (problem, variant, labels, access) combination and its subset ratio."""

    problem: str
    variant: str
    labels: str
    access: str = "white_box"
    r: float = 1.0

    @property
    def label(self) -> str:
        access = " black-box" if self.access == "black_box" else ""
        ratio = f" r={self.r:g}" if self.r != 1 else ""
        return f"{self.problem} {self.variant} {self.labels}{access}{ratio}"


def cases(quick: bool) -> list[Case]:
    """All cases of the benchmark (four of them with ``quick``)."""
    black_box = Case("logistic400", "hessian", "observed", "black_box", BLACK_BOX_R)
    if quick:
        return [
            Case("linear", "hessian", "sampled"),
            Case("logistic", "hessian", "observed"),
            Case("logistic", "trak", "sampled"),
            black_box,
        ]
    white = [
        Case(problem, variant, labels)
        for problem, variants in (("linear", ("hessian", "efim")), ("logistic", VARIANTS))
        for variant in variants
        for labels in ("observed", "sampled")
    ]
    return [*white, black_box]


PROBLEMS = {
    "linear": lambda: linear_regression(n=80, m=15),
    "logistic": lambda: logistic_regression(n=80, m=15),
    "logistic400": lambda: logistic_regression(n=400, m=15),
}


def subset_size(prob: Problem, case: Case) -> int:
    return round(case.r * len(prob.train["y"]))


def losses(prob: Problem, case: Case, k_max: int):
    """Loss rows of copies ``0 .. k_max − 1`` trained as in the closed-form tests."""
    size = subset_size(prob, case)
    objective = Objective(
        variant=case.variant,
        labels=case.labels,
        access=case.access,
        rho=1.0 if case.access == "black_box" else RHO,
    )
    config = DaunceConfig(
        num_models=k_max,
        subset_ratio=case.r,
        objective=objective,
        train=TrainConfig(lr=0.5, steps=150, batch_size=size, schedule="constant"),
        dtype="float64",
        score="covariance",
    )
    copies = TorchModuleAccess(
        prob.model,
        prob.task,
        prob.train,
        prob.queries,
        config,
        prob.l2,
        compute=ComputeConfig(group_size=k_max),
    )
    return copies.run(range(k_max))


def targets(prob: Problem, case: Case):
    """The exact covariance limit (scaled to DAUNCE's magnitude) and the influence function."""
    size = subset_size(prob, case)
    # black box: the subsampling sandwich (1 − r)/s · F is the observed target times 3(1 − r)
    scale = 3 * (1 - case.r) / size if case.access == "black_box" else RHO**2 / size
    return exact_targets(
        prob.model,
        prob.task,
        prob.train,
        prob.queries,
        variant=case.variant,
        labels=case.labels,
        l2=prob.l2,
        scale=scale,
    )


def agreement(estimate: np.ndarray, target: np.ndarray) -> dict:
    """Pearson correlation, least-squares slope and relative Frobenius error."""
    est, tgt = np.ravel(estimate), np.ravel(target)
    return {
        "corr": float(np.corrcoef(est, tgt)[0, 1]),
        "slope": float(est @ tgt / (tgt @ tgt)),
        "rel_err": float(np.linalg.norm(est - tgt) / np.linalg.norm(tgt)),
    }


def covariance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Covariance scores ``[n_train, m_query]`` of loss rows ``a`` ``[K, n]``, ``b`` ``[K, m]``."""
    out = np.empty((a.shape[1], b.shape[1]), dtype=np.float64)
    return score_matrix(a, b, out, kind="covariance")


def run_case(case: Case, ks: tuple[int, ...]) -> dict:
    prob = PROBLEMS[case.problem]()
    start = time.perf_counter()
    rows = losses(prob, case, max(ks))
    train_seconds = time.perf_counter() - start
    exact = targets(prob, case)
    per_k = []
    for k in ks:
        scores = covariance(rows.train[:k], rows.query[:k])
        entry = {"K": k, **agreement(scores, exact.target)}
        entry["corr_influence"] = agreement(scores, exact.influence)["corr"]
        per_k.append(entry)
    full = rows.train, rows.query
    numpy_cov = np.cov(np.hstack(full), rowvar=False)[: full[0].shape[1], full[0].shape[1] :]
    self_scores = self_influence(collect_statistics(*full))
    self_agree = agreement(self_scores, exact.self_target)
    errors = [entry["rel_err"] for entry in per_k]
    return {
        "case": {**asdict(case), "label": case.label},
        "n": len(prob.train["y"]),
        "m": len(prob.queries["y"]),
        "subset_size": subset_size(prob, case),
        "train_seconds": train_seconds,
        "diverged": int(rows.diverged.sum()),
        "per_K": per_k,
        "err_exponent": float(np.polyfit(np.log(ks), np.log(errors), 1)[0]),
        "self_corr": self_agree["corr"],
        "self_slope": self_agree["slope"],
        "max_abs_diff_vs_np_cov": float(np.abs(covariance(*full) - numpy_cov).max()),
    }


def table(results: dict) -> str:
    ks = results["Ks"]
    headers = ["case", *[f"err K={k}" for k in ks], "exp", "corr", "slope", "corr IF"]
    headers += ["self corr", "self slope"]
    body = []
    for row in results["rows"]:
        last = row["per_K"][-1]
        body.append(
            [
                row["case"]["label"],
                *[f"{entry['rel_err']:.3f}" for entry in row["per_K"]],
                f"{row['err_exponent']:+.2f}",
                f"{last['corr']:.4f}",
                f"{last['slope']:.3f}",
                f"{last['corr_influence']:.4f}",
                f"{row['self_corr']:.4f}",
                f"{row['self_slope']:.3f}",
            ]
        )
    return format_table(headers, body)


def header(results: dict) -> str:
    k_max = results["Ks"][-1]
    return "\n".join(
        [
            f"machine: {machine_line(results['machine'])}",
            f"ρ = {RHO}, lr 0.5, 150 full-batch steps, float64, covariance scores",
            "err = ‖est − tgt‖/‖tgt‖ (relative Frobenius) at each K; exp = d log err / d log K",
            f"corr, slope, corr IF (with the exact influence function), self at K = {k_max}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: K ≤ 100, four cases")
    args = parser.parse_args()
    ks = QUICK_KS if args.quick else KS
    results = {"quick": args.quick, "machine": machine_info(), "Ks": list(ks), "rho": RHO}
    results["rows"] = []
    for case in cases(args.quick):
        row = run_case(case, ks)
        results["rows"].append(row)
        seconds = row["train_seconds"]
        print(f"  {case.label}: trained {max(ks)} copies in {seconds:.1f} s", flush=True)
    path = write_results("convergence_quick" if args.quick else "convergence", results)
    print()
    print(header(results))
    print()
    print(table(results))
    worst = max(row["max_abs_diff_vs_np_cov"] for row in results["rows"])
    print(f"\nscore_matrix vs np.cov at K = {max(ks)}, max |Δ| over all cases: {worst:.1e}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
