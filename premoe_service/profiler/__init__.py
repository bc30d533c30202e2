"""Profiler: expert scores for a task from its demos, and the profile file that holds them."""

from .profile import CRITERIA, PROFILE_FORMAT, Profile

__all__ = ["CRITERIA", "PROFILE_FORMAT", "Profile"]
