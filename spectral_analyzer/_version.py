__version__ = "0.1.0"

# The revision of what the cached results mean: part of the key of every cached spectra, dynamics, weights
# and attention result, with the version, and recorded with the cached band (used only at the same revision).
# Raised by every change that alters a cached number or its meaning (a definition, a fix), so that a store
# analysed by an older build never serves that build's values.
# 7: ChatGLM2 and 3 without multi-query attention split per head; refined leading values kept on top.
# 6: singular values (weights, circuits) below their rounding as 0; band products ring-first.
RESULTS_REVISION = 7
