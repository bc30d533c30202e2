"""Profiler: expert scores for a task from its demos, the selection of a pattern, and the profile file."""

from .demos import Demo, check_demos, demo_hash, load_demos
from .profile import CRITERIA, PROFILE_FORMAT, Profile
from .run import ProfileRun, build_profile, collect_scores, profile_store, tokenize_demos
from .selection import POLICIES, Selection, min_experts, select

__all__ = [
    "CRITERIA",
    "POLICIES",
    "PROFILE_FORMAT",
    "Demo",
    "Profile",
    "ProfileRun",
    "Selection",
    "build_profile",
    "check_demos",
    "collect_scores",
    "demo_hash",
    "load_demos",
    "min_experts",
    "profile_store",
    "select",
    "tokenize_demos",
]
