"""Per run: grokking summary, and whether the gap dynamics came before the grok step.

    python docs/reproduce_table.py stores/*.zarr

"Before" is decided by rules fixed in advance, with W = 10 and default
thresholds: the step where R(t) enters its collapse phase (R below 0.8 of
its maximum, after the plateau), the first k* shift, and the first time R
falls below half of its running peak, each compared with the grok step.
"""

from __future__ import annotations

import sys

import numpy as np

import spectral_analyzer as sa


def first(ds, kind):
    steps = ds["event_step"].values[ds["event_kind"].values == kind]
    return int(steps[0]) if steps.size else None


def main(paths: list[str]) -> None:
    header = ["run", "grokked", "grok", "g23 decline", "R_early", "R_grok", "k*", "R peak (step)",
              "collapse phase", "first k* shift", "R < peak/2", "W_Q s1/s2 grok", "end"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in paths:
        run = sa.open_run(path)
        g = run.grokking(window=10)
        dyn = run.dynamics(window=10, factor=2.0)
        spectra = run.spectra(window=10)
        r = spectra["gap_ratio"].values
        peak = int(np.nanargmax(r))
        collapse = [int(s) for s, ph in zip(dyn["step"].values, dyn["phase"].values) if ph == "collapse"]
        grok = int(g["grok_step"]) if bool(g["grokked"]) else None

        def mark(step):
            if step is None:
                return "-"
            if grok is None:
                return f"{step}"
            return f"{step} " + ("(before)" if step < grok else "(at)" if step == grok else "(after)")

        row = [path.split("/")[-1].removesuffix(".zarr"), "yes" if grok is not None else "no",
               str(grok) if grok is not None else "-", f"{float(g['g23_decline']):.2f}", f"{float(g['R_early']):.2f}",
               f"{float(g['R_grok']):.2f}", str(int(g["k_star_mode"])), f"{r[peak]:.2f} ({int(spectra['step'][peak])})",
               mark(collapse[0] if collapse else None), mark(first(dyn, "k_star_shift")),
               mark(first(dyn, "gap_collapse_relative")), f"{float(g['wq_sigma_ratio_grok']):.1f}",
               f"{float(g['wq_sigma_ratio_end']):.1f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
