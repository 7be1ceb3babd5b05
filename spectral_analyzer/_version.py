__version__ = "0.1.0"

# The revision of what the cached results mean: part of the key of every cached spectra, dynamics, weights
# and attention result, with the version, and recorded with the cached band (used only at the same revision).
# Raised by every change that alters a cached number or its meaning (a definition, a fix), so that a store
# analysed by an older build never serves that build's values.
RESULTS_REVISION = 6  # 6: singular values (weights, circuits) below their rounding as 0; band products ring-first
