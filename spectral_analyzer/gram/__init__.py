"""The band: lagged inner products of the deltas, built in one streaming pass."""
