"""Shared test set-up: Hypothesis profiles (chosen by BP_ORACLE_PROFILE) and small helpers."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=50_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("BP_ORACLE_PROFILE", "dev"))

